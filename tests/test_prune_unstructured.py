"""Unstructured (magnitude) pruning: mask selection, the GMP schedule, masks held by the solver while
fine-tuning, and the exported file's zeros and compressed size (compiler/prune/unstructured.py)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.frontend import load_model
from dlc.compiler.prune import (
    GradualPruner,
    MaskKeeper,
    apply_masks,
    compressed_size,
    gmp_sparsity,
    magnitude_masks,
    prunable_weights,
    sparsity_report,
)
from dlc.compiler.train.solver import Solver, SolverConfig
from dlc.compiler.train.trainer import Trainer

from helpers import load

LAYERS = """
- {name: c1, type: conv, out: 8, kernel: 3, pad: 1}
- {name: bn1, type: batchnorm}
- {name: r1, type: relu}
- {name: c2, type: conv, out: 6, kernel: 3, pad: 1, groups: 2}
- {name: t1, type: conv_transpose, out: 4, kernel: 2, stride: 2, pad: 0, groups: 2}
- {name: f, type: flatten}
- {name: fc1, type: linear, out: 10}
- {name: fc2, type: linear, out: 4}
"""


def graph(seed=0, scales=None):
    g = load(LAYERS, shape=(3, 6, 6)).graph
    rng = np.random.default_rng(seed)
    for key, w in prunable_weights(g).items():
        w[...] = rng.standard_normal(w.shape) * (scales or {}).get(key, 1.0)
    return g


def n_pruned(mask):
    return int((~mask).sum())


def expected(s, n):
    return int(math.floor(s * n + 0.5))


def filters_of(key, w):
    """The weights feeding each output channel, as rows."""
    if key.startswith("t1"):  # conv_transpose: C_in × (out/groups) × kh × kw, two groups
        c_in, per = w.shape[:2]
        half = c_in // 2
        return [w[gi * half:(gi + 1) * half, j].ravel() for gi in range(2) for j in range(per)]
    return [row.ravel() for row in w]


def test_layer_scope_exact_counts_and_smallest_magnitudes():
    g = graph()
    weights = prunable_weights(g)
    assert list(weights) == ["c1.weight", "c2.weight", "t1.weight", "fc1.weight", "fc2.weight"]
    masks = magnitude_masks(g, 0.7)
    assert list(masks) == list(weights)
    for key, m in masks.items():
        w = weights[key]
        assert m.dtype == bool and m.shape == w.shape
        assert n_pruned(m) == expected(0.7, w.size)
        assert np.abs(w[~m]).max() <= np.abs(w[m]).min()  # exactly the smallest are pruned
    before = {k: w.copy() for k, w in weights.items()}
    apply_masks(g, masks)
    for key, m in masks.items():
        assert np.all(weights[key][~m] == 0.0) and not np.signbit(weights[key][~m]).any()
        np.testing.assert_array_equal(weights[key][m], before[key][m])
    report = sparsity_report(g, masks)
    assert report["layers"]["c1.weight"]["zeros"] == report["layers"]["c1.weight"]["masked"] == expected(0.7, 216)
    total = sum(w.size for w in weights.values())
    assert report["prunable"]["weights"] == total
    assert report["prunable"]["zeros"] == sum(expected(0.7, w.size) for w in weights.values())
    assert "onnxruntime" in report["note"]


def test_global_threshold_matches_partition_reference():
    g = graph(scales={"fc1.weight": 0.5, "c1.weight": 2.0})
    weights = prunable_weights(g)
    flat = np.concatenate([np.abs(w.ravel()) for w in weights.values()])
    k = expected(0.6, flat.size)
    threshold = np.partition(flat, k - 1)[k - 1]
    masks = magnitude_masks(g, 0.6, scope="global")
    assert sum(n_pruned(m) for m in masks.values()) == k
    for key, m in masks.items():
        np.testing.assert_array_equal(m, np.abs(weights[key]) > threshold)
    # One threshold, so the small-weight layer loses more than the large-weight one.
    rate = {key: n_pruned(m) / m.size for key, m in masks.items()}
    assert rate["fc1.weight"] > 0.6 > 0.25 > rate["c1.weight"]


def test_overrides_by_name_and_pattern_and_skip():
    g = graph()
    weights = prunable_weights(g)
    masks = magnitude_masks(g, 0.5, layer_sparsity={"c1": 0.25, "fc*": 0.8, "fc2": 0.1}, skip=["c2"])
    assert "c2.weight" not in masks
    assert n_pruned(masks["c1.weight"]) == expected(0.25, 216)
    assert n_pruned(masks["fc1.weight"]) == expected(0.8, weights["fc1.weight"].size)
    assert n_pruned(masks["fc2.weight"]) == expected(0.1, 40)  # an exact name wins over the pattern
    assert n_pruned(masks["t1.weight"]) == expected(0.5, weights["t1.weight"].size)
    # Global scope: overridden layers are pruned layer-wise, the rest share one threshold.
    masks = magnitude_masks(g, 0.5, scope="global", layer_sparsity={"fc?": 0.9}, skip=["c*"])
    assert set(masks) == {"t1.weight", "fc1.weight", "fc2.weight"}
    assert n_pruned(masks["fc1.weight"]) == expected(0.9, weights["fc1.weight"].size)
    assert n_pruned(masks["t1.weight"]) == expected(0.5, weights["t1.weight"].size)


@pytest.mark.parametrize("kwargs, message", [
    ({"layer_sparsity": {"fc3": 0.5}}, "did you mean"),
    ({"skip": ["bn1"]}, "matches no prunable layer"),
    ({"scope": "net"}, "scope 'net' is unknown"),
    ({"sparsity": 1.0}, "must be in [0, 1)"),
    ({"layer_sparsity": {"c1": -0.1}}, "layer_sparsity['c1'] must be in [0, 1)"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    args = {"sparsity": 0.5, **kwargs}
    with pytest.raises(DlcError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        magnitude_masks(graph(), **args)


def test_masks_only_shrink():
    g = graph()
    weights = prunable_weights(g)
    first = magnitude_masks(g, 0.5)
    # Weights the first masks pruned become the largest: they must still stay pruned.
    for key, w in weights.items():
        w[~first[key]] = 100.0
    second = magnitude_masks(g, 0.75, existing=first)
    for key, m in second.items():
        assert not np.any(m & ~first[key])
        assert n_pruned(m) == expected(0.75, m.size)
    # A lower target than what is already pruned keeps everything pruned.
    third = magnitude_masks(g, 0.2, existing=second)
    for key in second:
        np.testing.assert_array_equal(third[key], second[key])


def test_no_filter_and_no_layer_pruned_entirely():
    g = graph(scales={"fc2.weight": 1e-6})  # fc2 is far smaller than everything else
    weights = prunable_weights(g)
    masks = magnitude_masks(g, 0.95, scope="global")
    assert n_pruned(masks["fc2.weight"]) == 40 - 4  # each of its 4 output rows keeps its largest weight
    for i, row in enumerate(weights["fc2.weight"]):
        assert masks["fc2.weight"][i, np.argmax(np.abs(row))]
    assert sum(n_pruned(m) for m in masks.values()) == expected(0.95, sum(w.size for w in weights.values()))
    masks = magnitude_masks(g, 0.99)
    for key, m in masks.items():
        w = np.where(m, 1.0, 0.0).astype(np.float32)
        kept = [int(np.count_nonzero(f)) for f in filters_of(key, w)]
        assert min(kept) >= 1, key
        assert n_pruned(m) == min(expected(0.99, m.size), m.size - len(kept))


def test_ties_are_broken_by_flat_index():
    g = graph()
    for w in prunable_weights(g).values():
        w[...] = 1.0
    a = magnitude_masks(g, 0.5)
    b = magnitude_masks(g, 0.5, scope="global")
    m = a["fc2.weight"]  # 4 × 10: row i protects its first entry, the 20 lowest other indices go
    want = np.ones(40, dtype=bool)
    others = [i for i in range(40) if i % 10 != 0]
    want[others[:20]] = False
    np.testing.assert_array_equal(m.ravel(), want)
    for key in a:
        np.testing.assert_array_equal(a[key], magnitude_masks(g, 0.5)[key])
    # Global: equal magnitudes everywhere, so the earliest layers' lowest indices go first.
    assert n_pruned(b["c1.weight"]) == 216 - 8 and n_pruned(b["fc2.weight"]) == 0


def test_gmp_schedule():
    assert gmp_sparsity(0, 10, 110, 0.1, 0.9) == 0.1
    assert gmp_sparsity(10, 10, 110, 0.1, 0.9) == 0.1
    assert gmp_sparsity(110, 10, 110, 0.1, 0.9) == 0.9
    assert gmp_sparsity(500, 10, 110, 0.1, 0.9) == 0.9
    values = [gmp_sparsity(t, 10, 110, 0.1, 0.9) for t in range(0, 130)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    for t in (20, 35, 60, 99):
        assert gmp_sparsity(t, 10, 110, 0.1, 0.9) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - (t - 10) / 100) ** 3)
    assert gmp_sparsity(60, 10, 110, 0.0, 0.8) == pytest.approx(0.7)  # 0.8 · (1 − 0.5³)


@pytest.mark.parametrize("solver", ["sgd", "nesterov", "adam", "adamw"])
def test_solver_masks_hold_under_decay_l1_and_momentum(solver):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    cfg = SolverConfig(solver="sgd" if solver == "nesterov" else solver, nesterov=solver == "nesterov",
                       weight_decay=0.1, l1=0.05, clip_grad_norm=1.0)
    s = Solver({"fc.weight": w, "fc.bias": b}, cfg)
    for _ in range(3):  # momentum builds up for every entry before the masks arrive
        s.step({"fc.weight": rng.standard_normal(w.shape).astype(np.float32),
                "fc.bias": rng.standard_normal(6).astype(np.float32)}, 0.1)
    mask = rng.random(w.shape) > 0.6
    before = w.copy()
    s.set_masks({"fc.weight": mask})
    assert np.all(w[~mask] == 0.0)
    for key, state in s.state.items():
        if key.endswith("fc.weight"):
            assert np.all(state[~mask] == 0.0)
    np.testing.assert_array_equal(w[mask], before[mask])
    for _ in range(5):
        s.step({"fc.weight": rng.standard_normal(w.shape).astype(np.float32),
                "fc.bias": rng.standard_normal(6).astype(np.float32)}, 0.1)
    assert np.all(w[~mask] == 0.0) and not np.signbit(w[~mask]).any()
    assert np.all(np.abs(w[mask] - before[mask]) > 0)
    # Pruned entries do not count in the returned gradient norm.
    grads = {"fc.weight": np.where(mask, 0.0, 10.0).astype(np.float32), "fc.bias": np.ones(6, np.float32)}
    assert s.step(grads, 0.0) == pytest.approx(math.sqrt(6))
    with pytest.raises(DlcError, match="'fc2.weight' names no trainable tensor"):
        s.set_masks({"fc2.weight": mask})
    s.set_masks(None)
    s.step({"fc.weight": np.ones(w.shape, np.float32)}, 0.1)
    assert np.all(w[~mask] != 0.0)


TINY = """
model:
  name: tiny
  input: {shape: [3, 16, 16], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 8, kernel: 3, pad: 1}
    - {name: bn1, type: batchnorm}
    - {name: r1, type: relu}
    - {name: p1, type: maxpool, kernel: 2}
    - {name: c2, type: conv, out: 8, kernel: 3, pad: 1}
    - {name: r2, type: relu}
    - {name: p2, type: maxpool, kernel: 2}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 4}
