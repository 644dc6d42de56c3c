"""Bundles: dlc package writes everything a device needs, dlc verify checks it, run.py (with dlc unimportable)
gives what dlc predict gives, and unpacking refuses crafted archives."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from dlc.compiler.bundle import package, safe_extract, verify
from dlc.compiler.cli import app
from dlc.compiler.embed_nms import NmsSettings, embed_nms
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.frontend import load_model
from dlc.compiler.metadata import finalize_metadata, update_metadata
from dlc.compiler.pipeline import artifact_metadata
from dlc.runtime.predict import predict

from helpers import ROOT, randomize_weights

# run.py with dlc made unimportable: the bundle must need only onnxruntime, numpy and Pillow
NO_DLC = "import runpy, sys; sys.modules['dlc'] = None; sys.argv = ['run.py'] + sys.argv[1:]; " \
         "runpy.run_path('run.py', run_name='__main__')"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A fresh virtual environment that holds only onnxruntime, numpy and Pillow (linked from this one's
    site-packages, with their bundled libraries): no dlc, no onnx, no pip."""
    import importlib.util
    import os
    import venv

    root = tmp_path_factory.mktemp("bare") / "venv"
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for module in ("onnxruntime", "numpy", "PIL"):
        package_dir = Path(importlib.util.find_spec(module).submodule_search_locations[0])
        os.symlink(package_dir, site / package_dir.name)
        for libs in package_dir.parent.glob(f"{'pillow' if module == 'PIL' else module}.libs"):
            os.symlink(libs, site / libs.name)
    check = subprocess.run([str(python), "-c", "import onnxruntime, numpy, PIL\ntry:\n import dlc\nexcept ImportError:"
                            "\n print('bare')"], capture_output=True, text=True)
    assert check.stdout.strip() == "bare", check.stderr
    return python


def _model(tmp_path, example, name, seed=0, conf=None, embed=False):
    loaded = load_model(ROOT / f"examples/{example}.yaml")
    randomize_weights(loaded.graph, seed=seed, gain=1.5, bias_mean=0.0)
    model = to_onnx(loaded.graph, opset=17, metadata=artifact_metadata(loaded, None))
    if conf is not None:  # random weights score low: a threshold that keeps some boxes
        meta = json.loads(next(p.value for p in model.metadata_props if p.key == "dlc"))
        update_metadata(model, postprocess={**meta["postprocess"], "conf_threshold": conf})
    if embed:
        meta = json.loads(next(p.value for p in model.metadata_props if p.key == "dlc"))["postprocess"]
        model = embed_nms(model, NmsSettings(conf_threshold=meta["conf_threshold"], iou_threshold=meta["iou_threshold"],
                                             max_detections=meta["max_detections"]))
    finalize_metadata(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _images(tmp_path, n=4):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8)).save(folder / f"i{i}.png")
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def det_conf(tmp_path_factory):
    """A conf threshold that keeps a few boxes per image for the random-weight detector."""
    import onnxruntime as ort

    tmp = tmp_path_factory.mktemp("conf")
    path = _model(tmp, "tiny_detector", "raw", seed=3)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1.6, 1.6, (4, 3, 64, 64)).astype(np.float32)
    raw = s.run(None, {s.get_inputs()[0].name: x})[0]
    return float(np.quantile(raw[:, :, 4] * raw[:, :, 5:].max(2), 0.9))


