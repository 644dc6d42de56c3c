"""onnxruntime sessions with an honest choice of execution provider.

Providers are tried in the order TensorRT, CUDA, CPU. onnxruntime-gpu lists the CUDA and TensorRT providers
even on a machine without a GPU or without the CUDA libraries, and then quietly runs on the CPU; a Session
looks at which provider the created session really uses and says so once, plainly.
"""

from __future__ import annotations

import glob
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from dlc.compiler.errors import Diagnostic, DlcError

log = logging.getLogger("dlc.runtime")

DEVICES = {
    "auto": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}
_GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_announced: set[str] = set()


def _say_once(message: str, level: int = logging.INFO) -> None:
    if message not in _announced:
        _announced.add(message)
        log.log(level, message)


def gpu_present() -> bool:
    """Whether an NVIDIA GPU device node exists (Linux); elsewhere we cannot tell cheaply, so we try."""
    if sys.platform.startswith("linux"):
        return bool(glob.glob("/dev/nvidia[0-9]*"))
    return True


class Session:
    """An onnxruntime InferenceSession on the best provider that really works.

    device: 'auto' (TensorRT, then CUDA, then CPU), 'tensorrt', 'cuda' or 'cpu'. Asking for a GPU provider
    that cannot run is an error (DlcError) that says why; 'auto' falls back to the CPU and says so once.
    optimization: onnxruntime's graph optimization level: 'disable', 'basic', 'extended' or 'all'.
    """

    def __init__(self, model: str | Path | bytes, device: str = "auto", optimization: str = "all",
                 threads: int | None = None):
        if device not in DEVICES:
            raise DlcError(f"unknown device '{device}': use one of {', '.join(DEVICES)}")
        if optimization not in _OPT_LEVELS:
            raise DlcError(f"unknown optimization level '{optimization}': use one of {', '.join(_OPT_LEVELS)}")
        self.path = None if isinstance(model, bytes) else str(model)
        where = self.path or "<in-memory model>"
        if self.path is not None and not Path(self.path).is_file():
            raise DlcError(Diagnostic("ONNX file not found", file=where, hint="check the path"))
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPT_LEVELS[optimization]
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads

        available = set(ort.get_available_providers())
        wanted = [p for p in DEVICES[device] if p in available]
        why_not_gpu = None
        if not gpu_present() and any(p in _GPU_PROVIDERS for p in wanted):
            why_not_gpu = "no NVIDIA GPU on this machine"
            wanted = ["CPUExecutionProvider"]
        elif device != "cpu" and not (available & _GPU_PROVIDERS):
            why_not_gpu = f"the installed onnxruntime ({ort.__version__}) has no GPU providers"
        try:
            # A GPU provider whose libraries fail to load makes onnxruntime log an error and fall back to the
            # CPU; we detect the fallback below and explain it ourselves, so silence that log while we try.
            ort.set_default_logger_severity(4)
            self._session = ort.InferenceSession(model if isinstance(model, bytes) else self.path,
                                                 sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt or invalid models
            raise DlcError(Diagnostic(f"cannot load the ONNX model: {_first_line(exc)}", file=where,
                                      hint="is it a complete .onnx file? re-export it")) from None
        finally:
            ort.set_default_logger_severity(2)
        self.providers: list[str] = self._session.get_providers()
        self.provider: str = self.providers[0]
        gpu_wanted = [p for p in wanted if p in _GPU_PROVIDERS]
        if gpu_wanted and self.provider not in _GPU_PROVIDERS:
            why_not_gpu = (f"{gpu_wanted[0]} could not start (its CUDA/cuDNN/TensorRT libraries did not load; "
                           "see onnxruntime's install notes for the versions this onnxruntime-gpu needs)")
        if device in ("cuda", "tensorrt") and self.provider not in _GPU_PROVIDERS:
            raise DlcError(f"device '{device}' was asked for but cannot run: {why_not_gpu}; "
                           "use --device cpu (or auto) to run on the CPU")
        if device == "tensorrt" and self.provider != "TensorrtExecutionProvider":
            raise DlcError("device 'tensorrt' was asked for but TensorRT could not start (CUDA can: "
                           "use --device cuda)")
        if why_not_gpu and device == "auto":
            _say_once(f"dlc: running on the CPU ({why_not_gpu})")

    # --- description ------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda"}.get(self.provider, "cpu")

    @property
    def inputs(self) -> list[ort.NodeArg]:
        return self._session.get_inputs()

    @property
    def outputs(self) -> list[ort.NodeArg]:
        return self._session.get_outputs()

    @property
    def metadata(self) -> dict[str, Any] | None:
        """dlc's JSON metadata (model name, input size, normalization, classes...), if the model has it."""
        raw = self._session.get_modelmeta().custom_metadata_map.get("dlc")
        return json.loads(raw) if raw else None

    # --- running ----------------------------------------------------------------------------------------
    def random_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Random float32 inputs of the model's shapes; symbolic (dynamic) axes take `batch`."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for arg in self.inputs:
            shape = [d if isinstance(d, int) and d > 0 else batch for d in arg.shape]
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
        return feeds

    def run(self, feeds: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run the model; a bare array feeds the single input. Returns {output name: array}."""
        if isinstance(feeds, np.ndarray):
            if len(self.inputs) != 1:
                raise DlcError(f"the model has {len(self.inputs)} inputs: pass a dict of arrays")
            feeds = {self.inputs[0].name: feeds}
        names = [o.name for o in self.outputs]
        try:
            values = self._session.run(names, feeds)
        except Exception as exc:
            expected = ", ".join(f"{a.name} {a.shape}" for a in self.inputs)
            got = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
            raise DlcError(f"onnxruntime could not run the model: {_first_line(exc)} "
                           f"(expected inputs: {expected}; got: {got})") from None
        return dict(zip(names, values))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
