"""Data-parallel training on this machine: one process with every core against K MPI ranks sharing them, on the
same model and global batch, side by side in one run; the time each rank spends in the gradient allreduce; the
equivalence error between K ranks and one process with the global batch; and the peak memory of training on an
image folder 10× larger (data.load: lazy against memory).

    python benchmarks/scaling.py [--model examples/resnet20.yaml] [--batch 64] [--steps 20] [--ranks 2]
                                 [--part all|speed|memory] [--images 2000] [--json]

Each configuration is a `dlc train` (under `mpirun -n K` for K > 1) of a copy of the model's YAML limited to
--steps iterations, so its images/s is what a user gets (metrics.json; validation is not counted). The
allreduce time is rank 0's, waiting for slower ranks included. Needs the MPI extra: pip install -e ".[mpi]".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from dlc_cli import log  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

TINY = """model:
  name: tiny
  input: {shape: [3, 8, 8], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 4, kernel: 3, pad: 1}
    - {name: bn1, type: batchnorm}
    - {name: r1, type: relu}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 3}
data: {dataset: synthetic, samples: 240, num_classes: 3, seed: 1}
train: {base_lr: 0.05, batch_size: BATCH, epochs: 3, seed: 5, sync_bn: true}
"""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train(model: Path, out: Path, ranks: int, threads: int) -> dict:
    """One `dlc train` (mpirun -n ranks when ranks > 1) with `threads` kernel threads per rank; its metrics.json."""
    dlc = str(BIN / "dlc")
    cmd = [dlc, "train", str(model), "-o", str(out), "--json"]
    if ranks > 1:
        mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
        if mpirun is None:
            raise SystemExit('mpirun not found: pip install -e ".[mpi]"')
        cmd = [mpirun, "-n", str(ranks), "--oversubscribe", *cmd]
    env = {**os.environ, **MPI_ENV, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log(proc.stdout[-2000:] + proc.stderr[-2000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return json.loads((out / "metrics.json").read_text())


def limited_copy(model: Path, folder: Path, batch: int, steps: int, name: str, **train) -> Path:
    spec = yaml.safe_load(model.read_text())
    spec["train"].update(batch_size=batch, max_iter=steps, **train)
    spec["train"].pop("epochs", None)
    spec["train"].pop("early_stopping", None)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


ALLREDUCE = """import sys, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
buf = np.ones(int(sys.argv[1]) // 4, np.float32)
times = []
for _ in range(30):
    comm.Barrier()
    t = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    times.append(time.perf_counter() - t)
if comm.rank == 0:
    print(1e3 * float(np.median(times[5:])))
"""


def allreduce_alone(folder: Path, ranks: int, nbytes: int) -> float:
    """Median milliseconds of one allreduce of `nbytes` between `ranks` ranks that enter it together: the
    transport's cost, without the waiting for a slower rank that training adds."""
    script = folder / "allreduce.py"
    script.write_text(ALLREDUCE)
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    proc = subprocess.run([mpirun, "-n", str(ranks), "--oversubscribe", sys.executable, str(script), str(nbytes)],
                          env={**os.environ, **MPI_ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return float(proc.stdout.split()[-1])


def equivalence(folder: Path, ranks: int) -> float:
    """Largest difference, relative to each tensor's scale, between the weights of `ranks` ranks with batch 8 and
    one process with batch 8·ranks (sync_bn, so batch norm is over the same samples)."""
    from dlc.compiler.train.checkpoint import read_checkpoint

    one, many = folder / "eq1.yaml", folder / "eqk.yaml"
    one.write_text(TINY.replace("BATCH", str(8 * ranks)))
    many.write_text(TINY.replace("BATCH", "8"))
    train(one, folder / "eq1", 1, 1)
    train(many, folder / "eqk", ranks, 1)
    a = read_checkpoint(folder / "eq1" / "checkpoint.safetensors")[0]
    b = read_checkpoint(folder / "eqk" / "checkpoint.safetensors")[0]
    return max(float(np.abs(a[k] - b[k]).max() / max(float(np.abs(a[k]).max()), 1e-2)) for k in a)


FOLDER_MODEL = """model:
  name: folder
  input: {shape: [3, 32, 32], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 8, kernel: 3, pad: 1}
    - {name: r1, type: relu}
    - {name: p1, type: maxpool, kernel: 4, stride: 4}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 4}
data: {dataset: imagefolder, root: ROOT, load: LOAD, seed: 0}
train: {base_lr: 0.02, batch_size: 64, epochs: 1, seed: 0}
"""

PEAK = """import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if proc.returncode:
    sys.stderr.write(proc.stderr[-3000:])
    sys.exit(proc.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def write_folder(root: Path, count: int) -> None:
    """`count` synthetic 32×32 shape images as PNG files, one sub-folder per class, made 1,000 at a time."""
    from PIL import Image

    from dlc.compiler.data.synthetic import make_shapes

    done = 0
    while done < count:
        n = min(1000, count - done)
        images, labels, classes = make_shapes(n, 4, (3, 32, 32), seed=done)
        for i, (x, y) in enumerate(zip(images, labels)):
            folder = root / classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(folder / f"{done + i:06d}.png")
        done += n


def peak_rss_mb(model: Path, out: Path) -> tuple[float, float]:
    """(peak resident MB, seconds) of one `dlc train` in a fresh process (the peak of that child alone)."""
    import time

    helper = out.parent / "peak.py"
    helper.write_text(PEAK)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(helper), str(BIN / "dlc"), "train", str(model), "-o", str(out),
                           "--json"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return int(proc.stdout.split()[-1]) / 1024, time.perf_counter() - start


LOADS = ("lazy", "lazy, cache_mb: 0", "memory")  # the default cache (16 MB), no cache, everything decoded up front


def memory_part(folder: Path, small: int) -> list[dict]:
    rows = []
    for count in (small, 10 * small):
        root = folder / f"folder{count}"
        log(f"writing {count} PNG images to {root}")
        write_folder(root, count)
        for load in LOADS:
            model = folder / f"folder{count}_{load.split(',')[0]}{len(rows)}.yaml"
            model.write_text(FOLDER_MODEL.replace("ROOT", str(root)).replace("LOAD", load))
            rss, seconds = peak_rss_mb(model, folder / f"run{count}_{len(rows)}")
            log(f"  load: {load}: peak RSS {rss:.0f} MB, {seconds:.1f} s (1 epoch)")
            rows.append({"images": count, "load": load, "peak_rss_mb": rss, "seconds": seconds})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "resnet20.yaml")
    parser.add_argument("--batch", type=int, default=64, help="global batch (per rank: batch / K)")
    parser.add_argument("--steps", type=int, default=20, help="training iterations per configuration")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--part", choices=("all", "speed", "memory"), default="all")
    parser.add_argument("--images", type=int, default=2000, help="the smaller folder's images (the larger: 10×)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n, k = cores(), args.ranks
    if args.batch % k:
        raise SystemExit(f"--batch {args.batch} must divide into {k} ranks")
    result: dict = {"cores": n}
    with tempfile.TemporaryDirectory(prefix="dlc-scaling-") as tmp:
        if args.part in ("all", "memory"):
            result["memory"] = memory_part(Path(tmp), args.images)
        if args.part in ("all", "speed"):
            result.update(speed_part(Path(tmp), args, n, k))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "rows" in result:
        print_speed(result, args, k)
    if "memory" in result:
        m = {(r["images"], r["load"]): r for r in result["memory"]}
        small, big = args.images, 10 * args.images
        print(f"peak RSS of one epoch on an image folder ({small} vs {big} PNG images, 32×32):")
        for load in LOADS:
            a, b = m[small, load], m[big, load]
            print(f"  load: {load:<18} {a['peak_rss_mb']:7.0f} MB -> {b['peak_rss_mb']:7.0f} MB  "
                  f"({b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x; {a['seconds']:.1f} s / {b['seconds']:.1f} s)")
    return 0


def speed_part(folder: Path, args, n: int, k: int) -> dict:
    rows = []
    configs = [("1 process", 1, n, {}), (f"{k} ranks", k, max(1, n // k), {}),
               (f"{k} ranks, sync_bn", k, max(1, n // k), {"sync_bn": True})]
    for label, ranks, threads, extra in configs:
        model = limited_copy(args.model, folder, args.batch // ranks, args.steps, f"m{len(rows)}", **extra)
        log(f"{label}: {threads} thread(s) per rank, batch {args.batch // ranks} per rank, {args.steps} steps")
        metrics = train(model, folder / f"o{len(rows)}", ranks, threads)
        epochs = metrics["epochs"]
        seconds = sum(e["seconds"] for e in epochs)
        images = args.steps * args.batch
        d = metrics.get("distributed") or {}
        rows.append({"config": label, "ranks": ranks, "threads_per_rank": threads, "images_per_s": images / seconds,
                     "step_ms": 1e3 * seconds / args.steps, "allreduce_ms_per_step": d.get("allreduce_ms_per_step"),
                     "bytes_per_step": d.get("bytes_per_step")})
    error = equivalence(folder, k)
    alone = allreduce_alone(folder, k, rows[1]["bytes_per_step"])
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_1_process"] = r["images_per_s"] / base
        share = r["allreduce_ms_per_step"]
        r["allreduce_share"] = share / r["step_ms"] if share is not None else None
    return {"model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
            "global_batch": args.batch, "steps": args.steps, "rows": rows,
            "equivalence_max_rel_error": error, "allreduce_alone_ms": alone}


def print_speed(result: dict, args, k: int) -> None:
    n, rows, alone, error = result["cores"], result["rows"], result["allreduce_alone_ms"], \
        result["equivalence_max_rel_error"]
    print(f"{result['model']}, global batch {args.batch}, {args.steps} steps, {n} cores")
    print(f"{'config':<22}{'threads/rank':>13}{'images/s':>10}{'ratio':>7}{'step ms':>9}{'allreduce ms':>13}"
          f"{'share':>7}{'MB/step':>9}")
    for r in rows:
        ar = f"{r['allreduce_ms_per_step']:.2f}" if r["allreduce_ms_per_step"] is not None else "-"
        sh = f"{100 * r['allreduce_share']:.1f}%" if r["allreduce_share"] is not None else "-"
        mb = f"{r['bytes_per_step'] / 1e6:.2f}" if r["bytes_per_step"] else "-"
        print(f"{r['config']:<22}{r['threads_per_rank']:>13}{r['images_per_s']:>10.0f}{r['vs_1_process']:>6.2f}x"
              f"{r['step_ms']:>9.0f}{ar:>13}{sh:>7}{mb:>9}")
    print(f"one allreduce of {rows[1]['bytes_per_step'] / 1e6:.2f} MB between {k} ranks entering together: "
          f"{alone:.3f} ms (the rest of the allreduce column is waiting for the slower rank)")
    print(f"equivalence ({k} ranks × batch 8 vs 1 process × batch {8 * k}, sync_bn): max relative error {error:.2e}")


if __name__ == "__main__":
    sys.exit(main())
