"""Fuzz and fault cases for `dlc`, shared by benchmarks/robustness.py (the full run) and tests/test_robustness.py
(a fast seeded subset): one generator, one runner, one way of classifying what happened.

A case is a `dlc` command line plus the files it reads, all inside one case folder (so a failure is reproduced
by copying that folder and running the command in it). The classes:

- yaml: mutations of examples/*.yaml and of two tiny training YAMLs (deleted, duplicated, renamed and retyped
  keys; huge, negative, NaN and inf numbers; 100k-character and unicode strings; deep nesting; truncation at a
  random byte; binary garbage; tabs) and hand-written hostile files (alias bombs, recursive aliases, Python tags)
  -> `dlc inspect`, `dlc compile --skip-train`, `dlc train`.
- onnx: mutations of models compiled from the examples and of tests/fixtures/torch_onnx/*.onnx (bit flips,
  truncation, initializer sizes, negative/zero/symbolic dims, external data with bad offsets and paths, removed
  nodes/inputs, wrong opsets, long node chains, bad metadata) -> info, run, optimize, import, predict, package.
- checkpoint: corrupt .safetensors from a tiny training (header, JSON metadata, tensor bytes, shapes, truncation)
  -> `dlc train --resume` and `dlc compile --weights`.
- image: corrupt PNG/JPEG/BMP/GIF (truncated, random bytes, empty, huge declared dimensions, a FIFO or a folder
  named x.png) -> `dlc predict`.
- detection: malformed COCO JSON and YOLO labels -> `dlc train`, `dlc eval --gt/--pred`, `dlc eval --model`.
- fault: a full disk (a small tmpfs when mount works, else RLIMIT_FSIZE), kill -9 while `dlc train` or
  `dlc compile` writes (then: no corrupt checkpoint/model, and --resume ends exactly where an uninterrupted
  run does), two writers into one output folder, a NaN loss, Ctrl-C.

Most cases run in a pool of persistent worker processes (typer's CliRunner in-process, a per-case alarm, the
peak RSS reset before each case); a worker that hangs or dies is replaced. Fault cases use real subprocesses.
Run this file with --worker to be such a worker.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FIXTURES = ROOT / "tests" / "fixtures" / "torch_onnx"
CLASSES = ("yaml", "onnx", "checkpoint", "image", "detection", "fault")
OUTCOMES = ("ok", "clean", "traceback", "hang", "crash", "memory", "wrong")
CASE_SECONDS = 20.0  # a command running longer is a hang
MAX_RSS_MB = 2048  # a command whose peak RSS is larger is a memory failure
WORKER_AS_BYTES = 12 << 30  # address-space cap of workers and subprocesses: protects the machine, not a target
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DLC_DEBUG": "0",
             "PYTHONWARNINGS": "ignore", "COLUMNS": "160"}

TINY_YAML = """\
model:
  name: tiny
  input: {shape: [1, 8, 8], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 4, kernel: 3, pad: 1}
    - {name: r1, type: relu}
    - {name: p1, type: maxpool, kernel: 2}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 3}
data: {dataset: synthetic, samples: SAMPLES, num_classes: 3, seed: 1}
train: {base_lr: LR, lr_policy: fixed, batch_size: 16, epochs: EPOCHS, seed: 0, snapshot_every: 1}
"""

DET_YAML = """\
model:
  name: tdet
  input: {shape: [3, 32, 32], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
    - {name: r1, type: relu}
    - {name: c2, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
    - {name: r2, type: relu}
    - {name: head, type: conv, out: 14, kernel: 1}
    - name: detect
      type: detect
      inputs: [head]
      classes: 2
      anchors: [[[8, 8], [14, 12]]]
      strides: [4]
DATA
train: {solver: adam, base_lr: 0.003, batch_size: 4, epochs: 1, seed: 0}
"""
COCO_DATA = "data: {dataset: coco, images: img, annotations: ann.json, val_fraction: 0.25}"
YOLO_DATA = "data: {dataset: yolo, root: ds, classes: [a, b], val_fraction: 0.25}"


def tiny_yaml(epochs: int = 2, samples: int = 96, lr: str = "0.05") -> str:
    return TINY_YAML.replace("EPOCHS", str(epochs)).replace("SAMPLES", str(samples)).replace("LR", lr)


# ---------------------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    cls: str
    ident: str  # e.g. yaml-0042
    what: str  # a short description of the mutation
    argv: list[str] = field(default_factory=list)  # dlc arguments, paths relative to the case folder
    files: dict[str, object] = field(default_factory=dict)  # relative path -> bytes | str | Path (a link) | FIFO | DIR
    fault: str | None = None  # a fault routine (real subprocesses) instead of one in-process command
    params: dict = field(default_factory=dict)


FIFO = object()
DIR = object()


def materialize(case: Case, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, content in case.files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is FIFO:
            os.mkfifo(path)
        elif content is DIR:
            path.mkdir(exist_ok=True)
        elif isinstance(content, Path):
            path.symlink_to(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        else:
            path.write_bytes(content)


# ---------------------------------------------------------------------------------------------------------------
# Assets: the small models, checkpoints and data sets the mutations start from (built once into a cache folder)


@dataclass
class Assets:
    root: Path
    lenet_onnx: Path
    tiny_onnx: Path
    det_onnx: Path
    tiny_run: Path  # checkpoint.safetensors (epoch 2 of 2) and snapshots/epoch_0001.safetensors
    det_dir: Path  # img/*.png, ann.json, ds/{images,labels}, coco.yaml, yolo.yaml
    ref_long: Path  # checkpoint of an uninterrupted tiny run of LONG_EPOCHS epochs (for kill -9 + resume)
    tmpfs: bool  # whether `mount -t tmpfs` works here


LONG_EPOCHS, LONG_SAMPLES = 30, 640
_ASSET_VERSION = "6"


def _cli(args: list[str], cwd: Path) -> None:
    """Run one dlc command in-process for the assets (the caller's process, so its imports are paid once)."""
    from typer.testing import CliRunner

    from dlc.compiler.cli import app

    old = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.chdir(old)
    if result.exit_code != 0:
        raise RuntimeError(f"building the robustness assets: dlc {' '.join(args)} failed:\n{result.output}")


def _det_dataset(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images, anns = [], []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for split in ("images", "labels"):
        (root / "ds" / split).mkdir(parents=True, exist_ok=True)
    for i in range(8):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        Image.fromarray(pixels).save(root / "ds" / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 32, "height": 32})
        box = [int(rng.integers(0, 12)), int(rng.integers(0, 12)), int(rng.integers(6, 16)), int(rng.integers(6, 16))]
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": box, "iscrowd": 0})
        cx, cy = (box[0] + box[2] / 2) / 32, (box[1] + box[3] / 2) / 32
        (root / "ds" / "labels" / f"{i}.txt").write_text(f"{i % 2} {cx:.4f} {cy:.4f} {box[2] / 32:.4f} "
                                                         f"{box[3] / 32:.4f}\n")
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "ann.json").write_text(json.dumps(doc))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in anns]
    (root / "dets.json").write_text(json.dumps(dets))
    (root / "coco.yaml").write_text(DET_YAML.replace("DATA", COCO_DATA))
    (root / "yolo.yaml").write_text(DET_YAML.replace("DATA", YOLO_DATA))


def _tmpfs_works(scratch: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    point = scratch / "tmpfs_probe"
    point.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(point)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(point)], capture_output=True)
    point.rmdir()
    return ok


def build_assets(cache: Path) -> Assets:
    """Build (once; kept in `cache` and reused while its version matches) the inputs the mutations start from."""
    cache = Path(cache).resolve()
    stamp = cache / "VERSION"
    a = Assets(cache, cache / "lenet/model.onnx", cache / "tiny_c/model.onnx", cache / "det/c/model.onnx",
               cache / "tiny_run", cache / "det", cache / "ref_long/checkpoint.safetensors", False)
    if not (stamp.is_file() and stamp.read_text() == _ASSET_VERSION):
        if cache.exists():
            shutil.rmtree(cache)
        cache.mkdir(parents=True)
        (cache / "tiny.yaml").write_text(tiny_yaml())
        (cache / "long.yaml").write_text(tiny_yaml(LONG_EPOCHS, LONG_SAMPLES))
        _cli(["compile", str(EXAMPLES / "lenet5.yaml"), "--skip-train", "-o", "lenet"], cache)
        _cli(["train", "tiny.yaml", "-o", "tiny_run", "--json"], cache)
        _cli(["compile", "tiny.yaml", "--weights", "tiny_run/checkpoint.safetensors", "-o", "tiny_c"], cache)
        # the reference of kill -9 + resume runs as the fault cases' processes do (results depend on the threads)
        subprocess.run(dlc_cmd(["train", "long.yaml", "-o", "ref_long", "--json"]), cwd=cache, env=child_env(),
                       check=True, capture_output=True)
        _det_dataset(cache / "det")
        _cli(["compile", "coco.yaml", "--skip-train", "-o", "c"], cache / "det")
        stamp.write_text(_ASSET_VERSION)
    a.tmpfs = _tmpfs_works(cache)
    return a


