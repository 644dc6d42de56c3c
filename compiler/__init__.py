"""dlc.compiler: the YAML model spec, the Graph IR, analysis, ONNX export and the `dlc` command line."""

from importlib.metadata import PackageNotFoundError, version

from .train.launcher import share_threads

share_threads()  # under mpirun: each rank's share of the CPUs, set before numpy and the kernels load

try:
    __version__ = version("dlc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
