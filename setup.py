"""Builds dlc's native kernels (csrc/ -> dlc._C) and maps the top-level folders into the `dlc` package.

`compiler/` installs as `dlc.compiler`, `runtime/` as `dlc.runtime`, `csrc/` as `dlc._C`; `dlc` itself is a
namespace package, so the repository keeps its flat, legible top level.
"""

import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
NATIVE_MODULES = ["boxes", "conv", "pool", "batchnorm", "layernorm", "activation", "loss", "detect"]


def _compiler_has_openmp(compiler) -> bool:
    """Try to compile and link a tiny OpenMP program; prange falls back to serial loops without it."""
    if sys.platform == "win32":
        return True
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objs, os.path.join(tmp, "omp"), extra_postargs=["-fopenmp"])
        except Exception:
            return False
    return True


# Extra builds of every kernel module for newer x86-64 CPUs, chosen at import by dlc._C (see csrc/__init__.py).
# Besides the wider vectors, batch norm and layer norm may reassociate their float64 sums (so that the
# statistics' reductions vectorize; -O3 alone never reorders them): the sums then differ from the baseline's in
# their last bits, which rounding to float32 almost always hides. Multiply-adds stay unfused (-ffp-contract=off)
# in every build, so elementwise results are the baseline's exactly; tests/test_isa_dispatch.py runs the kernel
# tests on every build this machine can run. No -ffast-math: NaN and infinity checks must keep working.
# Only where the code does not depend on exact float rounding: activation's exp rounds with the 1.5 * 2^23
# trick, which reassociation folds away (sigmoid came out wrong by 50 %), so it, and loss's exp, keep strict
# float semantics in every build.
FAST_FLOAT = ["-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
FAST_FLOAT_MODULES = {"batchnorm", "layernorm"}
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-mavx512f", "-mavx512cd", "-mavx512bw", "-mavx512dq",
               "-mavx512vl", "-mprefer-vector-width=512"],
}


def _isa_builds() -> list[str]:
    """The ISA builds this platform gets: x86-64 with GCC or Clang (their -m flags); DLC_ISA_BUILDS=none (or a
    comma-separated subset) narrows them, e.g. for a quicker development build."""
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    chosen = os.environ.get("DLC_ISA_BUILDS", ",".join(ISA_FLAGS))
    return [isa for isa in chosen.split(",") if isa in ISA_FLAGS]


class BuildExt(build_ext):
    def build_extensions(self):
        openmp = _compiler_has_openmp(self.compiler)
        if not openmp:
            print("dlc: the C compiler has no OpenMP; native kernels will run on one thread", file=sys.stderr)
        for ext in self.extensions:
            if sys.platform == "win32":
                ext.extra_compile_args += ["/O2"] + (["/openmp"] if openmp else [])
            else:
                # -ffp-contract=off: no fused multiply-add, so kernels round exactly as their numpy references
                # on every CPU (aarch64 GCC fuses by default).
                ext.extra_compile_args += ["-O3", "-ffp-contract=off"] + (["-fopenmp"] if openmp else [])
                _, _, isa, module = ext.name.split(".")
                if isa in ISA_FLAGS:  # after the common flags: these win
                    ext.extra_compile_args += ISA_FLAGS[isa] + (FAST_FLOAT if module in FAST_FLOAT_MODULES else [])
                ext.extra_link_args += ["-fopenmp"] if openmp else []
        super().build_extensions()

    def build_extension(self, ext):
        # The ISA builds compile the same C file as the baseline: each gets its own object folder.
        isa = ext.name.split(".")[2]
        temp = self.build_temp
        self.build_temp = os.path.join(temp, isa)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = temp


def _cythonized(isa: str) -> list[Extension]:
    # One C file per build, in its own folder: the module's full name is compiled into it, and a module that
    # believes it is dlc._C.baseline.conv registers itself under that name whichever build it is.
    return cythonize(
        [Extension(f"dlc._C.{isa}.{name}", [f"csrc/{name}.pyx"], include_dirs=[np.get_include()],
                   define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]) for name in NATIVE_MODULES],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        build_dir=f"build/cython/{isa}",
    )


extensions = [ext for isa in ["baseline", *_isa_builds()] for ext in _cythonized(isa)]

setup(
    packages=["dlc.compiler", "dlc.runtime", "dlc._C", "dlc._C.baseline", *(f"dlc._C.{isa}" for isa in ISA_FLAGS)]
    + [f"dlc.compiler.{p}" for p in find_packages("compiler")]
    + [f"dlc.runtime.{p}" for p in find_packages("runtime")],
    package_dir={"dlc.compiler": "compiler", "dlc.runtime": "runtime", "dlc._C": "csrc"},
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