# ---------------------------------------------------------------------------------------------------------------
# Random values and tree mutations (YAML and JSON documents)

HUGE_INTS = [2**31, 2**32 + 1, 2**63, 2**64, -2**63 - 1, 10**30, 10**400]
SMALL_INTS = [0, -1, -2, 1, 2, 3, 7, -2**31]
FLOATS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, -0.0, 0.5, -0.5, 1e-30]
STRINGS = ["", " ", "x", "null", "~", "yes", "0x1F", "1e5", "../../../../etc/passwd", "/dev/zero", "/dev/stdin",
           "层🙂\u202e\u0000", "\ud800", "${HOME}", "%s%s%n", "a" * 100_000, "é" * 5000, "\t", "\n\n", "relu",
           "conv", "NaN", "inf", "[1, 2]", "{a: 1}", "*alias", "&anchor", "!!python/object:os.system"]
DEEP = "__DLC_DEEP__"  # replaced by deep flow nesting as text (PyYAML's dumper would recurse too deep itself)


def random_value(rng: random.Random, large: bool = True):
    pick = rng.random()
    if pick < 0.22:
        return rng.choice(HUGE_INTS if large else SMALL_INTS) if rng.random() < 0.6 else rng.choice(SMALL_INTS)
    if pick < 0.40:
        return rng.choice(FLOATS)
    if pick < 0.60:
        return rng.choice(STRINGS)
    if pick < 0.68:
        return rng.choice([True, False, None])
    if pick < 0.78:
        return [random_value(rng, large) for _ in range(rng.randint(0, 4))]
    if pick < 0.86:
        return {rng.choice(["a", "type", "name", "out", "shape", "<<"]): random_value(rng, large)}
    if pick < 0.92:
        return DEEP
    if pick < 0.96:
        return [rng.choice(SMALL_INTS)] * rng.choice([1000, 100_000])
    return rng.randint(-10**6, 10**6) if large else rng.randint(-5, 9)


def _paths(tree, prefix=()):
    """Every (container, key) in a nested dict/list tree."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.append((tree, k, prefix + (k,)))
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.append((tree, i, prefix + (i,)))
            out.extend(_paths(v, prefix + (i,)))
    return out


TYPO_KEYS = ["typ", "tpye", "kernal", "ouput", "inputs", "repeat", "blocks", "layers", "weights", "model", "data",
             "train", "prune", "optimize", "export", "shape", "classes", "name", "é", "", "null"]


def mutate_tree(tree, rng: random.Random, large: bool = True) -> str:
    """Apply one to three random edits to `tree` in place; return what was done."""
    done = []
    for _ in range(rng.randint(1, 3)):
        paths = _paths(tree)
        if not paths:
            break
        parent, key, where = rng.choice(paths)
        op = rng.choice(["delete", "retype", "retype", "retype", "rename", "insert", "swap", "dup"])
        label = ".".join(map(str, where))[:60]
        if op == "delete":
            del parent[key]
        elif op == "retype":
            parent[key] = random_value(rng, large)
        elif op == "rename" and isinstance(parent, dict):
            parent[rng.choice(TYPO_KEYS)] = parent.pop(key)
        elif op == "insert":
            if isinstance(parent, dict):
                parent[rng.choice(TYPO_KEYS)] = random_value(rng, large)
            else:
                parent.insert(rng.randint(0, len(parent)), random_value(rng, large))
        elif op == "swap":  # a mapping where a list was, and the other way round
            value = parent[key]
            parent[key] = list(value.values()) if isinstance(value, dict) else (
                {str(i): v for i, v in enumerate(value)} if isinstance(value, list) else [value])
        elif op == "dup" and isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(parent[key], allow_nan=True)))
        done.append(f"{op} {label}")
    return "; ".join(done)


def deep_text(rng: random.Random, flow: str = "yaml") -> str:
    n = rng.choice([150, 1000, 20_000])
    if flow == "json" or rng.random() < 0.5:
        return "[" * n + "1" + "]" * n
    return "{a: " * n + "1" + "}" * n


def mutate_text(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A byte-level edit of a text file."""
    op = rng.choice(["truncate", "flip", "garbage", "tab", "dupline", "delline", "bom", "nul", "crlf", "indent"])
    if not data:
        return os.urandom(0) + bytes(rng.randrange(256) for _ in range(64)), "garbage"
    if op == "truncate":
        return data[:rng.randrange(len(data))], op
    if op == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), op
    if op == "garbage":
        at = rng.randrange(len(data))
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 512))) + data[at:], op
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    if op == "tab":
        lines[i] = b"\t" + lines[i].lstrip(b" ")
    elif op == "dupline":
        lines.insert(i, lines[i])
    elif op == "delline":
        del lines[i]
    elif op == "bom":
        return b"\xef\xbb\xbf" + data, op
    elif op == "nul":
        lines[i] = lines[i] + b"\x00"
    elif op == "crlf":
        return data.replace(b"\n", b"\r\n"), op
    elif op == "indent":
        lines[i] = b" " * rng.choice([1, 3, 17]) + lines[i]
    return b"\n".join(lines), op


def _dump_yaml(tree, rng: random.Random) -> str:
    import yaml

    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=rng.random() < 0.5, width=rng.choice([80, 10**6]),
                          default_flow_style=rng.choice([False, None]))
    while DEEP in text:
        text = text.replace(DEEP, deep_text(rng), 1)
    return text


