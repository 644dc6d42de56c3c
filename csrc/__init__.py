"""dlc._C: native (Cython) kernels. Each kernel has a pure-numpy reference beside it in `*_ref.py`."""
