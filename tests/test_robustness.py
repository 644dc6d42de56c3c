"""A fast seeded subset of the fuzz and fault suite (benchmarks/robustness.py runs the full one): mutated YAML,
ONNX files, checkpoints, images and detection data, a full disk, kill -9 while training (then the checkpoint reads
and --resume ends bit-for-bit where an uninterrupted run does), two writers into one folder and a NaN loss. No case
may end in a traceback, a hang, a crash or a memory blow-up; faults must not leave corrupt files behind."""

import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import robustness_cases as rc  # noqa: E402

SEED = 2026
PER_CLASS = {"yaml": 40, "onnx": 28, "checkpoint": 16, "image": 20, "detection": 16}
FAULTS = ["disk_full_fsize", "disk_full_tmpfs", "kill9_train", "concurrent", "nan_loss"]
# Open bugs this subset finds in files other helpers own (reported with their reproducers); remove an entry when
# its fix lands, so that the case guards the fix.
KNOWN = {
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return rc.build_assets(tmp_path_factory.mktemp("robustness") / "assets")


def test_generator_is_deterministic(assets):
    for cls in rc.CLASSES:
        a, b = rc.make_case(cls, 3, SEED, assets), rc.make_case(cls, 3, SEED, assets)
        assert (a.what, a.argv, a.files.keys()) == (b.what, b.argv, b.files.keys())
        assert all(a.files[k] == b.files[k] for k in a.files if isinstance(a.files[k], (bytes, str)))
    assert rc.make_case("yaml", 3, SEED, assets).what != rc.make_case("yaml", 3, SEED + 1, assets).what


def test_classify_outcomes():
    assert rc.classify(0, "done", "", 1.0, 100)[0] == "ok"
    assert rc.classify(2, "error: m.yaml:3: bad", "", 1.0, 100)[0] == "clean"
    assert rc.classify(1, "error: internal error (KeyError: 'x')", "", 1.0, 100)[0] == "traceback"
    assert rc.classify(2, "Traceback (most recent call last):\nerror: x", "", 1.0, 100)[0] == "traceback"
    assert rc.classify(None, "", "Traceback ...\nValueError: x", 1.0, 100)[0] == "traceback"
    assert rc.classify(0, "", "", 25.0, 100)[0] == "hang"
    assert rc.classify(0, "", "", 1.0, 3000)[0] == "memory"
    assert rc.classify(2, "error: out of memory: ...", "", 1.0, 100)[0] == "memory"
    assert rc.classify(None, "", "", 1.0, 100, died="signal 11")[0] == "crash"


def test_fuzz_and_fault_subset(assets, tmp_path):
    cases = [rc.make_case(cls, i, SEED, assets) for cls, n in PER_CLASS.items() for i in range(n)]
    cases += [rc.make_case("fault", rc.FAULTS.index(kind), SEED, assets) for kind in FAULTS]
    outcomes = rc.run_cases(cases, tmp_path / "work", assets, workers=2, failures=tmp_path / "failures")
    assert len(outcomes) == len(cases)
    table = rc.summarize(outcomes)
    bad = [f"{o.case.ident} {o.kind}: {o.case.what[:100]} -> {' && '.join(o.commands)[:200]}: {o.reason[:300]}"
           for o in outcomes if o.kind not in ("ok", "clean")
           and not (o.case.ident in KNOWN and KNOWN[o.case.ident] in o.reason + o.output)]
    assert not bad, "\n".join(bad)
    for cls in PER_CLASS:  # each class exercises the error paths, and most also real work
        assert table[cls]["clean"] > 0, (cls, table[cls])
        assert table[cls]["ok"] > 0 or cls == "checkpoint", (cls, table[cls])  # a mutated checkpoint fails its sha256
    assert table["total"]["max_seconds"] < rc.CASE_SECONDS and table["total"]["max_rss_mb"] < rc.MAX_RSS_MB
    kill = next(o for o in outcomes if o.case.fault == "kill9_train")
    assert kill.kind == "ok" and any("--resume" in c for c in kill.commands), kill.commands  # resumed, same weights