@functools.lru_cache(maxsize=1)
def hostile_yamls() -> list[tuple[str, str]]:
    """Hand-written hostile model files (name, text)."""
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
    lenet = (EXAMPLES / "lenet5.yaml").read_text()
    layer = "    - {name: c1, type: conv, out: 6, kernel: 5, pad: 2}\n"
    many = lenet.replace(layer, layer + "".join(f"    - {{name: r{i}, type: relu}}\n" for i in range(12_000)))
    block = ("model:\n  name: b\n  input: {shape: [3, 8, 8]}\n  blocks:\n    blk:\n      layers:\n"
             "        - {name: x, type: BLOCK}\n  layers:\n    - {name: l, type: blk, repeat: REPEAT}\n")
    return [
        ("billion_laughs", "model:\n  name: x\n" + "\n".join("  " + line for line in laughs.splitlines())
         + "\n  layers: *i\n"),
        ("laughs_top", laughs),
        ("recursive_alias_list", "model: &m\n  name: x\n  input: {shape: [1, 8, 8]}\n  layers: &l [*l]\n"),
        ("recursive_alias_map", "model: &m {name: x, input: {shape: [1, 8, 8]}, layers: [], self: *m}\n"),
        ("merge_bomb", "base: &b {type: relu}\nmodel:\n  name: x\n  input: {shape: [1, 8, 8]}\n  layers:\n"
         + "".join(f"    - {{<<: *b, name: r{i}}}\n" for i in range(50))),
        ("python_tag", "model: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n"),
        ("python_name", "model: !!python/name:os.system\n"),
        ("binary_tag", "model: !!binary aGVsbG8=\n"),
        ("set_tag", "model: !!set {a, b}\n"),
        ("deep_list", "model: " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ("deep_map", "model: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"),
        ("deep_block", "model:\n" + "".join(" " * i + "a:\n" for i in range(1, 3000)) + " " * 3000 + "b: 1\n"),
        ("many_layers", many),
        ("self_block", block.replace("BLOCK", "blk").replace("REPEAT", "2")),
        ("repeat_huge", block.replace("BLOCK", "relu").replace("REPEAT", "1000000000")),
        ("repeat_neg", block.replace("BLOCK", "relu").replace("REPEAT", "-3")),
        ("repeat_float", block.replace("BLOCK", "relu").replace("REPEAT", "2.5")),
        ("shape_huge", lenet.replace("[1, 28, 28]", "[1, 100000, 100000]")),
        ("shape_zero", lenet.replace("[1, 28, 28]", "[0, 28, 28]")),
        ("shape_neg", lenet.replace("[1, 28, 28]", "[1, -28, 28]")),
        ("out_huge", lenet.replace("out: 120", "out: 4000000000")),
        ("out_big_params", lenet.replace("out: 120", "out: 600000000")),
        ("kernel_zero", lenet.replace("kernel: 5, pad: 2", "kernel: 0, pad: 2")),
        ("stride_zero", lenet.replace("kernel: 5, pad: 2", "kernel: 5, pad: 2, stride: 0")),
        ("pad_huge", lenet.replace("pad: 2", "pad: 1000000000")),
        ("dilation_huge", lenet.replace("pad: 2", "pad: 2, dilation: 99999999")),
        ("lr_nan", lenet.replace("base_lr: 0.05", "base_lr: .nan")),
        ("lr_inf", lenet.replace("base_lr: 0.05", "base_lr: .inf")),
        ("epochs_huge", lenet.replace("epochs: 20", "epochs: 100000000000000000000")),
        ("batch_zero", lenet.replace("batch_size: 32", "batch_size: 0")),
        ("weights_devzero", lenet.replace("  name: lenet5\n", "  name: lenet5\n  weights: /dev/zero\n")),
        ("weights_dir", lenet.replace("  name: lenet5\n", "  name: lenet5\n  weights: /\n")),
        ("weights_parent", lenet.replace("  name: lenet5\n", "  name: lenet5\n  weights: ../../../../etc/passwd\n")),
        ("imagefolder_dev", lenet.replace("dataset: digits", "dataset: imagefolder\n  root: /dev")),
        ("long_name", lenet.replace("name: conv1", "name: " + "c" * 100_000)),
        ("unicode_names", lenet.replace("name: conv1", "name: \"卷积\u202e1\"").replace("inputs", "inputs")),
        ("dup_names", lenet.replace("name: relu2", "name: conv1")),
        ("dup_keys", lenet.replace("model:\n", "model:\n  name: a\n  name: b\n", 1)),
        ("tabs", lenet.replace("  ", "\t")),
        ("only_bom", "\ufeff"),
        ("empty", ""),
        ("null_doc", "~\n"),
        ("list_doc", "- 1\n- 2\n"),
        ("scalar_doc", "42\n"),
        ("multi_doc", lenet + "\n---\n" + lenet),
        ("huge_string_key", "model:\n  " + "k" * 200_000 + ": 1\n"),
        ("huge_int_literal", "model:\n  name: x\n  input: {shape: [" + "9" * 5000 + ", 8, 8]}\n  layers: []\n"),
        ("nan_shape", lenet.replace("[1, 28, 28]", "[.nan, 28, 28]")),
        ("inf_shape", lenet.replace("[1, 28, 28]", "[.inf, 28, 28]")),
        ("bool_shape", lenet.replace("[1, 28, 28]", "[true, 28, 28]")),
        ("null_layers", lenet.split("  layers:")[0] + "  layers: ~\n"),
        ("utf16", "\ufeffmodel: {name: x}".encode("utf-16").decode("latin-1")),
        ("control_chars", "model:\n  name: \"\x07\x1b[31mred\"\n"),
    ]


YAML_SOURCES = ["lenet5", "resnet20", "vgg_small", "inception_small", "mobilenet_small", "tiny_detector", "tiny"]


def yaml_case(i: int, rng: random.Random, assets: Assets) -> Case:
    import yaml

    ident = f"yaml-{i:04d}"
    hostile = hostile_yamls()
    if rng.random() < 0.15:
        name, text = hostile[rng.randrange(len(hostile))]
        cmd = rng.choice(["inspect", "inspect", "compile"])
        argv = ["inspect", "m.yaml"] if cmd == "inspect" else ["compile", "m.yaml", "--skip-train", "-o", "out"]
        return Case("yaml", ident, f"hostile {name} -> {cmd}", argv, {"m.yaml": text})
    source = rng.choice(YAML_SOURCES)
    text = tiny_yaml() if source == "tiny" else (EXAMPLES / f"{source}.yaml").read_text()
    cmd = rng.choices(["inspect", "compile", "train"], [0.55, 0.35, 0.10 if source == "tiny" else 0.0])[0]
    tree = yaml.safe_load(text)
    what = [source, cmd]
    if rng.random() < 0.8:
        what.append(mutate_tree(tree, rng, large=cmd == "inspect"))
        text = _dump_yaml(tree, rng)
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.35:
        data, op = mutate_text(data, rng)
        what.append(op)
    argv = {"inspect": ["inspect", "m.yaml"], "compile": ["compile", "m.yaml", "--skip-train", "-o", "out"],
            "train": ["train", "m.yaml", "-o", "out", "--json"]}[cmd]
    if rng.random() < 0.1:
        argv = ["--limit", rng.choice(["layers=5", "yaml_nodes=50", "yaml_depth=3", "param_bytes=100",
                                       "activation_elements=10", "yaml_bytes=100"])] + argv
        what.append("low limit")
    return Case("yaml", ident, " ".join(what), argv, {"m.yaml": data})


# ---------------------------------------------------------------------------------------------------------------
# ONNX


_chain_cache: dict[int, bytes] = {}


def identity_chain(n: int) -> bytes:
    if n not in _chain_cache:
        from onnx import TensorProto, helper

        nodes = [helper.make_node("Identity", [f"v{k}"], [f"v{k + 1}"]) for k in range(n)]
        graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("v0", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info(f"v{n}", TensorProto.FLOAT, [1, 4])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        _chain_cache[n] = model.SerializeToString()
    return _chain_cache[n]


def _onnx_sources(assets: Assets) -> list[Path]:
    return [assets.lenet_onnx, assets.tiny_onnx, assets.det_onnx] + sorted(FIXTURES.glob("*.onnx"))


def mutate_onnx(model, rng: random.Random, files: dict) -> str:
    """One structural edit of a ModelProto (in place); may add side files (external data) to `files`."""
    from onnx import TensorProto

    g = model.graph
    inits = list(g.initializer)
    ops = ["init_size", "neg_dim", "zero_dim", "huge_dim", "symbolic", "del_node", "del_input", "del_init",
           "opset", "no_opset", "op_type", "external", "attr", "dtype", "cycle", "metadata", "dup_output",
           "ir_version", "del_output"]
    op = rng.choice(ops)
    if op == "init_size" and inits:
        t = rng.choice(inits)
        if t.raw_data:
            t.raw_data = t.raw_data[:rng.randrange(len(t.raw_data))] if rng.random() < 0.7 else t.raw_data * 2
        else:
            t.dims.append(rng.choice([2, 1000]))
    elif op in ("neg_dim", "zero_dim", "huge_dim", "symbolic"):
        values = [v for v in list(g.input) + list(g.output) + list(g.value_info) if v.type.tensor_type.shape.dim]
        if op != "symbolic" and inits and rng.random() < 0.5:
            t = rng.choice(inits)
            if t.dims:
                t.dims[rng.randrange(len(t.dims))] = {"neg_dim": -3, "zero_dim": 0, "huge_dim": 2**40}[op]
        elif values:
            v = rng.choice(values)
            dims = v.type.tensor_type.shape.dim
            d = dims[rng.randrange(len(dims))]
            if op == "symbolic":
                for dd in dims:
                    dd.dim_param = rng.choice(["N", "height", "?", ""])
            else:
                d.dim_value = {"neg_dim": -1, "zero_dim": 0, "huge_dim": 2**40}[op]
    elif op == "del_node" and len(g.node):
        del g.node[rng.randrange(len(g.node))]
    elif op == "del_input" and len(g.input):
        del g.input[rng.randrange(len(g.input))]
    elif op == "del_output" and len(g.output):
        del g.output[rng.randrange(len(g.output))]
    elif op == "del_init" and inits:
        g.initializer.remove(rng.choice(inits))
    elif op == "opset" and len(model.opset_import):
        model.opset_import[0].version = rng.choice([0, 1, 6, 10, 25, 99999, -1])
    elif op == "no_opset":
        del model.opset_import[:]
    elif op == "op_type" and len(g.node):
        g.node[rng.randrange(len(g.node))].op_type = rng.choice(["NoSuchOp", "Loop", "If", "", "Conv", "Gemm",
                                                                 "Reshape", "NonMaxSuppression"])
    elif op == "external" and inits:
        t = rng.choice([t for t in inits if t.raw_data] or inits)
        t.ClearField("raw_data")
        del t.float_data[:]
        t.data_location = TensorProto.EXTERNAL
        location = rng.choice(["w.bin", "../../../../etc/passwd", "/etc/passwd", "/dev/zero", "missing.bin", "sub",
                               "w.bin\x00.txt", "", "."])
        entries = {"location": location}
        if rng.random() < 0.7:
            entries["offset"] = str(rng.choice([0, 3, 10**12, -5, "x"]))
        if rng.random() < 0.7:
            entries["length"] = str(rng.choice([4, 10**15, -1, 0]))
        for k, v in entries.items():
            e = t.external_data.add()
            e.key, e.value = k, v
        files["w.bin"] = bytes(rng.randrange(256) for _ in range(64))
        files["sub"] = DIR
        op = f"external {location!r} {entries.get('offset')} {entries.get('length')}"
    elif op == "attr":
        nodes = [n for n in g.node if n.attribute]
        if nodes:
            a = rng.choice(list(rng.choice(nodes).attribute))
            if a.ints:
                a.ints[rng.randrange(len(a.ints))] = rng.choice([-1, 0, 2**31, 10**9])
            elif a.HasField("i") or a.type == a.INT:
                a.i = rng.choice([-1, 0, 2**40])
            elif a.type == a.FLOAT:
                a.f = rng.choice([float("nan"), float("inf"), -1.0])
            else:
                a.name = rng.choice(["nonsense", ""])
    elif op == "dtype":
        target = rng.choice([rng.choice(inits)] if inits and rng.random() < 0.5 else list(g.input) or [None])
        if target is not None:
            if hasattr(target, "data_type"):
                target.data_type = rng.choice([0, TensorProto.STRING, TensorProto.DOUBLE, 999,
                                               TensorProto.FLOAT8E4M3FN, TensorProto.INT4])
            else:
                target.type.tensor_type.elem_type = rng.choice([0, TensorProto.STRING, TensorProto.INT64, 999])
    elif op == "cycle" and len(g.node) >= 2:
        first, last = g.node[0], g.node[len(g.node) - 1]
        if first.input and last.output:
            first.input[0] = last.output[0]
    elif op == "dup_output" and len(g.node) >= 2:
        g.node[1].output[0] = g.node[0].output[0]
    elif op == "ir_version":
        model.ir_version = rng.choice([0, 1, 3, 100, -1])
    elif op == "metadata":
        for p in list(model.metadata_props):
            if p.key == "dlc":
                p.value = rng.choice(["{", "[]", "null", '{"task": 5}', json.dumps({"schema_version": 999}),
                                      p.value.replace("classification", "detection"),
                                      p.value.replace('"shape": [', '"shape": [-1, '), "\x00" * 10, "1" * 100000,
                                      p.value[:len(p.value) // 2]])
                break
        else:
            p = model.metadata_props.add()
            p.key, p.value = "dlc", rng.choice(["{", '{"task": "detection"}', "[1]"])
    return op


def onnx_case(i: int, rng: random.Random, assets: Assets) -> Case:
    import onnx

    ident = f"onnx-{i:04d}"
    source = rng.choice(_onnx_sources(assets))
    data = source.read_bytes()
    files: dict[str, object] = {}
    what = [source.parent.name if source.name == "model.onnx" else source.stem]
    roll = rng.random()
    if roll < 0.05:
        n = rng.choice([3000, 20_000] + ([210_000] if rng.random() < 0.1 else []))
        data = identity_chain(n)
        what = [f"identity chain of {n}"]
    elif roll < 0.40:
        data, op = mutate_bytes(data, rng)
        what.append(op)
    else:
        model = onnx.load_from_string(data)
        what.append(mutate_onnx(model, rng, files))
        if rng.random() < 0.3:
            what.append(mutate_onnx(model, rng, files))
        data = model.SerializeToString()
    files["m.onnx"] = data
    img = _png(rng, 28, 28, "L" if "lenet" in what[0] else "RGB")
    files["x.png"] = img
    cmd = rng.choice(["info", "run", "optimize", "import", "predict", "info_json", "package"])
    argv = {"info": ["info", "m.onnx"], "info_json": ["info", "m.onnx", "--json"],
            "run": ["run", "m.onnx", "--random", "--runs", "1", "--device", "cpu"],
            "optimize": ["optimize", "m.onnx", "-o", "opt.onnx", "--check", "1"],
            "import": ["import", "m.onnx", "-o", "imp", "--check", "1"],
            "predict": ["predict", "m.onnx", "x.png", "-o", "pred", "--device", "cpu"],
            "package": ["package", "m.onnx", "-o", "b.tar.gz"]}[cmd]
    if rng.random() < 0.05:
        argv = ["--limit", "onnx_nodes=100"] + argv
    return Case("onnx", ident, " ".join(what + ["->", cmd]), argv, files)


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    op = rng.choice(["flip", "flip", "truncate", "garbage", "empty", "append", "zero_run", "non_utf8"])
    if op == "non_utf8":  # a letter of some name or string field becomes a byte that is not UTF-8
        letters = [i for i, c in enumerate(data) if 97 <= c <= 122]
        if letters:
            b = bytearray(data)
            b[rng.choice(letters)] = 0xFF
            return bytes(b), op
    if op == "flip":
        b = bytearray(data)
        n = rng.choice([1, 2, 8, 64])
        for _ in range(n):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip {n} bits"
    if op == "truncate":
        at = rng.randrange(len(data))
        return data[:at], f"truncate at {at}"
    if op == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.choice([1, 16, 4096]))), op
    if op == "empty":
        return b"", op
    if op == "append":
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 256))), op
    at = rng.randrange(len(data))
    return data[:at] + b"\x00" * rng.randint(1, 64) + data[at + 64:], op


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors: 8-byte little-endian header length, JSON header, tensor bytes)


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join_safetensors(header, body: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header, allow_nan=True).encode() if not isinstance(header, bytes) else header
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def mutate_checkpoint(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, body = _split_safetensors(data)
    if not isinstance(header, dict):
        return mutate_bytes(data, rng)
    names = [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]
    op = rng.choice(["hdr_len", "hdr_json", "hdr_trunc", "meta", "meta", "meta_json", "flip_tensor", "flip_tensor",
                     "shape", "dtype", "offsets", "drop_tensor", "rename_tensor", "truncate", "bytes", "nan_tensor",
                     "no_meta", "extra_tensor"])
    if op == "hdr_len":
        value = rng.choice([0, 1, 7, 2**63, 2**64 - 1, len(data), len(data) * 1000])
        return struct.pack("<Q", value) + data[8:], f"header length {value}"
    if op == "hdr_json":
        raw = data[8:8 + struct.unpack("<Q", data[:8])[0]]
        b = bytearray(raw)
        b[rng.randrange(len(b))] = rng.choice(b"{}[]\":,\x00\xff")
        return _join_safetensors(bytes(b), body, pad=False), op
    if op == "hdr_trunc":
        return _join_safetensors(json.dumps(header).encode()[:rng.randrange(20, 200)], body, pad=False), op
    if not isinstance(header.get("__metadata__", {}), dict):  # an earlier mutation broke it
        header["__metadata__"] = {}
    meta = header.setdefault("__metadata__", {})
    try:
        info = json.loads(meta.get("dlc", "{}"))
    except (TypeError, ValueError):
        info = {}
    info = info if isinstance(info, dict) else {}
    if op == "meta":
        key = rng.choice(sorted(info) or ["epoch"])
        info[key] = random_value(rng)
        if rng.random() < 0.3:
            info.pop(rng.choice(sorted(info)), None)
        meta["dlc"] = json.dumps(info, allow_nan=True)
        op = f"metadata {key}={str(info.get(key))[:30]!r}"
    elif op == "meta_json":
        meta["dlc"] = rng.choice(["{", "[]", "1", "null", '"x"', json.dumps(info)[:-3], "{\"epoch\": NaN}"])
    elif op == "no_meta":
        del header["__metadata__"]
    elif op in ("flip_tensor", "nan_tensor") and names:
        name = rng.choice(names)
        start, end = header[name]["data_offsets"]
        b = bytearray(body)
        end = min(end, len(b))  # an earlier edit may have cut the body short of the header's offsets
        if op == "nan_tensor" and end - start >= 4:
            at = start + 4 * rng.randrange((end - start) // 4)
            b[at:at + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), 3e38]))
        elif end > start:
            b[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        body = bytes(b)
        op = f"{op} {name}"
    elif op == "shape" and names:
        name = rng.choice(names)
        shape = header[name]["shape"]
        header[name]["shape"] = rng.choice([shape[::-1], shape + [1], [-1] + shape[1:], [2**40], [], [0]])
        op = f"shape {name} {header[name]['shape']}"
    elif op == "dtype" and names:
        header[rng.choice(names)]["dtype"] = rng.choice(["F64", "I64", "BOOL", "F16", "X9", "", 5])
    elif op == "offsets" and names:
        entry = header[rng.choice(names)]
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, end + 4], [start, 10**12], [-4, end], [start],
                                            [start + 1, end + 1], "x"])
        op = f"offsets {entry['data_offsets']}"
    elif op == "drop_tensor" and names:
        del header[rng.choice(names)]
    elif op == "rename_tensor" and names:
        header["other." + rng.choice(names)] = header.pop(rng.choice(names))
    elif op == "extra_tensor":
        header["extra.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    elif op == "truncate":
        out = _join_safetensors(header, body)
        return out[:rng.randrange(len(out))], op
    elif op == "bytes":
        return mutate_bytes(data, rng)
    return _join_safetensors(header, body), op


def checkpoint_case(i: int, rng: random.Random, assets: Assets) -> Case:
    ident = f"checkpoint-{i:04d}"
    source = rng.choice([assets.tiny_run / "checkpoint.safetensors",
                         assets.tiny_run / "snapshots" / "epoch_0001.safetensors"])
    data, op = mutate_checkpoint(source.read_bytes(), rng)
    if rng.random() < 0.2:
        data2, op2 = mutate_checkpoint(data, rng) if len(data) > 8 and _parses(data) else (data, "")
        data, op = data2, f"{op}; {op2}"
    files: dict[str, object] = {"m.yaml": tiny_yaml()}
    cmd = rng.choice(["resume", "resume", "weights", "weights_lenet"])
    if cmd == "resume":
        files["run/checkpoint.safetensors"] = data
        metrics = assets.tiny_run / "metrics.json"
        if metrics.is_file() and rng.random() < 0.5:
            files["run/metrics.json"] = metrics.read_bytes()
        argv = ["train", "m.yaml", "-o", "run", "--resume", "--json"]
    else:
        files["w.safetensors"] = data
        if cmd == "weights_lenet":
            files["lenet5.yaml"] = (EXAMPLES / "lenet5.yaml").read_text()
        model = "m.yaml" if cmd == "weights" else "lenet5.yaml"
        argv = ["compile", model, "--weights", "w.safetensors", "-o", "out"]
    return Case("checkpoint", ident, f"{source.stem} {op} -> {cmd}", argv, files)


def _parses(data: bytes) -> bool:
    try:
        _split_safetensors(data)
        return True
    except Exception:  # noqa: BLE001 - only a probe
        return False


# ---------------------------------------------------------------------------------------------------------------
# Images


def _png(rng: random.Random, w: int, h: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    import io

    import numpy as np
    from PIL import Image

    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode, 3)
    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, (h, w, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode="L" if channels == 1 else None)
    if mode in ("CMYK", "P", "I;16", "1", "LA"):
        image = image.convert(mode if mode != "I;16" else "I")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def huge_png(w: int, h: int, real: bool = False) -> bytes:
    """A PNG that declares w×h pixels; `real` gives it (compressed) pixel data for all of them."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    if real:
        comp = zlib.compressobj(9)
        row = b"\x00" * (w + 1)
        idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    else:
        idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


_bomb: list[bytes] = []


def huge_jpeg(rng: random.Random) -> bytes:
    data = bytearray(_png(rng, 16, 16, "RGB", "JPEG"))
    at = data.find(b"\xff\xc0")
    if at < 0:
        at = data.find(b"\xff\xc2")
    if at >= 0:
        data[at + 5:at + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def image_case(i: int, rng: random.Random, assets: Assets) -> Case:
    ident = f"image-{i:04d}"
    model = rng.choice([("lenet", assets.lenet_onnx, "L"), ("tiny", assets.tiny_onnx, "L"),
                        ("det", assets.det_onnx, "RGB")])
    files: dict[str, object] = {"m.onnx": model[1].read_bytes()}
    fmt = rng.choice(["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"])
    ext = {"JPEG": "jpg"}.get(fmt, fmt.lower())
    w, h = rng.choice([(28, 28), (1, 1), (3, 500), (640, 2), (32, 32), (100, 80)])
    mode = rng.choice(["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
    if fmt in ("GIF", "BMP", "WEBP") and mode in ("CMYK", "I;16", "LA"):
        mode = "RGB"
    if fmt == "JPEG" and mode in ("RGBA", "P", "I;16", "LA"):
        mode = "L"
    try:
        base = _png(rng, w, h, mode, fmt)
    except (OSError, ValueError, KeyError):
        base, ext = _png(rng, w, h, "RGB", "PNG"), "png"
    name = f"x.{ext}"
    kinds = ["valid", "truncate", "flip", "garbage", "empty", "huge_png", "huge_jpeg", "fifo", "folder", "text",
             "bomb", "missing", "symlink_loop", "mixed", "wrong_ext"]
    kind = rng.choice(kinds)
    if kind == "valid":
        files[name] = base
    elif kind in ("truncate", "flip", "garbage", "empty"):
        data, op = mutate_bytes(base, rng) if kind != "truncate" else (base[:rng.randrange(1, len(base))], "")
        files[name] = {"flip": data, "garbage": data, "empty": b"", "truncate": data}[kind]
    elif kind == "huge_png":
        name = "x.png"
        files[name] = huge_png(rng.choice([100_000, 2**31 - 1, 0, 70_000]), rng.choice([100_000, 1, 0, 2**31 - 1]))
    elif kind == "huge_jpeg":
        name = "x.jpg"
        files[name] = huge_jpeg(rng)
    elif kind == "fifo":
        name = "x.png"
        files[name] = FIFO
    elif kind == "folder":
        name = "x.png"
        files[name] = DIR
        if rng.random() < 0.5:
            files["x.png/inner.png"] = b"garbage"
    elif kind == "text":
        files[name] = "this is not an image\n" * rng.randint(1, 100)
    elif kind == "bomb":
        if not _bomb:
            _bomb.append(huge_png(10_000, 10_000, real=True))
        name = "bomb.png"
        files[name] = _bomb[0]
    elif kind == "missing":
        name = "missing.png"
    elif kind == "symlink_loop":
        name = "loop.png"
        files["loop.png"] = Path("loop2.png")
        files["loop2.png"] = Path("loop.png")
    elif kind == "mixed":
        files["good.png"] = _png(rng, 28, 28, "L")
        files[name] = base[:len(base) // 3]
        name = "."
    elif kind == "wrong_ext":
        name = "x.png"
        files[name] = base if ext != "png" else _png(rng, w, h, "RGB", "JPEG")
    argv = ["predict", "m.onnx", name, "-o", "pred", "--device", "cpu"]
    if rng.random() < 0.4:
        argv += ["--on-error", rng.choice(["skip", "stop", "stop", "skip", "bogus"])]
    if rng.random() < 0.2:
        argv += ["--batch", str(rng.choice([1, 3, 1000]))]
    if rng.random() < 0.2:
        argv += ["--no-draw"]
    if rng.random() < 0.05:
        argv = ["--limit", "image_pixels=10"] + argv
    return Case("image", ident, f"{model[0]} {kind} {fmt} {mode} {w}x{h}", argv, files)


# ---------------------------------------------------------------------------------------------------------------
# Detection data (COCO and YOLO)


COCO_HOSTILE = [
    ("negative_box", lambda d: d["annotations"][0].update(bbox=[-5, -5, -10, -10])),
    ("nan_box", lambda d: d["annotations"][0].update(bbox=[float("nan"), 1, 2, 3])),
    ("inf_box", lambda d: d["annotations"][1].update(bbox=[1, 1, float("inf"), 3])),
    ("huge_box", lambda d: d["annotations"][1].update(bbox=[1, 1, 1e300, 1e300])),
    ("string_box", lambda d: d["annotations"][0].update(bbox="1,2,3,4")),
    ("short_box", lambda d: d["annotations"][0].update(bbox=[1, 2])),
    ("no_bbox", lambda d: d["annotations"][0].pop("bbox")),
    ("unknown_cat", lambda d: d["annotations"][0].update(category_id=99)),
    ("cat_string", lambda d: d["annotations"][0].update(category_id="a")),
    ("unknown_image", lambda d: d["annotations"][0].update(image_id=12345)),
    ("no_images", lambda d: d.pop("images")),
    ("no_annotations", lambda d: d.pop("annotations")),
    ("no_categories", lambda d: d.pop("categories")),
    ("empty_categories", lambda d: d.update(categories=[])),
    ("images_dict", lambda d: d.update(images={"1": d["images"][0]})),
    ("file_parent", lambda d: d["images"][0].update(file_name="../../../../etc/passwd")),
    ("file_abs", lambda d: d["images"][0].update(file_name="/etc/hostname")),
    ("file_missing", lambda d: d["images"][0].update(file_name="nope.png")),
    ("file_dir", lambda d: d["images"][0].update(file_name=".")),
    ("file_devzero", lambda d: d["images"][0].update(file_name="/dev/zero")),
    ("file_null", lambda d: d["images"][0].update(file_name=None)),
    ("width_zero", lambda d: d["images"][0].update(width=0, height=0)),
    ("width_neg", lambda d: d["images"][0].update(width=-32)),
    ("width_huge", lambda d: d["images"][0].update(width=10**12, height=10**12)),
    ("dup_image_id", lambda d: d["images"][1].update(id=d["images"][0]["id"])),
    ("dup_cat", lambda d: d["categories"].append(dict(d["categories"][0]))),
    ("cat_no_name", lambda d: d["categories"][0].pop("name")),
    ("crowd_string", lambda d: d["annotations"][0].update(iscrowd="yes")),
    ("all_crowd", lambda d: [a.update(iscrowd=1) for a in d["annotations"]]),
    ("no_ann_for_all", lambda d: d.update(annotations=[])),
    ("top_list", lambda d: d.clear()),
]


def _det_files(assets: Assets, rng: random.Random, fmt: str) -> dict[str, object]:
    files: dict[str, object] = {}
    root = assets.det_dir
    if fmt == "coco":
        for p in sorted((root / "img").iterdir()):
            files[f"img/{p.name}"] = p
        files["m.yaml"] = (root / "coco.yaml").read_text()
    else:
        for p in sorted((root / "ds" / "images").iterdir()):
            files[f"ds/images/{p.name}"] = p
        for p in sorted((root / "ds" / "labels").iterdir()):
            files[f"ds/labels/{p.name}"] = p.read_bytes()
        files["m.yaml"] = (root / "yolo.yaml").read_text()
    return files


def mutate_coco(doc: dict, rng: random.Random) -> tuple[str, str]:
    """(JSON text, what) for a mutated COCO instances document."""
    roll = rng.random()
    if roll < 0.45:
        name, edit = COCO_HOSTILE[rng.randrange(len(COCO_HOSTILE))]
        edit(doc)
        what = name
    elif roll < 0.55:
        what = "deep nesting"
        text = json.dumps(doc)
        return text.replace('"annotations": [', '"annotations": [' + deep_text(rng, "json") + ", ", 1), what
    else:
        what = mutate_tree(doc, rng)
    text = json.dumps(doc, allow_nan=True)
    while f'"{DEEP}"' in text:
        text = text.replace(f'"{DEEP}"', deep_text(rng, "json"), 1)
    if rng.random() < 0.15:
        data, op = mutate_text(text.encode(), rng)
        return data.decode("utf-8", "replace"), f"{what}; {op}"
    return text, what


YOLO_LINES = ["0 0.5 0.5 0.2 0.2", "1 0.5 0.5 0.2", "0 0.5 0.5 0.2 0.2 0.9 7", "-1 0.5 0.5 0.2 0.2",
              "2 0.5 0.5 0.2 0.2", "99999999999999999999 0.5 0.5 0.2 0.2", "0 nan 0.5 0.2 0.2", "0 inf inf 1 1",
              "0 0.5 0.5 -0.2 -0.2", "0 5 5 2 2", "0 0.5 0.5 0 0", "a b c d e", "0.5 0.5 0.5 0.2 0.2", "", "   ",
              "\t0\t0.5\t0.5\t0.2\t0.2", "0,0.5,0.5,0.2,0.2", "0 1e400 0.5 0.2 0.2", "\x00\xff", "0 0.5 0.5 0.2 0.2 " * 500,
              "1 0.5 0.5 1e-30 1e-30"]


def detection_case(i: int, rng: random.Random, assets: Assets) -> Case:
    ident = f"detection-{i:04d}"
    cmd = rng.choice(["train_coco", "train_coco", "train_yolo", "train_yolo", "eval_files", "eval_files",
                      "eval_model"])
    fmt = "yolo" if cmd == "train_yolo" else "coco"
    files = _det_files(assets, rng, fmt)
    gt = json.loads((assets.det_dir / "ann.json").read_text())
    what = cmd
    if cmd == "train_yolo":
        labels = sorted(k for k in files if k.startswith("ds/labels/"))
        target = rng.choice(labels)
        roll = rng.random()
        if roll < 0.6:
            lines = [rng.choice(YOLO_LINES) for _ in range(rng.randint(1, 4))]
            files[target] = "\n".join(lines) + "\n"
            what += f" {target}: {lines[0][:40]!r}"
        elif roll < 0.75:
            files[target], op = mutate_text(files[target], rng)
            what += f" {op}"
        elif roll < 0.85:
            files[target] = DIR
            what += " label is a folder"
        else:
            files["m.yaml"] = files["m.yaml"].replace("classes: [a, b]", "classes: " + rng.choice(
                ["names.txt", "[]", "[a, a]", "missing.txt", "5", "[" + ", ".join("c" * 9000 for _ in range(3)) + "]"]))
            files["names.txt"] = rng.choice(["", "a\n", "a\nb\n", "\x00\xff", "a\n" * 5000])
            what += " classes"
        argv = ["train", "m.yaml", "-o", "run", "--json"]
    elif cmd == "train_coco" or cmd == "eval_model":
        text, op = mutate_coco(gt, rng)
        files["ann.json"] = text
        what += f" {op}"
        if cmd == "train_coco":
            argv = ["train", "m.yaml", "-o", "run", "--json"]
        else:
            files["m.onnx"] = assets.det_onnx.read_bytes()
            argv = ["eval", "--model", "m.onnx", "--data", "m.yaml", "--device", "cpu", "--json"]
    else:
        dets = json.loads((assets.det_dir / "dets.json").read_text())
        if rng.random() < 0.5:
            text, op = mutate_coco(gt, rng)
            files["gt.json"], files["dt.json"] = text, json.dumps(dets)
            what += f" gt {op}"
        else:
            files["gt.json"] = json.dumps(gt)
            wrapper = {"d": dets}
            if rng.random() < 0.4:
                name = rng.choice(["image_id", "category_id", "bbox", "score"])
                dets[rng.randrange(len(dets))][name] = random_value(rng)
                op = f"{name} retyped"
            else:
                op = mutate_tree(wrapper, rng)
            text = json.dumps(wrapper.get("d", wrapper), allow_nan=True)
            while f'"{DEEP}"' in text:
                text = text.replace(f'"{DEEP}"', deep_text(rng, "json"), 1)
            files["dt.json"] = text
            what += f" dt {op}"
        argv = ["eval", "--gt", "gt.json", "--pred", "dt.json", "--json"]
        if rng.random() < 0.2:
            argv += ["--plot", rng.choice(["pr.png", "sub/pr.png", "."])]
    return Case("detection", ident, what, argv, files)


# ---------------------------------------------------------------------------------------------------------------
# Faults (routines in the runner, below)

FAULTS = ["disk_full_fsize", "disk_full_tmpfs", "kill9_train", "kill9_compile", "concurrent", "nan_loss",
          "sigint_train"]


def fault_case(i: int, rng: random.Random, assets: Assets) -> Case:
    kind = FAULTS[i % len(FAULTS)]
    if kind == "disk_full_tmpfs" and not assets.tmpfs:
        kind = "disk_full_fsize"
    params = {"delay": round(rng.uniform(0.0, 1.2), 3), "limit": rng.choice([1, 600, 4096, 20_000, 120_000]),
              "command": rng.choice(["train", "compile", "predict"]), "writers": rng.choice(["train", "compile"])}
    files: dict[str, object] = {"m.yaml": tiny_yaml(), "long.yaml": tiny_yaml(LONG_EPOCHS, LONG_SAMPLES),
                                "nan.yaml": tiny_yaml(lr=rng.choice(["1.0e+12", "1.0e+30", "3.0e+38"])),
                                "x.png": _png(rng, 28, 28, "L"), "m.onnx": assets.lenet_onnx}
    return Case("fault", f"fault-{i:04d}", f"{kind} {params}", [], files, fault=kind, params=params)


MAKERS = {"yaml": yaml_case, "onnx": onnx_case, "checkpoint": checkpoint_case, "image": image_case,
          "detection": detection_case, "fault": fault_case}


def make_case(cls: str, i: int, seed: int, assets: Assets) -> Case:
    """Case number `i` of a class: the same seed, class and number always give the same case."""
    return MAKERS[cls](i, random.Random(f"{seed}/{cls}/{i}"), assets)


# ---------------------------------------------------------------------------------------------------------------
# Outcomes


@dataclass
class Outcome:
    case: Case
    kind: str  # one of OUTCOMES
    exit_code: int | None
    seconds: float
    rss_mb: float
    output: str
    reason: str = ""
    commands: list[str] = field(default_factory=list)  # what ran, for the reproducer


def classify(exit_code, output: str, exc_text: str, seconds: float, rss_mb: float, timed_out: bool = False,
             died: str = "") -> tuple[str, str]:
    """(outcome, reason) of one dlc command."""
    if died:
        return "crash", died
    if timed_out or seconds > CASE_SECONDS:
        return "hang", f"ran {seconds:.1f} s (limit {CASE_SECONDS:g} s)"
    if rss_mb > MAX_RSS_MB:
        return "memory", f"peak RSS {rss_mb:.0f} MB"
    if "out of memory" in output or "MemoryError" in exc_text:
        return "memory", "ran out of memory (a resource limit that should have refused the input first)"
    if exc_text:
        return "traceback", exc_text.strip().splitlines()[-1][:300]
    if "Traceback (most recent call last)" in output:
        return "traceback", "a traceback in the output"
    if exit_code == 1 or "internal error" in output:
        return "traceback", next((x for x in output.splitlines() if "internal error" in x), f"exit {exit_code}")[:300]
    if exit_code == 0:
        return "ok", ""
    if exit_code == 2 and ("error:" in output or "Error:" in output):
        return "clean", ""
    return "traceback", f"unexpected exit {exit_code}: {output.strip()[-200:]!r}"


# ---------------------------------------------------------------------------------------------------------------
# The worker process: runs dlc commands in-process, one JSON request per line on stdin


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that dlc's own `except Exception` does not turn it into a message."""


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(resettable: bool) -> float:
    if resettable:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_main() -> None:
    import logging

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # native libraries printing to fd 1 must not garble the protocol
    from typer.testing import CliRunner

    import dlc.compiler.pipeline  # noqa: F401 - imports paid once per worker, not per case
    import dlc.compiler.train.trainer  # noqa: F401
    import dlc.runtime.predict  # noqa: F401
    from dlc.compiler.cli import app

    def alarm(signum, frame):
        raise CaseTimeout()

    signal.signal(signal.SIGALRM, alarm)
    runner = CliRunner()
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        logging.root.handlers.clear()  # the CLI's basicConfig binds the stream of the case that ran first
        os.chdir(req["cwd"])
        resettable = _reset_peak()
        exc_text, timed_out, code, output = "", False, None, ""
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, req["timeout"])
        try:
            result = runner.invoke(app, req["argv"], catch_exceptions=True)
            signal.setitimer(signal.ITIMER_REAL, 0)
            code, output = result.exit_code, result.output
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                exc_text = "".join(traceback.format_exception(result.exception))
        except CaseTimeout:
            timed_out = True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - start
        proto.write(json.dumps({"exit": code, "output": output[-20000:], "exc": exc_text[-8000:],
                                "seconds": seconds, "rss_mb": _peak_mb(resettable), "timed_out": timed_out}) + "\n")
        os.chdir("/")
        if timed_out:  # whatever it left running (threads, half-done state) goes with this process
            break