data: {dataset: synthetic, samples: 320, num_classes: 4, seed: 1}
train:
  base_lr: 0.02
  lr_policy: fixed
  batch_size: 32
  epochs: EPOCHS
  momentum: 0.9
  weight_decay: 0.001
  l1: 0.0001
  seed: 5
"""


def tiny(tmp_path, epochs):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("EPOCHS", str(epochs)))
    return load_model(path)


def test_mask_keeper_holds_zeros_while_fine_tuning(tmp_path):
    loaded = tiny(tmp_path, 1)
    g = loaded.graph
    masks = magnitude_masks(g, 0.8)
    before = {k: w.copy() for k, w in prunable_weights(g).items()}
    keeper = MaskKeeper(masks)
    trainer = Trainer(loaded, tmp_path / "out", progress=False, callbacks=[keeper])
    keeper.attach(trainer)
    trainer.run()
    for key, w in prunable_weights(g).items():
        assert np.all(w[~masks[key]] == 0.0), key
        assert n_pruned(masks[key]) == expected(0.8, w.size)
        assert np.all(w[masks[key]] != before[key][masks[key]]), key
        # The solver, not just the callback, holds them: no momentum builds up behind a pruned weight.
        assert np.all(trainer.solver.state[f"momentum/{key}"][~masks[key]] == 0.0), key
    assert sparsity_report(g)["prunable"]["zeros"] == sum(n_pruned(m) for m in masks.values())


def test_gradual_pruner_reaches_final_sparsity(tmp_path):
    loaded = tiny(tmp_path, 4)  # 8 iterations an epoch (256 training samples), 32 in all; pruning ends at 24
    g = loaded.graph

    class Recorder:
        def __init__(self):
            self.sparsity, self.fc = [], []

        def on_epoch_end(self, trainer, epoch):
            report = sparsity_report(trainer.graph)
            self.sparsity.append(report["prunable"]["sparsity"])
            self.fc.append(report["layers"]["fc.weight"]["zeros"])

    pruner, rec = GradualPruner(0.8, layer_sparsity={"fc": 0.4}, update_every=8), Recorder()
    trainer = Trainer(loaded, tmp_path / "out", progress=False, callbacks=[pruner, rec])
    trainer.run()
    assert trainer.iters_per_epoch == 8 and trainer.total_iters == 32
    assert pruner.end_iteration == 24
    assert [h["iteration"] for h in pruner.history] == [1, 8, 16, 24]
    targets = [h["target"] for h in pruner.history]
    assert targets == pytest.approx([gmp_sparsity(t, 0, 24, 0.0, 0.8) for t in (1, 8, 16, 24)])
    assert all(b > a for a, b in zip(targets, targets[1:]))
    assert targets[-1] == 0.8
    for key, w in prunable_weights(g).items():
        m = pruner.masks[key]
        assert n_pruned(m) == expected(0.4 if key == "fc.weight" else 0.8, w.size)
        assert np.all(w[~m] == 0.0)
    # The override ramps along the same curve (the epochs end after steps 8, 16, 24 and 32).
    assert rec.fc == [expected(gmp_sparsity(t, 0, 24, 0.0, 0.4), 512) for t in (8, 16, 24, 32)]
    assert len(rec.sparsity) == 4 and 0 < rec.sparsity[0] < rec.sparsity[1] < rec.sparsity[2]
    assert rec.sparsity[2] == rec.sparsity[3] == pytest.approx(sparsity_report(g)["prunable"]["sparsity"])


def test_gradual_pruner_continues_from_earlier_masks(tmp_path):
    loaded = tiny(tmp_path, 1)  # 8 iterations, pruning ends at 6 (75 %): too short for 8 updates, so every step
    g = loaded.graph
    earlier = magnitude_masks(g, 0.5)
    pruner = GradualPruner(0.9, initial_sparsity=0.5, masks=earlier)
    trainer = Trainer(loaded, tmp_path / "out", progress=False, callbacks=[pruner])
    pruner.attach(trainer)
    assert trainer.solver.masks is pruner.masks and sparsity_report(g)["prunable"]["zeros"] == sum(
        n_pruned(m) for m in earlier.values())
    trainer.run()
    assert pruner.update_every == 1 and [h["iteration"] for h in pruner.history] == [1, 2, 3, 4, 5, 6]
    assert [h["target"] for h in pruner.history] == pytest.approx([0.5 + 0.4 * (1 - (1 - t / 6) ** 3)
                                                                   for t in range(1, 7)])
    assert [h["sparsity"] for h in pruner.history] == sorted(h["sparsity"] for h in pruner.history)
    for key, w in prunable_weights(g).items():
        m = pruner.masks[key]
        assert not np.any(m & ~earlier[key])
        assert n_pruned(m) == expected(0.9, w.size) and np.all(w[~m] == 0.0)
    with pytest.raises(DlcError, match="end_iteration <= the run's 8 iterations"):
        GradualPruner(0.9, end_iteration=9).attach(trainer)
    with pytest.raises(DlcError, match="layer_sparsity key 'fc2' matches no prunable layer"):
        GradualPruner(0.9, layer_sparsity={"fc2": 0.5}).attach(trainer)
    with pytest.raises(DlcError, match="initial sparsity 0.5 is above the final sparsity 0.4"):
        GradualPruner(0.4, initial_sparsity=0.5)


@pytest.mark.parametrize("total, per_epoch, end, every", [(400, 10, 300, 10), (32, 8, 24, 3), (4, 4, 3, 1)])
def test_gradual_pruner_default_schedule(total, per_epoch, end, every):
    from types import SimpleNamespace

    g = graph()
    trainer = SimpleNamespace(graph=g, total_iters=total, iters_per_epoch=per_epoch,
                              solver=Solver(prunable_weights(g), SolverConfig()))
    pruner = GradualPruner(0.5)
    pruner.attach(trainer)
    assert (pruner.end_iteration, pruner.update_every) == (end, every)


def test_export_has_the_reported_zeros_and_compresses():
    g = load("""
    - {name: c1, type: conv, out: 16, kernel: 3, pad: 1}
    - {name: r1, type: relu}
    - {name: f, type: flatten}
    - {name: fc1, type: linear, out: 64}
    - {name: fc2, type: linear, out: 10}
    """, shape=(3, 8, 8)).graph
    rng = np.random.default_rng(0)
    for w in prunable_weights(g).values():
        w[...] = rng.standard_normal(w.shape) * 0.1
    dense = to_onnx(g).SerializeToString()
    masks = magnitude_masks(g, 0.9)
    apply_masks(g, masks)
    sparse = to_onnx(g).SerializeToString()
    report = sparsity_report(g, masks)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(sparse).graph.initializer}
    for key, layer in report["layers"].items():
        assert int((inits[key] == 0).sum()) == layer["zeros"] == layer["masked"] == n_pruned(masks[key])
    floats = [v for v in inits.values() if v.dtype == np.float32]
    assert sum(int((v == 0).sum()) for v in floats) == report["all"]["zeros"]
    assert sum(v.size for v in floats) == report["all"]["weights"]
    assert abs(len(sparse) - len(dense)) < 64  # the file itself does not shrink
    ratio = compressed_size(sparse) / compressed_size(dense)
    assert ratio < 0.35, ratio  # ~0.1 of the values are left, at ~4 bytes each plus the index cost
