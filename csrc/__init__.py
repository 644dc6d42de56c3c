"""dlc._C: native (Cython) kernels. Each kernel has a pure-numpy reference beside it in `*_ref.py`.

The kernels' OpenMP threads take turns with numpy's OpenBLAS threads (convolutions alternate im2col loops
and GEMMs). OpenMP's default is to spin after a parallel loop, which on a small machine steals the cores
OpenBLAS is about to use (10× slower steps were measured on 2 cores), so threads here sleep instead of
spinning unless the user chose otherwise. This must happen before the first kernel module loads libgomp.

Every kernel module is built up to three times (setup.py): `baseline` for any CPU, and on x86-64 `avx2` and
`avx512`. The best build this CPU runs is chosen here, once, from numpy's own CPU-feature detection (which
also checks that the OS saves the wider registers), and `dlc._C.conv` and friends name that build's modules,
so `from dlc._C import conv` needs no change anywhere. DLC_ISA=baseline|avx2|avx512 asks for one build (a
build the CPU cannot run, or one not built, falls back to the best that works, with a warning).
"""

import importlib
import importlib.util
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

MODULES = ("boxes", "conv", "pool", "batchnorm", "layernorm", "activation", "loss", "detect")
BUILDS = ("avx512", "avx2", "baseline")  # best first
# numpy's feature names each build needs (AVX512_SKX: F, CD, BW, DQ and VL together)
NEEDS = {"avx512": ("AVX512_SKX", "AVX2", "FMA3", "F16C"), "avx2": ("AVX2", "FMA3", "F16C"), "baseline": ()}


def cpu_features() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return {}
    return dict(__cpu_features__)


def runnable_builds() -> list[str]:
    """The builds that are installed and that this CPU can run, best first."""
    features = cpu_features()
    out = []
    for build in BUILDS:
        if not all(features.get(f) for f in NEEDS[build]):
            continue
        try:  # found, not loaded: only the chosen build's libraries are ever loaded
            found = all(importlib.util.find_spec(f"{__name__}.{build}.{m}") is not None for m in MODULES)
        except ImportError:
            found = False
        if found:
            out.append(build)
    return out


def _choose() -> str:
    runnable = runnable_builds()
    if not runnable:
        raise ImportError("dlc's native kernels are not built: reinstall dlc (pip install -e .) so that its "
                          "Cython extensions are compiled")
    asked = os.environ.get("DLC_ISA", "").strip().lower()
    if asked and asked not in runnable:
        why = "is not one of " + "|".join(BUILDS) if asked not in BUILDS else "cannot run here"
        print(f"dlc: DLC_ISA={asked} {why} (this CPU runs: {', '.join(runnable)}); using {runnable[0]}",
              file=sys.stderr)
    return asked if asked in runnable else runnable[0]


ISA = _choose()
for _name in MODULES:
    _module = importlib.import_module(f"{__name__}.{ISA}.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
del _name, _module