def _limit_memory() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_AS_BYTES, WORKER_AS_BYTES))
    except (ValueError, OSError):
        pass


def child_env() -> dict:
    env = {**os.environ, **CHILD_ENV}
    env.pop("DLC_LIMITS", None)
    return env


class Worker:
    def __init__(self, log: Path):
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], cwd="/",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, bufsize=0,
                                     env=child_env(), preexec_fn=_limit_memory)
        self.buf = b""
        if self._read(120) is None:
            raise RuntimeError(f"a robustness worker did not start; see {log}")

    def _read(self, timeout: float):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    return b""
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def run(self, argv: list[str], cwd: Path, timeout: float) -> dict:
        try:
            self.proc.stdin.write((json.dumps({"argv": argv, "cwd": str(cwd), "timeout": timeout}) + "\n").encode())
        except BrokenPipeError:
            return {"died": "the worker was gone before the case started"}
        line = self._read(timeout + 15)
        if line is None:
            self.kill()
            return {"timed_out": True, "seconds": timeout + 15, "died": ""}
        if line == b"":
            code = self.proc.wait()
            return {"died": f"worker died ({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)})"}
        reply = json.loads(line)
        if reply.get("timed_out"):
            self.proc.wait(timeout=10)  # the worker exits after a timed-out case
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


