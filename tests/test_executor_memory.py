"""The executor asks glibc's malloc to keep freed activation blocks between training steps (keep_freed_memory):
applied once when training starts, never where the user tuned malloc or turned it off."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT

CODE = """
import numpy as np
from dlc.compiler.train import executor
from helpers import load
ex = executor.Executor(load('- {name: f, type: flatten}\\n- {name: fc, type: linear, out: 3}', shape=(1, 4, 4)).graph)
assert executor._HEAP_KEPT is None           # nothing before training
ex.forward(np.zeros((2, 1, 4, 4), np.float32))
assert executor._HEAP_KEPT is None           # nor for inference
ex.forward(np.zeros((2, 1, 4, 4), np.float32), train=True)
print(executor._HEAP_KEPT, executor.keep_freed_memory())
"""


def _run(**env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DLC_KEEP_HEAP"}
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT / "tests",
                          env={**base, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_keeps_freed_memory_unless_told_not_to():
    import ctypes

    glibc = hasattr(ctypes.CDLL(None), "mallopt")
    assert _run() == ([str(glibc)] * 2)
    assert _run(DLC_KEEP_HEAP="0") == ["False", "False"]
    assert _run(MALLOC_ARENA_MAX="2") == ["False", "False"]  # the user's own malloc settings win
