"""onnxruntime sessions with an honest choice of execution provider.

Providers are tried in the order TensorRT, CUDA, CPU. onnxruntime-gpu lists the CUDA and TensorRT providers
even on a machine without a GPU or without the CUDA libraries, and then quietly runs on the CPU; a Session
looks at which provider the created session really uses and says so once, plainly.
"""

from __future__ import annotations

import glob
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from dlc.compiler.errors import Diagnostic, DlcError
from dlc.compiler.limits import check_input

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
_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_announced: set[str] = set()


def _say_once(message: str, level: int = logging.INFO) -> None:
    if message not in _announced:
        _announced.add(message)
        log.log(level, message)


_shared_pool: list[int] = []  # the size of the process-wide intra-op pool, once set (onnxruntime allows one)


def shared_thread_pool(threads: int | None) -> bool:
    """onnxruntime's process-wide intra-op thread pool, sized `threads` (None: one per core), made once per
    process; True when sessions can share it at that size. Sessions that share it do not compete with each
    other's spinning threads, and each run still finds its threads awake, as a model running alone would.
    After this, onnxruntime refuses sessions with threads of their own in this process: call it only in a
    process made for timing."""
    want = int(threads or 0)
    if _shared_pool:
        return _shared_pool[0] == want
    try:
        from onnxruntime.capi import _pybind_state  # the Python API's only door to the global pools

        _pybind_state.set_global_thread_pool_sizes(want, 1)
    except Exception:  # made already by someone else, or an onnxruntime without global pools
        return False
    _shared_pool.append(want)
    return True


def provider_list(wanted: list[str], trt_fp16: bool = False, trt_cache: str | Path | None = None) -> list:
    """onnxruntime's providers argument: names, with TensorRT's options (fp16 engines, an engine cache) where
    asked for."""
    options: dict[str, Any] = {}
    if "TensorrtExecutionProvider" not in wanted:
        return list(wanted)
    if trt_fp16:
        options["trt_fp16_enable"] = True
    if trt_cache is not None:
        Path(trt_cache).mkdir(parents=True, exist_ok=True)
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(trt_cache))
    return [(p, options) if p == "TensorrtExecutionProvider" and options else p for p in wanted]