# ---------------------------------------------------------------------------------------------------------------
# Real subprocesses (faults)


def dlc_cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "dlc.compiler.cli", *argv]


def _fsize_limit(limit: int):
    def setup():
        _limit_memory()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


class Proc:
    """A `dlc` subprocess whose output goes to a file and whose peak RSS comes from wait4."""

    def __init__(self, argv: list[str], cwd: Path, preexec=_limit_memory, tag: str = "p"):
        self.argv = argv
        self.start = time.perf_counter()
        # a pipe, not a file: RLIMIT_FSIZE would cut a file short (and the disk may be the full one)
        self.proc = subprocess.Popen(dlc_cmd(argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=child_env(), preexec_fn=preexec)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=lambda: self.chunks.extend(iter(
            lambda: self.proc.stdout.read1(65536), b"")), daemon=True)
        self.reader.start()
        self.code = None
        self.rss_mb = 0.0
        self.seconds = 0.0

    def wait(self, timeout: float = CASE_SECONDS) -> bool:
        """True when it ended within `timeout` (else it is killed)."""
        deadline = self.start + timeout
        while True:
            if self.proc.returncode is not None:  # already reaped (by a poll() while waiting for a file)
                self.code = self.proc.returncode
                self.seconds = time.perf_counter() - self.start
                return True
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.code = self.proc.returncode
                self.rss_mb = usage.ru_maxrss / 1024
                self.seconds = time.perf_counter() - self.start
                return True
            if time.perf_counter() > deadline:
                self.kill()
                self.seconds = time.perf_counter() - self.start
                return False
            time.sleep(0.02)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.code is None and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            if sig == signal.SIGKILL:
                _, status, usage = os.wait4(self.proc.pid, 0)
                self.proc.returncode = self.code = os.waitstatus_to_exitcode(status)
                self.rss_mb = usage.ru_maxrss / 1024
                self.seconds = time.perf_counter() - self.start

    def output(self) -> str:
        self.reader.join(10)
        self.proc.stdout.close()
        return b"".join(self.chunks).decode("utf-8", "replace")

    def result(self, ended: bool, expect_signal: int | None = None) -> tuple[str, str, str]:
        text = self.output()
        if not ended:
            return "hang", f"{' '.join(self.argv)}: ran over {CASE_SECONDS:g} s", text
        if self.code is not None and self.code < 0 and -self.code != expect_signal:
            return "crash", f"{' '.join(self.argv)}: died of signal {-self.code}", text
        if expect_signal and self.code == -expect_signal:
            return "ok", "", text
        kind, reason = classify(self.code, text, "", self.seconds, self.rss_mb)
        return kind, (f"{' '.join(self.argv)}: {reason}" if reason else ""), text


