"""Self-contained bundles: `dlc package MODEL -o bundle.tar.gz` and `dlc verify bundle.tar.gz`.

A bundle runs on a device with onnxruntime, numpy and Pillow, and nothing of dlc:

    model.onnx                              the model (its dlc metadata says how to feed it and read it)
    model.ort                               the same in ORT format, for reduced (minimal) onnxruntime builds
    required_operators_and_types.config     the ops and types it uses: --include_ops_by_config of a minimal build
    labels.txt                              class names, one per line, in index order
    sample_input.npy, expected_output.npz   a parity sample: run.py --check proves the device computes the same
    run.py                                  preprocess -> model -> post-process, JSON out (compiler/bundle_run.py)
    manifest.json                           sha256 and size of every other file, format, inputs/outputs, metadata

Unpacking (verify) accepts only regular files with plain relative names: absolute paths, `..`, links and devices
are refused before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx

from . import __version__
from .atomic import write_bytes
from .errors import Diagnostic, DlcError

MANIFEST = "manifest.json"
PARITY_RTOL = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-2}  # relative to each output's scale
MAX_MEMBER_BYTES = 2 << 30


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _io(values) -> list[dict[str, Any]]:
    from .metadata import dtype_name, value_dims

    return [{"name": v.name, "shape": value_dims(v), "dtype": dtype_name(v.type.tensor_type.elem_type)}
            for v in values]


def _ort_files(model_bytes: bytes, work: Path) -> tuple[bytes, bytes]:
    """model.ort and the operators/types config from onnxruntime's converter (run as its own process: it is a
    command-line tool and prints as it goes)."""
    src = work / "convert" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(model_bytes)
    out = work / "ort"
    proc = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
                           "--output_dir", str(out), "--enable_type_reduction"],
                          capture_output=True, text=True, timeout=600)
    ort_file = out / "model.ort"
    configs = sorted(out.glob("*.config"))
    if proc.returncode != 0 or not ort_file.is_file() or not configs:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DlcError(f"onnxruntime's ORT-format converter failed: {last[0][:300]}")
    return ort_file.read_bytes(), configs[0].read_bytes()


def _sample(model: onnx.ModelProto, meta: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A deterministic sample input (image-like pixels through the model's normalisation) and its output on the
    installed onnxruntime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pre = meta.get("preprocessing") or {}
    h, w = (pre.get("resize") or {}).get("size") or meta["input"]["shape"][1:]
    c = meta["input"]["shape"][0]
    pixels = np.random.default_rng(0).integers(0, 256, (2, c, h, w)).astype(np.float32) / 255.0
    mean = np.asarray(pre.get("mean") or [0.0] * c, np.float32)[None, :, None, None]
    std = np.asarray(pre.get("std") or [1.0] * c, np.float32)[None, :, None, None]
    x = ((pixels - mean) / std).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    return x, dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))


def package(model_path: Path, output: Path, console=None) -> dict[str, Any]:
    """Write the bundle to `output` (atomically) and return its manifest."""
    from .metadata import read_metadata
    from .onnx_io import load_onnx

    model = load_onnx(model_path)
    meta = read_metadata(model, str(model_path))
    if not meta or "preprocessing" not in meta or "input" not in meta:
        raise DlcError(Diagnostic("a bundle needs dlc's metadata (input size, preprocessing, classes): this file "
                                  "has none, or an old schema", file=str(model_path),
                                  hint="package a model written by dlc compile/export/quantize, or dlc import "
                                  "then dlc export it"))
    if not str(output).endswith((".tar.gz", ".tgz")):
        raise DlcError(f"-o {output}: a bundle is a .tar.gz file")
    model_bytes = model_path.read_bytes()
    files: dict[str, bytes] = {"model.onnx": model_bytes}
    with tempfile.TemporaryDirectory(prefix="dlc-package-") as tmp:
        if console is not None:
            console.print("  converting to ORT format (onnxruntime.tools.convert_onnx_models_to_ort) ...",
                          highlight=False)
        files["model.ort"], files["required_operators_and_types.config"] = _ort_files(model_bytes, Path(tmp))
    classes = meta.get("classes") or []
    files["labels.txt"] = "".join(f"{c}\n" for c in classes).encode()
    x, expected = _sample(model, meta)
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    files["sample_input.npy"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, **expected)
    files["expected_output.npz"] = buf.getvalue()
    files["run.py"] = (Path(__file__).parent / "bundle_run.py").read_bytes()
    import onnxruntime

    precision = meta.get("precision") or "fp32"
    manifest = {
        "format": "dlc-bundle", "format_version": 1, "dlc_version": __version__,
        "packaged_with_onnxruntime": onnxruntime.__version__,
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in sorted(files.items())},
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": int(model.ir_version), "min_onnxruntime": meta.get("min_onnxruntime"),
        "precision": precision, "parity_rtol": PARITY_RTOL.get(precision, 1e-4),
        "inputs": _io(model.graph.input), "outputs": _io(model.graph.output),
        "metadata": meta,
    }
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(files[name]))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(output, buf.getvalue())
    return manifest


def safe_extract(bundle: Path, dest: Path) -> list[str]:
    """Unpack `bundle` into `dest`, refusing any member that is not a regular file (or folder) with a plain
    relative name. Everything is checked before anything is written."""
    try:
        tar = tarfile.open(bundle, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise DlcError(Diagnostic(f"not a readable bundle: {exc}", file=str(bundle))) from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DlcError(Diagnostic(f"corrupt bundle: {exc}", file=str(bundle))) from None
        for m in members:
            path = PurePosixPath(m.name)
            if m.name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or ":" in m.name:
                raise DlcError(Diagnostic(f"refused: member '{m.name[:200]}' has an absolute path or '..'",
                                          file=str(bundle)))
            if m.issym() or m.islnk():
                raise DlcError(Diagnostic(f"refused: member '{m.name[:200]}' is a link", file=str(bundle)))
            if not (m.isfile() or m.isdir()):
                raise DlcError(Diagnostic(f"refused: member '{m.name[:200]}' is a device, FIFO or other special "
                                          "file", file=str(bundle)))
            if m.size > MAX_MEMBER_BYTES:
                raise DlcError(Diagnostic(f"refused: member '{m.name[:200]}' is {m.size} bytes", file=str(bundle)))
        names = []
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            with open(target, "wb") as f:
                shutil.copyfileobj(src, f)
            names.append(m.name)
    return names


def verify(bundle: Path) -> dict[str, Any]:
    """Check every hash against the manifest, load the model in onnxruntime and run the parity sample."""
    import onnxruntime as ort

    from .targets import parse_version

    with tempfile.TemporaryDirectory(prefix="dlc-verify-") as tmp:
        root = Path(tmp)
        names = safe_extract(bundle, root)
        if MANIFEST not in names:
            raise DlcError(Diagnostic("no manifest.json: not a dlc bundle", file=str(bundle)))
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            listed = manifest["files"]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise DlcError(Diagnostic(f"manifest.json is not a dlc manifest: {exc}", file=str(bundle))) from None
        for name, entry in sorted(listed.items()):
            path = root / name
            if name not in names:
                raise DlcError(Diagnostic(f"{name} is listed in the manifest but missing", file=str(bundle)))
            data = path.read_bytes()
            if _sha256(data) != entry.get("sha256") or len(data) != entry.get("bytes"):
                raise DlcError(Diagnostic(f"{name}: its sha256 differs from the manifest's: the file was changed "
                                          "after packaging", file=str(bundle), hint="package the model again"))
        extra = sorted(set(names) - set(listed) - {MANIFEST})
        if extra:
            raise DlcError(Diagnostic(f"files not in the manifest: {', '.join(extra)[:300]}", file=str(bundle)))
        need = manifest.get("min_onnxruntime")
        have = ort.__version__
        if need and parse_version(have) < parse_version(need):
            raise DlcError(Diagnostic(f"the bundle needs onnxruntime {need} or newer (opset {manifest.get('opset')}, "
                                      f"IR {manifest.get('ir_version')}); this machine has {have}",
                                      file=str(bundle), hint=f"pip install 'onnxruntime>={need}'"))
        try:
            session = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
            ort_session = ort.InferenceSession(str(root / "model.ort"), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise DlcError(Diagnostic(f"onnxruntime cannot load the model: {str(exc)[:300]}",
                                      file=str(bundle))) from None
        x = np.load(root / "sample_input.npy", allow_pickle=False)
        expected = np.load(root / "expected_output.npz", allow_pickle=False)
        rtol = float(manifest.get("parity_rtol", 1e-4))
        worst: dict[str, float] = {}
        for label, s in (("model.onnx", session), ("model.ort", ort_session)):
            names_out = [o.name for o in s.get_outputs()]
            got = dict(zip(names_out, s.run(None, {s.get_inputs()[0].name: x})))
            for name in expected.files:
                want = expected[name].astype(np.float64)
                scale = float(np.abs(want).max(initial=0.0)) or 1.0
                err = float(np.abs(got[name].astype(np.float64) - want).max(initial=0.0)) / scale
                worst[f"{label}:{name}"] = err
                if not err <= rtol:
                    raise DlcError(Diagnostic(f"parity check failed: {label} output '{name}' differs from the "
                                              f"expected output by {err:.3g} of its scale (allowed {rtol:g})",
                                              file=str(bundle)))
    return {"bundle": str(bundle), "files": len(listed), "onnxruntime": have, "min_onnxruntime": need,
            "parity": {"rtol": rtol, "max_scaled_error": worst}}


def is_bundle(path: Path) -> bool:
    return str(path).endswith((".tar.gz", ".tgz"))


@contextmanager
def model_file(path: Path):
    """The ONNX file to run for `path`: itself, or for a bundle its verified model.onnx, unpacked for the
    duration of the block (dlc predict / eval --model accept bundles)."""
    if not is_bundle(path):
        yield path
        return
    verify(path)
    with tempfile.TemporaryDirectory(prefix="dlc-bundle-") as tmp:
        safe_extract(path, Path(tmp))
        yield Path(tmp) / "model.onnx"