def _preload_gpu_libraries() -> None:
    """onnxruntime-gpu 1.21+ can load the CUDA, cuDNN and TensorRT libraries that pip wheels (nvidia-*) put in
    site-packages (onnxruntime.preload_dlls); without it those wheels are not on the loader's path and the GPU
    providers quietly fail. Older versions lack it: then the system's libraries are used, as before."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or _preloaded:
        return
    _preloaded.append(True)
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 - a missing library is reported by the provider check afterwards
        log.debug("onnxruntime.preload_dlls failed: %s", exc)


_preloaded: list[bool] = []


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
    spinning: whether onnxruntime's intra-op threads busy-wait after a run (its default: yes).
    shared_threads: run on the process-wide intra-op thread pool of `threads` threads (shared_thread_pool)
    instead of the session's own. For models timed side by side: each session's own threads keep spinning after
    its run, on the cores the next session needs, and slow it down. Once that pool exists onnxruntime refuses
    sessions with their own threads in the same process, so only a process made for timing uses it
    (runtime/bench_isolated.py).
    trt_fp16: TensorRT builds fp16 engines (where the GPU has fast fp16). trt_cache: a folder where TensorRT keeps
    its built engines, so the minutes of engine building happen once per model and GPU, not per process.
    """

    def __init__(self, model: str | Path | bytes, device: str = "auto", optimization: str = "all",
                 threads: int | None = None, spinning: bool | None = None, shared_threads: bool = False,
                 trt_fp16: bool = False, trt_cache: str | Path | None = None):
        if device not in DEVICES:
            raise DlcError(f"unknown device '{device}': use one of {', '.join(DEVICES)}")
        if optimization not in _OPT_LEVELS:
            raise DlcError(f"unknown optimization level '{optimization}': use one of {', '.join(_OPT_LEVELS)}")
        self.path = None if isinstance(model, bytes) else str(model)
        where = self.path or "<in-memory model>"
        if self.path is not None:
            from dlc.compiler.onnx_io import read_onnx_proto

            # onnxruntime would read external data from anywhere and trust declared tensor sizes: check first
            read_onnx_proto(self.path)
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPT_LEVELS[optimization]
        options.log_severity_level = 3
        if shared_threads:
            if not shared_thread_pool(threads):
                raise DlcError(f"this process's shared thread pool has {_shared_pool[0] if _shared_pool else '?'} "
                               f"threads, not {threads}: time models of another thread count in a new process")
            options.use_per_session_threads = False
        else:
            if threads:
                options.intra_op_num_threads = threads
            if spinning is not None:
                options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.thread_pool = "shared" if shared_threads else "own"
        # which provider runs each node (onnxruntime 1.23+): partial fallback to the CPU is otherwise silent
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")

        available = set(ort.get_available_providers())
        wanted = [p for p in DEVICES[device] if p in available]
        why_not_gpu = None
        if not gpu_present() and any(p in _GPU_PROVIDERS for p in wanted):
            why_not_gpu = "no NVIDIA GPU on this machine"
            wanted = ["CPUExecutionProvider"]
        elif device != "cpu" and not (available & _GPU_PROVIDERS):
            why_not_gpu = f"the installed onnxruntime ({ort.__version__}) has no GPU providers"
        if any(p in _GPU_PROVIDERS for p in wanted):
            _preload_gpu_libraries()
        try:
            # A GPU provider whose libraries fail to load makes onnxruntime log an error and fall back to the
            # CPU; we detect the fallback below and explain it ourselves, so silence that log while we try.
            ort.set_default_logger_severity(4)
            self._session = ort.InferenceSession(model if isinstance(model, bytes) else self.path,
                                                 sess_options=options,
                                                 providers=provider_list(wanted, trt_fp16, trt_cache))
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
        self.placement = self._placement()
        if self.provider in _GPU_PROVIDERS and self.placement is None:
            self._probe_fallback(model, options, wanted)
        if self.provider in _GPU_PROVIDERS and self.placement:
            on_cpu = self.placement["nodes"].get("CPUExecutionProvider", 0)
            if on_cpu:
                where = ", ".join(f"{k.removesuffix('ExecutionProvider')} {v}"
                                  for k, v in self.placement["nodes"].items())
                name = Path(self.path).name if self.path else "the model"
                _say_once(f"dlc: {on_cpu} of {sum(self.placement['nodes'].values())} nodes of {name} run on the "
                          f"CPU, not the GPU (nodes per provider: {where}); {self.placement['memcpy']} Memcpy "
                          "nodes copy between host and device", logging.WARNING)

    def _probe_fallback(self, model, options: ort.SessionOptions, wanted: list[str]) -> None:
        """Before onnxruntime 1.23 there is no placement to read: a second session that may not fall back to the
        CPU (session.disable_cpu_ep_fallback) fails to load exactly when some nodes would run there."""
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:
            ort.InferenceSession(model if isinstance(model, bytes) else self.path, sess_options=options,
                                 providers=[p for p in wanted if p != "CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - the refusal is the answer
            _say_once(f"dlc: some nodes of {Path(self.path).name if self.path else 'the model'} run on the CPU, "
                      f"not on {self.provider} (this onnxruntime cannot say how many)", logging.WARNING)

    def _placement(self) -> dict[str, Any] | None:
        """Nodes per execution provider and the Memcpy nodes onnxruntime inserted between them; None where this
        onnxruntime cannot tell (before 1.23)."""
        get = getattr(self._session, "get_provider_graph_assignment_info", None)
        if get is None:
            return None
        try:
            subgraphs = get()
        except Exception:  # noqa: BLE001 - recording unsupported in this build
            return None
        nodes: dict[str, int] = {}
        memcpy = 0
        for sub in subgraphs:
            members = sub.get_nodes()
            nodes[sub.ep_name] = nodes.get(sub.ep_name, 0) + len(members)
            memcpy += sum(1 for n in members if n.op_type.startswith("Memcpy"))
        return {"nodes": nodes, "memcpy": memcpy}

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
        from dlc.compiler.metadata import METADATA_KEY, parse_metadata

        raw = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        return parse_metadata(raw, self.path or "<in-memory model>")  # JSON only; garbage is a DlcError

    # --- running ----------------------------------------------------------------------------------------
    def random_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the model's shapes and float type (float32, or float16 for an fp16 model without
        keep_io_types); a symbolic batch axis takes `batch`, symbolic spatial axes the size the model was
        built for (dlc's metadata), else `batch` too."""
        rng = np.random.default_rng(seed)
        feeds = {}
        meta = self.metadata or {}
        built = (meta.get("input") or {}).get("shape") or []  # per sample: C, H, W
        for arg in self.inputs:
            shape = [d if isinstance(d, int) and d >= 0 else batch for d in arg.shape]  # a fixed 0 stays 0
            if len(built) == len(shape) - 1:  # the first axis is the batch; the others follow the model's size
                shape = [shape[0], *(d if isinstance(d, int) and d >= 0 else int(b)
                                     for d, b in zip(arg.shape[1:], built))]
            dtype = _FLOAT_INPUTS.get(arg.type, np.float32)
            check_input(shape, 8, f"random input '{arg.name}'")  # standard_normal draws float64 first
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        return feeds

    def run(self, feeds: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run the model; a bare array feeds the single input. Returns {output name: array}."""
        if isinstance(feeds, np.ndarray):
            if len(self.inputs) != 1:
                raise DlcError(f"the model has {len(self.inputs)} inputs: pass a dict of arrays")
            feeds = {self.inputs[0].name: feeds}
        for arg in self.inputs:  # float32 images into an fp16-input model: cast rather than fail
            value = feeds.get(arg.name)
            want = _FLOAT_INPUTS.get(arg.type)
            if want is not None and isinstance(value, np.ndarray) and value.dtype != want and value.dtype.kind == "f":
                feeds = {**feeds, arg.name: value.astype(want)}
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
    """onnxruntime's reason, without its C++ location; a reason split over a few lines is joined."""
    from dlc.compiler.failures import ort_message

    lines = [line.strip() for line in ort_message(str(exc)).splitlines() if line.strip()]
    return "; ".join(lines[:3]) if lines else type(exc).__name__