def _checkpoint_problem(path: Path) -> str:
    """'' when `path` is absent or a checkpoint dlc reads; else what is wrong."""
    if not path.exists():
        return ""
    from dlc.compiler.train.checkpoint import read_checkpoint

    try:
        read_checkpoint(path)
        return ""
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return f"{path.name} unreadable after the fault: {type(exc).__name__}: {str(exc)[:200]}"


def _onnx_problem(path: Path) -> str:
    if not path.exists():
        return ""
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path)))
        return ""
    except Exception as exc:  # noqa: BLE001
        return f"{path.name} corrupt after the fault: {type(exc).__name__}: {str(exc)[:200]}"


def _leftovers(folder: Path) -> str:
    if not folder.is_dir():
        return ""
    junk = [p.name for p in folder.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith(".tmp"))]
    return f"temporary files left behind: {junk[:5]}" if junk else ""


def _same_weights(a: Path, b: Path) -> str:
    import numpy as np

    from dlc.compiler.train.checkpoint import read_checkpoint

    pa, _, _, _ = read_checkpoint(a)
    pb, _, _, _ = read_checkpoint(b)
    for key, value in pa.items():
        if key not in pb or not np.array_equal(value, pb[key]):
            return f"resumed run differs from the uninterrupted one at {key}"
    return ""


