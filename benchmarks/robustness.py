"""Fuzz and fault suite for `dlc`: thousands of mutated inputs and injected faults, each outcome classified.

    python benchmarks/robustness.py [--json] [--cases N] [--seed S] [--classes yaml,onnx,...] [--workers 2]
                                    [--minutes 25] [--out build/robustness]

Each case runs one `dlc` command (most in a pool of persistent worker processes through typer's CliRunner,
faults in real subprocesses) and ends as: ok (exit 0), clean (exit 2 with one `error:` line), traceback (exit 1
"internal error", any traceback), hang (over 20 s), crash (a signal or a dead worker), memory (peak RSS over
2 GB, or out of memory), wrong (a fault left a corrupt checkpoint/model, or --resume did not end where an
uninterrupted run does). Every case that is not ok or clean is kept with a reproducer under
OUT/failures/<case>/ (repro.sh, the input files, the output). The generator is benchmarks/robustness_cases.py,
shared with tests/test_robustness.py (a fast seeded subset).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from robustness_cases import CLASSES, OUTCOMES, ROOT, build_assets, make_case, run_cases, summarize  # noqa: E402

# Share of the cases per class in a full run (faults are slow: real subprocesses, several commands each).
WEIGHTS = {"yaml": 0.34, "onnx": 0.22, "checkpoint": 0.13, "image": 0.15, "detection": 0.13, "fault": 0.03}


def plan(total: int, classes: list[str]) -> dict[str, int]:
    weight = sum(WEIGHTS[c] for c in classes)
    counts = {c: max(1, round(total * WEIGHTS[c] / weight)) for c in classes}
    return counts


def interleave(counts: dict[str, int]):
    """Case numbers of every class, interleaved so that a run cut short by --minutes still covers each class."""
    order = {c: k for k, c in enumerate(counts)}
    items = sorted(((i / n, order[c], c, i) for c, n in counts.items() for i in range(n)))
    return [(c, i) for _, _, c, i in items]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the summary (and the failures) as JSON")
    ap.add_argument("--cases", type=int, default=2000, help="total cases (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", default=",".join(CLASSES), help=f"comma-separated, of {','.join(CLASSES)}")
    ap.add_argument("--workers", type=int, default=2, help="parallel workers (default 2)")
    ap.add_argument("--minutes", type=float, default=25.0, help="stop starting new cases after this long")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "robustness")
    args = ap.parse_args()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        ap.error(f"unknown classes {unknown}; choose from {', '.join(CLASSES)}")
    out = args.out.resolve()
    failures = out / "failures"
    if failures.exists():
        shutil.rmtree(failures)
    start = time.monotonic()
    assets = build_assets(out / "assets")
    counts = plan(args.cases, classes)
    cases = (make_case(cls, i, args.seed, assets) for cls, i in interleave(counts))
    done = {"n": 0}

    def progress(outcome, n):
        done["n"] = n
        if not args.json and (outcome.kind not in ("ok", "clean") or n % 100 == 0):
            mark = "" if outcome.kind in ("ok", "clean") else f"  {outcome.kind.upper()}: {outcome.reason[:160]}"
            print(f"[{n:5d} {time.monotonic() - start:6.0f} s] {outcome.case.ident} {outcome.case.what[:80]}{mark}",
                  file=sys.stderr, flush=True)

    outcomes = run_cases(list(cases), out / "work", assets, workers=args.workers, failures=failures,
                         deadline=start + args.minutes * 60, progress=progress)
    table = summarize(outcomes, classes)
    bad = [o for o in outcomes if o.kind not in ("ok", "clean")]
    result = {"seed": args.seed, "planned": sum(counts.values()), "ran": len(outcomes),
              "seconds": round(time.monotonic() - start, 1), "workers": args.workers,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "tmpfs": assets.tmpfs,
              "classes": table,
              "failures": [{"case": o.case.ident, "kind": o.kind, "what": o.case.what, "reason": o.reason,
                            "command": o.commands, "kept": str(failures / o.case.ident)} for o in bad]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        cols = ["cases", *OUTCOMES, "max_seconds", "max_rss_mb"]
        print(f"robustness: seed {args.seed}, {len(outcomes)} of {sum(counts.values())} cases in "
              f"{result['seconds']:.0f} s on {args.workers} workers (disk-full via "
              f"{'tmpfs and RLIMIT_FSIZE' if assets.tmpfs else 'RLIMIT_FSIZE'})")
        print(f"{'class':<11}" + "".join(f"{c:>12}" for c in cols))
        for cls, row in table.items():
            print(f"{cls:<11}" + "".join(f"{row[c]:>12}" for c in cols))
        for o in bad:
            print(f"{o.kind:<9} {o.case.ident}: {o.case.what[:100]}\n          {o.reason[:200]}\n          kept in "
                  f"{failures / o.case.ident}/repro.sh")
    return 1 if any(o.kind in ("traceback", "hang", "crash", "memory") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
