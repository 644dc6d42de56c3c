"""dlc._C: native (Cython) kernels. Each kernel has a pure-numpy reference beside it in `*_ref.py`.

The kernels' OpenMP threads take turns with numpy's OpenBLAS threads (convolutions alternate im2col loops
and GEMMs). OpenMP's default is to spin after a parallel loop, which on a small machine steals the cores
OpenBLAS is about to use (10× slower steps were measured on 2 cores), so threads here sleep instead of
spinning unless the user chose otherwise. This must happen before the first kernel module loads libgomp.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