def run_fault(case: Case, folder: Path, assets: Assets, worker_run) -> tuple[str, str, str, float, float, list]:
    """(outcome, reason, output, max seconds, max RSS MB, commands) of one fault routine."""
    p = case.params
    results = []  # (kind, reason, text, seconds, rss)
    commands: list[str] = []

    def sub(argv, preexec=_limit_memory, expect_signal=None, tag="p", timeout=CASE_SECONDS, ended=None):
        proc = Proc(argv, folder, preexec, tag)
        commands.append(" ".join(argv))
        return proc

    def finish(proc, ended, expect_signal=None):
        kind, reason, text = proc.result(ended, expect_signal)
        results.append((kind, reason, text, proc.seconds, proc.rss_mb))
        return kind

    def inproc(argv):
        commands.append(" ".join(argv))
        r = worker_run(argv, folder)
        results.append(r)
        return r[0]

    def train_until_checkpoint(delay):
        """`dlc train long.yaml` in a subprocess, left running until its first checkpoint exists, then `delay`
        seconds more (so that a signal lands at varied points of the run)."""
        proc = sub(["train", "long.yaml", "-o", "run"])
        ckpt = folder / "run/checkpoint.safetensors"
        deadline = time.perf_counter() + CASE_SECONDS
        while not ckpt.exists() and proc.proc.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        return proc, ckpt

    check = ""
    kind = case.fault
    if kind == "disk_full_fsize":
        argv = {"train": ["train", "m.yaml", "-o", "out"], "compile": ["compile", "m.yaml", "--skip-train", "-o", "out"],
                "predict": ["predict", "m.onnx", "x.png", "-o", "out"]}[p["command"]]
        proc = sub(argv, _fsize_limit(p["limit"]))
        finish(proc, proc.wait())
        commands[-1] = (f"(trap '' XFSZ; ulimit -f {max(1, p['limit'] // 1024)}; python -m dlc.compiler.cli "
                        f"{commands[-1]})")
        check = _leftovers(folder / "out") or _checkpoint_problem(folder / "out/checkpoint.safetensors") or \
            _onnx_problem(folder / "out/model.onnx")
    elif kind == "disk_full_tmpfs":
        mnt = folder / "mnt"
        mnt.mkdir()
        size = max(p["limit"], 8192)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                 capture_output=True).returncode == 0
        try:
            argv = {"train": ["train", "m.yaml", "-o", "mnt/out"],
                    "compile": ["compile", "m.yaml", "--skip-train", "-o", "mnt/out"],
                    "predict": ["predict", "m.onnx", "x.png", "-o", "mnt/out"]}[p["command"]]
            if mounted:
                inproc(argv)
                check = _leftovers(mnt / "out") or _checkpoint_problem(mnt / "out/checkpoint.safetensors") or \
                    _onnx_problem(mnt / "out/model.onnx")
            commands[-1:] = [f"mount -t tmpfs -o size={size} tmpfs mnt && dlc {c}" for c in commands[-1:]]
        finally:
            if mounted:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    elif kind == "kill9_train":
        proc, ckpt = train_until_checkpoint(p["delay"] * 0.3)
        proc.kill(signal.SIGKILL)
        finish(proc, True, expect_signal=signal.SIGKILL if proc.code == -9 else None)
        check = _checkpoint_problem(ckpt)  # (a kill -9 mid-write may leave a .tmp file: harmless, not checked)
        if not check:
            argv = ["train", "long.yaml", "-o", "run", "--resume"] if ckpt.exists() else ["train", "long.yaml", "-o",
                                                                                          "run"]
            if inproc(argv) == "ok":
                check = _same_weights(assets.ref_long, ckpt)
    elif kind == "kill9_compile":
        proc = sub(["compile", "m.yaml", "--skip-train", "-o", "out"])
        time.sleep(0.4 + p["delay"])
        proc.kill(signal.SIGKILL)
        finish(proc, True, expect_signal=signal.SIGKILL if proc.code == -9 else None)
        check = _onnx_problem(folder / "out/model.onnx")
        if not check:
            if inproc(["compile", "m.yaml", "--skip-train", "-o", "out"]) == "ok":
                check = _onnx_problem(folder / "out/model.onnx")
    elif kind == "concurrent":
        argv = ["train", "m.yaml", "-o", "out"] if p["writers"] == "train" else \
            ["compile", "m.yaml", "--skip-train", "-o", "out"]
        a, b = sub(argv, tag="a"), sub(argv, tag="b")
        ka, kb = finish(a, a.wait()), finish(b, b.wait())
        if ka == "ok" or kb == "ok":
            check = _checkpoint_problem(folder / "out/checkpoint.safetensors") or \
                _onnx_problem(folder / "out/model.onnx") or _leftovers(folder / "out")
        else:
            check = "" if "clean" in (ka, kb) and (ka, kb) != ("clean", "clean") else "neither writer finished"
    elif kind == "nan_loss":
        if inproc(["train", "nan.yaml", "-o", "out"]) == "ok":
            check = "a NaN loss was accepted (exit 0)"
        check = check or _checkpoint_problem(folder / "out/checkpoint.safetensors")
    elif kind == "sigint_train":
        proc, ckpt = train_until_checkpoint(p["delay"] * 0.2)
        proc.kill(signal.SIGINT)
        ended = proc.wait(CASE_SECONDS)
        kind_, reason, text = proc.result(ended)
        if ended and proc.code == 130 and "Traceback" not in text:
            kind_, reason = "ok", ""
        results.append((kind_, reason, text, proc.seconds, proc.rss_mb))
        check = _checkpoint_problem(ckpt)
        if not check and kind_ == "ok" and ckpt.exists():
            if inproc(["train", "long.yaml", "-o", "run", "--resume"]) == "ok":
                check = _same_weights(assets.ref_long, ckpt)
    order = {k: n for n, k in enumerate(["crash", "hang", "memory", "traceback", "wrong", "clean", "ok"])}
    worst = min(results, key=lambda r: order[r[0]]) if results else ("ok", "", "", 0.0, 0.0)
    outcome, reason = worst[0], worst[1]
    if check and outcome in ("ok", "clean"):
        outcome, reason = "wrong", check
    text = "\n----\n".join(r[2] for r in results)
    return (outcome, reason, text, max((r[3] for r in results), default=0.0),
            max((r[4] for r in results), default=0.0), commands)


