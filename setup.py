"""Builds dlc's native kernels (csrc/ -> dlc._C) and maps the top-level folders into the `dlc` package.

`compiler/` installs as `dlc.compiler`, `runtime/` as `dlc.runtime`, `csrc/` as `dlc._C`; `dlc` itself is a
namespace package, so the repository keeps its flat, legible top level.
"""

import os
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
                ext.extra_link_args += ["-fopenmp"] if openmp else []
        super().build_extensions()


extensions = [
    Extension(
        f"dlc._C.{name}",
        [f"csrc/{name}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for name in NATIVE_MODULES
]

setup(
    packages=["dlc.compiler", "dlc.runtime", "dlc._C"]
    + [f"dlc.compiler.{p}" for p in find_packages("compiler")]
    + [f"dlc.runtime.{p}" for p in find_packages("runtime")],
    package_dir={"dlc.compiler": "compiler", "dlc.runtime": "runtime", "dlc._C": "csrc"},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
