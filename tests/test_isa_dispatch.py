"""Kernel builds per instruction set (setup.py builds baseline, avx2 and avx512; dlc._C picks one at import):
the choice follows the CPU, DLC_ISA overrides it, and every build this machine can run passes the kernel tests
against the numpy references, not only the one the suite's own process uses."""

import os
import subprocess
import sys

import numpy as np
import pytest

import dlc._C as native
from dlc._C.batchnorm_ref import batchnorm_backward_ref, batchnorm_forward_train_ref
from dlc._C.conv_ref import conv2d_backward_ref, conv2d_forward_ref

from helpers import ROOT

KERNEL_TESTS = ["tests/test_kernels_conv.py", "tests/test_kernels_batchnorm.py", "tests/test_kernels_activation.py",
                "tests/test_kernels_activation_extra.py", "tests/test_kernels_pool.py", "tests/test_kernels_loss.py",
                "tests/test_boxes.py"]


def _python(code: str, isa: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DLC_ISA"}
    if isa is not None:
        env["DLC_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_the_best_runnable_build_is_chosen_and_names_every_module():
    features = native.cpu_features()
    runnable = native.runnable_builds()
    assert runnable[-1] == "baseline" and native.ISA == (os.environ.get("DLC_ISA") or runnable[0]) in runnable
    for build in runnable:
        assert all(features.get(f) for f in native.NEEDS[build])
    if features.get("AVX512_SKX") and features.get("AVX2"):
        assert "avx512" in runnable  # setup.py builds it on x86-64: a CPU that has it must get it
    for name in native.MODULES:
        module = sys.modules[f"dlc._C.{name}"]
        assert module is getattr(native, name) and module.__name__ == f"dlc._C.{native.ISA}.{name}"


@pytest.mark.parametrize("isa", native.BUILDS)
def test_dlc_isa_picks_a_build_or_falls_back_with_a_warning(isa):
    done = _python("import dlc._C, dlc._C.conv as k; print(dlc._C.ISA, k.__name__)", isa)
    assert done.returncode == 0, done.stderr
    chosen, module = done.stdout.split()
    if isa in native.runnable_builds():
        assert chosen == isa and module == f"dlc._C.{isa}.conv" and done.stderr == ""
    else:
        assert chosen == native.runnable_builds()[0] and f"DLC_ISA={isa} cannot run here" in done.stderr
    done = _python("import dlc._C; print(dlc._C.ISA)", "sse9")
    assert done.stdout.strip() == native.runnable_builds()[0] and "DLC_ISA=sse9 is not one of" in done.stderr


@pytest.mark.parametrize("isa", [b for b in native.runnable_builds() if b != native.ISA])
def test_kernel_tests_pass_on_every_other_build(isa):
    """The suite's process runs the chosen build's kernels everywhere; here the kernel tests run again on each
    other build this machine can run."""
    env = {**os.environ, "DLC_ISA": isa}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *KERNEL_TESTS], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_builds_agree_with_each_other_and_with_the_references():
    """The same random conv and batch-norm problems through every runnable build: each within the references'
    tolerances, elementwise parts (no reassociated sums) identical to the baseline build."""
    import importlib

    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 12, 15, 13)).astype(np.float32)
    w = (rng.standard_normal((20, 12, 3, 3)) * 0.2).astype(np.float32)
    dy = rng.standard_normal((4, 20, 15, 13)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 12).astype(np.float32)
    beta = rng.normal(0, 0.3, 12).astype(np.float32)
    geometry = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    ref_y = conv2d_forward_ref(x, w, None, *geometry, (15, 13))
    ref_dx, ref_dw, _ = conv2d_backward_ref(x, w, dy, *geometry, need_db=False)
    ref_bn = batchnorm_forward_train_ref(x, gamma, beta, 1e-5)
    ref_bn_back = batchnorm_backward_ref(x * 0.7, x, gamma, ref_bn[1], ref_bn[2])
    outputs = {}
    for build in native.runnable_builds():
        conv = importlib.import_module(f"dlc._C.{build}.conv")
        bn = importlib.import_module(f"dlc._C.{build}.batchnorm")
        y = conv.conv2d_forward(x, w, None, *geometry, (15, 13))
        dx, dw, _ = conv.conv2d_backward(x, w, dy, *geometry, need_db=False)
        forward = bn.batchnorm_forward_train(x, gamma, beta, 1e-5)
        back = bn.batchnorm_backward(x * 0.7, x, gamma, forward[1], forward[2])
        for got, want in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        for got, want in zip((*forward, *back), (*ref_bn, *ref_bn_back)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()))
        outputs[build] = (y, dx, dw, *forward, *back)
    base = outputs["baseline"]
    for out in outputs.values():
        for got, want in zip(out[:3], base[:3]):  # convolutions: the same OpenBLAS, the same copies
            np.testing.assert_array_equal(got, want)