# ---------------------------------------------------------------------------------------------------------------
# Running many cases


def _keep_failure(outcome: Outcome, folder: Path, failures: Path) -> None:
    dest = failures / outcome.case.ident
    if dest.exists():
        shutil.rmtree(dest)
    try:
        shutil.copytree(folder, dest / "case", symlinks=False, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("mnt"))
    except (OSError, shutil.Error):
        dest.mkdir(parents=True, exist_ok=True)
        for rel, content in outcome.case.files.items():  # FIFOs and loops: write what can be written
            if isinstance(content, (bytes, str)):
                target = dest / "case" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "replace"))
    commands = outcome.commands or [" ".join(outcome.case.argv)]
    script = "#!/bin/bash\n# " + outcome.case.what.replace("\n", " ")[:300] + f"\n# outcome: {outcome.kind}: " + \
        outcome.reason.replace("\n", " ")[:300] + "\ncd \"$(dirname \"$0\")/case\"\n" + "".join(
            f"{'' if c.startswith(('(', 'mount')) else 'python -m dlc.compiler.cli '}{c}\n" for c in commands)
    (dest / "repro.sh").write_text(script)
    (dest / "output.txt").write_text(outcome.output[-20000:])


def run_cases(cases, work: Path, assets: Assets, workers: int = 2, failures: Path | None = None,
              deadline: float | None = None, progress=None) -> list[Outcome]:
    """Run `cases` (an iterable of Case) over `workers` threads, each owning a worker process; fault cases run
    their own subprocesses. Keeps each failure's folder under `failures`; stops taking new cases after `deadline`
    (time.monotonic())."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    todo: queue.Queue = queue.Queue()
    for case in cases:
        todo.put(case)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def thread_main(n: int) -> None:
        log = work / f"worker{n}.log"
        worker = [None]

        def ensure():
            if worker[0] is None or not worker[0].alive():
                worker[0] = Worker(log)
            return worker[0]

        def worker_run(argv, folder):
            reply = ensure().run(argv, folder, CASE_SECONDS)
            kind, reason = classify(reply.get("exit"), reply.get("output", ""), reply.get("exc", ""),
                                    reply.get("seconds", 0.0), reply.get("rss_mb", 0.0),
                                    reply.get("timed_out", False), reply.get("died", ""))
            text = reply.get("output", "") + reply.get("exc", "")
            if not worker[0].alive():
                worker[0] = None
            return kind, reason, text, reply.get("seconds", 0.0), reply.get("rss_mb", 0.0)

        try:
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    return
                try:
                    case = todo.get_nowait()
                except queue.Empty:
                    return
                folder = work / "cases" / case.ident
                if folder.exists():
                    subprocess.run(["umount", "-l", str(folder / "mnt")], capture_output=True)
                    shutil.rmtree(folder, ignore_errors=True)
                try:
                    materialize(case, folder)
                    if case.fault:
                        kind, reason, text, secs, rss, cmds = run_fault(case, folder, assets, worker_run)
                    else:
                        kind, reason, text, secs, rss = worker_run(case.argv, folder)
                        cmds = [" ".join(case.argv)]
                except Exception:  # noqa: BLE001 - a bug of this harness is reported, not hidden
                    kind, reason, text, secs, rss, cmds = ("crash", "harness error: " + traceback.format_exc()[-500:],
                                                          "", 0.0, 0.0, [" ".join(case.argv)])
                outcome = Outcome(case, kind, None, secs, rss, text, reason, cmds)
                if failures is not None and kind not in ("ok", "clean"):
                    _keep_failure(outcome, folder, Path(failures))
                shutil.rmtree(folder, ignore_errors=True)
                with lock:
                    outcomes.append(outcome)
                    if progress:
                        progress(outcome, len(outcomes))
        finally:
            if worker[0] is not None:
                worker[0].close()

    threads = [threading.Thread(target=thread_main, args=(n,), daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(outcomes, key=lambda o: o.case.ident)


def summarize(outcomes: list[Outcome], classes=CLASSES) -> dict:
    table = {}
    for cls in classes:
        rows = [o for o in outcomes if o.case.cls == cls]
        entry = {"cases": len(rows)}
        for kind in OUTCOMES:
            entry[kind] = sum(o.kind == kind for o in rows)
        entry["max_seconds"] = round(max((o.seconds for o in rows), default=0.0), 2)
        entry["max_rss_mb"] = round(max((o.rss_mb for o in rows), default=0.0), 1)
        table[cls] = entry
    total = {"cases": len(outcomes), **{k: sum(t[k] for t in table.values()) for k in OUTCOMES},
             "max_seconds": max((t["max_seconds"] for t in table.values()), default=0.0),
             "max_rss_mb": max((t["max_rss_mb"] for t in table.values()), default=0.0)}
    table["total"] = total
    return table


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
