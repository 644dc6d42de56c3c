"""Execution-provider choice: the provider that really runs is reported, and a missing GPU is a clear error."""

import logging

import numpy as np
import pytest

from dlc.compiler.errors import DlcError
from dlc.compiler.pipeline import compile_model
from dlc.runtime import Session
from dlc.runtime.session import gpu_present

from helpers import ROOT

pytestmark = pytest.mark.skipif(gpu_present(), reason="these tests describe a machine without a GPU")


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    return compile_model(ROOT / "examples/lenet5.yaml", tmp_path_factory.mktemp("lenet"), skip_train=True).onnx_path


def test_auto_falls_back_to_cpu_and_says_so_once(lenet, caplog):
    from dlc.runtime import session as session_module

    session_module._announced.clear()
    with caplog.at_level(logging.INFO, logger="dlc.runtime"):
        a = Session(lenet)
        Session(lenet)
    assert a.provider == "CPUExecutionProvider" and a.device == "cpu"
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["dlc: running on the CPU (no NVIDIA GPU on this machine)"]


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_asking_for_a_gpu_without_one_is_an_error(lenet, device):
    with pytest.raises(DlcError, match=f"device '{device}' was asked for but cannot run: no NVIDIA GPU"):
        Session(lenet, device=device)


def test_bad_device_and_bad_feed(lenet):
    with pytest.raises(DlcError, match="unknown device 'gpu'"):
        Session(lenet, device="gpu")
    s = Session(lenet, device="cpu")
    with pytest.raises(DlcError, match="could not run the model.*expected inputs: image"):
        s.run(np.zeros((1, 3, 28, 28), np.float32))