@pytest.mark.parametrize("kind", ["lenet", "detector", "detector_nms"])
def test_bundle_runs_without_dlc_and_equals_dlc_predict(tmp_path, kind, det_conf, bare_python):
    if kind == "lenet":
        path = _model(tmp_path, "lenet5", kind)
    else:
        path = _model(tmp_path, "tiny_detector", kind, seed=3, conf=det_conf, embed=kind == "detector_nms")
    bundle = tmp_path / f"{kind}.tar.gz"
    manifest = package(path, bundle)
    assert set(manifest["files"]) == {"model.onnx", "model.ort", "required_operators_and_types.config",
                                      "labels.txt", "sample_input.npy", "expected_output.npz", "run.py"}
    assert manifest["opset"] == 17 and manifest["ir_version"] == 8 and manifest["min_onnxruntime"] == "1.12"
    assert manifest["metadata"]["model"] and manifest["inputs"][0]["shape"][0] == "batch"
    report = verify(bundle)
    assert report["files"] == 7
    device = tmp_path / "device"
    device.mkdir()
    safe_extract(bundle, device)
    images = _images(tmp_path)
    # in a fresh environment with only onnxruntime, numpy and Pillow
    check = subprocess.run([str(bare_python), "run.py", "--check"], cwd=device, capture_output=True, text=True)
    assert check.returncode == 0 and "parity check passed" in check.stdout, check.stderr
    run = subprocess.run([str(bare_python), "run.py", *map(str, images), "--json", str(tmp_path / "out.json")],
                         cwd=device, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = json.loads((tmp_path / "out.json").read_text())["results"]
    want, _ = predict(path, images, device="cpu")
    assert got == [r.to_dict() for r in want]
    if kind != "lenet":
        assert sum(len(r["detections"]) for r in got) > 0


def test_tampered_bundle_names_the_file(tmp_path):
    bundle = tmp_path / "b.tar.gz"
    package(_model(tmp_path, "lenet5", "m"), bundle)
    members = {}
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    members["model.onnx"] = members["model.onnx"][:-1] + bytes([members["model.onnx"][-1] ^ 1])
    _write_tar(bundle, [(name, data) for name, data in members.items()])
    with pytest.raises(DlcError, match="model.onnx: its sha256 differs"):
        verify(bundle)
    result = CliRunner().invoke(app, ["verify", str(bundle)])
    assert result.exit_code == 2 and "model.onnx" in result.output and "Traceback" not in result.output


def test_bundle_for_a_newer_runtime_says_which_versions(tmp_path):
    bundle = tmp_path / "b.tar.gz"
    package(_model(tmp_path, "lenet5", "m"), bundle)
    with tarfile.open(bundle) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(members["manifest.json"])
    manifest["min_onnxruntime"] = "9.4"
    members["manifest.json"] = json.dumps(manifest).encode()
    _write_tar(bundle, list(members.items()))
    with pytest.raises(DlcError, match=r"needs onnxruntime 9.4 or newer .* this machine has 1\."):
        verify(bundle)


def _write_tar(path, entries):
    """entries: (name, bytes) for regular files, or (TarInfo, None) for crafted members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries:
            if isinstance(name, tarfile.TarInfo):
                tar.addfile(name)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def _crafted(kind):
    info = tarfile.TarInfo({"abs": "/tmp/evil", "dotdot": "../evil", "deep": "a/../../evil"}.get(kind, "evil"))
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "model.onnx"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize("kind", ["abs", "dotdot", "deep", "symlink", "hardlink", "device", "fifo"])
def test_unpacking_refuses_crafted_archives_before_writing_anything(tmp_path, kind):
    bundle = tmp_path / "evil.tar.gz"
    info = _crafted(kind)
    entries = [("manifest.json", b"{}"), (info, None)] if info.type != tarfile.REGTYPE else \
        [("manifest.json", b"{}"), (info.name, b"x")]
    _write_tar(bundle, entries)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(DlcError, match="refused"):
        safe_extract(bundle, dest)
    assert list(dest.iterdir()) == []  # nothing written, not even the harmless member
    assert not (tmp_path / "evil").exists()


def test_package_refuses_a_model_without_dlc_metadata_and_a_corrupt_bundle(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(plain))
    result = CliRunner().invoke(app, ["package", str(plain), "-o", str(tmp_path / "b.tar.gz")])
    assert result.exit_code == 2 and "metadata" in result.output
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar at all")
    result = CliRunner().invoke(app, ["verify", str(junk)])
    assert result.exit_code == 2 and "junk.tar.gz" in result.output


def test_predict_and_eval_accept_a_bundle(tmp_path, det_conf):
    path = _model(tmp_path, "tiny_detector", "det", seed=3, conf=det_conf, embed=True)
    bundle = tmp_path / "det.tar.gz"
    package(path, bundle)
    images = _images(tmp_path)
    runner = CliRunner()
    a = runner.invoke(app, ["predict", str(bundle), *map(str, images), "-o", str(tmp_path / "a"), "--no-draw"])
    b = runner.invoke(app, ["predict", str(path), *map(str, images), "-o", str(tmp_path / "b"), "--no-draw"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    got = json.loads((tmp_path / "a/predictions.json").read_text())
    want = json.loads((tmp_path / "b/predictions.json").read_text())
    assert got["results"] == want["results"] and got["model"] == str(bundle)
    ev = runner.invoke(app, ["eval", "--model", str(bundle), "--data", str(ROOT / "examples/tiny_detector.yaml"),
                             "--json"])
    assert ev.exit_code == 0, ev.output


def test_provider_is_accepted_as_the_name_of_the_device_flag(tmp_path):
    path = _model(tmp_path, "lenet5", "m")
    ok = CliRunner().invoke(app, ["run", str(path), "--random", "--provider", "cpu", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["provider"] == "CPUExecutionProvider"
    bad = CliRunner().invoke(app, ["run", str(path), "--random", "--provider", "npu"])
    assert bad.exit_code == 2 and "npu" in bad.output


def test_run_py_names_images_it_cannot_read_and_exits_non_zero(tmp_path):
    bundle = tmp_path / "b.tar.gz"
    package(_model(tmp_path, "lenet5", "m"), bundle)
    device = tmp_path / "device"
    device.mkdir()
    safe_extract(bundle, device)
    good = _images(tmp_path, 2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run = subprocess.run([sys.executable, "-c", NO_DLC, str(good[0]), str(broken), str(good[1])], cwd=device,
                         capture_output=True, text=True)
    assert run.returncode == 1
    results = json.loads(run.stdout)["results"]
    assert [r["image"] for r in results if "error" in r] == [str(broken)]
    assert sum("top" in r for r in results) == 2


def test_tensorrt_options_fp16_and_an_engine_cache_in_the_given_folder(tmp_path):
    from dlc.runtime.session import Session, provider_list

    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    got = provider_list(wanted, trt_fp16=True, trt_cache=tmp_path / "trt")
    assert got[0] == ("TensorrtExecutionProvider", {
        "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "trt"),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(tmp_path / "trt")})
    assert got[1:] == wanted[1:] and (tmp_path / "trt").is_dir()
    assert provider_list(wanted) == wanted
    # on this machine (no GPU) auto still ends on the CPU, options or not
    s = Session(_model(tmp_path, "lenet5", "m"), device="auto", trt_fp16=True, trt_cache=tmp_path / "trt")
    assert s.provider == "CPUExecutionProvider"


def test_bench_io_binding_rows_beside_the_ordinary_ones(tmp_path):
    from dlc.runtime.bench import _bound_runner, bench
    from dlc.runtime.session import Session

    path = _model(tmp_path, "lenet5", "m")
    result = bench([path], batches=(1, 4), device="cpu", min_time_s=0.0, warmup=1, io_binding=True)
    assert [(r.model, r.batch) for r in result.rows] == [("m.onnx", 1), ("m.onnx (IO binding)", 1),
                                                         ("m.onnx", 4), ("m.onnx (IO binding)", 4)]
    assert all(r.runs >= 20 and r.min_ms > 0 for r in result.rows)
    # the bound run computes what the ordinary run computes
    s = Session(path, device="cpu")
    feeds = s.random_inputs(3, seed=1)
    binding = _bound_runner(s)(feeds)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], next(iter(s.run(feeds).values())), rtol=1e-6)


def test_session_reports_the_nodes_each_provider_runs(tmp_path):
    from dlc.runtime.session import Session

    path = _model(tmp_path, "tiny_detector", "d")
    s = Session(path, device="cpu", optimization="disable")
    graph_nodes = len(onnx.load(str(path)).graph.node)
    assert s.placement == {"nodes": {"CPUExecutionProvider": graph_nodes}, "memcpy": 0}
    result = CliRunner().invoke(app, ["run", str(path), "--random", "--provider", "cpu", "--json"])
    assert json.loads(result.output)["placement"]["nodes"]["CPUExecutionProvider"] > 0
