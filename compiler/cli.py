"""The `dlc` command line: inspect, compile and run models.

Every user error (bad YAML, shape mismatch, missing file, corrupt ONNX) ends in a clear message and exit code 2,
never a traceback. Commands that report also take --json for scripts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from . import __version__
from .errors import DlcError
from .failures import classify
from .train.launcher import launched_size

_debug = {"on": os.environ.get("DLC_DEBUG", "") not in ("", "0")}


def _is_cli_flow(exc: BaseException) -> bool:
    """typer.Exit, usage errors and aborts, whichever click (typer 0.2x vendors its own) raised them."""
    return (type(exc).__module__ or "").split(".")[0] in ("click", "typer") or isinstance(exc, typer.Exit)


class _OneErrorPath(TyperGroup):
    """Every exception a command lets escape becomes one `error:` line (exit 2 for the user's input or machine,
    1 for a bug in dlc, with the traceback under --debug), and Ctrl-C one `interrupted` line (exit 130)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while we exit: no second message
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - this is the one place that turns exceptions into messages
            if _is_cli_flow(exc):  # usage errors and typer.Exit: click prints and exits as it should
                raise
            failure = classify(exc)
            if _debug["on"]:
                err.out("".join(traceback.format_exception(exc)), highlight=False)
            world = _mpi_world()
            for line in failure.lines:
                err.print("[bold red]error:[/] ", end="")
                err.out((f"rank {world.rank} of {world.size}: " if world is not None else "") + line, highlight=False)
            if world is not None:  # the other ranks would wait for this one in their next collective
                _abort_ranks(world, failure.code)
            raise typer.Exit(failure.code) from None


app = typer.Typer(
    cls=_OneErrorPath,
    name="dlc",
    help="dlc: a declarative deep-learning compiler. Describe a network in YAML; dlc validates it, infers "
    "shapes and costs, and exports a verified ONNX model that onnxruntime runs on a GPU or the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
# When piped, rich would wrap at 80 columns; keep lines whole for logs and scripts. Under mpirun each rank writes
# to a pseudo-terminal that the launcher copies into its own output (a log, a pipe): no colour codes there.
_UNDER_MPI = launched_size() > 1
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() and not _UNDER_MPI else 160,
              **({"color_system": None, "force_terminal": False} if _UNDER_MPI else {}))
err = Console(stderr=True, soft_wrap=True, **({"color_system": None} if _UNDER_MPI else {}))


def _fail(exc: DlcError) -> None:
    """Print every diagnostic (the user's text is never parsed as rich markup) and exit with code 2.

    Under mpirun, an error on one rank names the rank and stops the whole job at once (MPI_Abort), so no rank
    is left waiting in a collective; an error every rank raised together (a NaN loss) is reported by rank 0."""
    world = _mpi_world()
    collective = getattr(exc, "collective", False)
    if world is not None and collective and not world.is_root:
        raise typer.Exit(2)
    prefix = f"rank {world.rank} of {world.size}: " if world is not None and not collective else ""
    for line in classify(exc).lines:
        err.print("[bold red]error:[/] ", end="")
        err.out(prefix + line, highlight=False)
    if world is not None and not collective:
        _abort_ranks(world, 2)
    raise typer.Exit(2)


def _mpi_world():
    """The distributed world this process joined under mpirun, or None."""
    if "dlc.compiler.train.distributed" not in sys.modules:
        return None
    from .train.distributed import active_world

    return active_world()


def _abort_ranks(world, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    world.abort(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"dlc {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="On an error, also print the full traceback (or set "
                               "DLC_DEBUG=1)."),
    limit: list[str] = typer.Option(None, "--limit", metavar="NAME=N",
                                    help="Raise (or lower) a resource limit for this run, e.g. `--limit "
                                    "layers=50000`; repeatable. Names: yaml_bytes, yaml_nodes, yaml_depth, layers, "
                                    "repeat, activation_elements, param_bytes, input_bytes, image_pixels, "
                                    "onnx_nodes (defaults in the README; also DLC_LIMITS=\"a=1,b=2\")."),
) -> None:
    from .limits import configure

    _debug["on"] = _debug["on"] or debug
    configure(limit)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="Model YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the analysis as JSON."),
) -> None:
    """Validate a model YAML and print each layer's output shape, parameters, MACs and receptive field."""
    from .analysis import fmt_rf, fmt_shape, summarize
    from .frontend import load_model

    try:
        if model.suffix.lower() == ".onnx":
            raise DlcError(f"{model}: is an ONNX file; dlc inspect reads model YAML: `dlc info {model}` describes an "
                           f"ONNX file, `dlc import {model} -o DIR` turns it into a YAML to inspect")
        summary = summarize(load_model(model).graph)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(summary.to_dict()))
        return
    table = Table(title=f"{summary.model}  (input {fmt_shape(tuple(summary.input_shape))})", title_justify="left")
    for col, justify in (("layer", "left"), ("type", "left"), ("output", "right"), ("params", "right"),
                         ("MACs", "right"), ("RF size / jump / start", "right")):
        table.add_column(col, justify=justify)
    for layer in summary.layers:
        table.add_row(layer.name, layer.type, fmt_shape(tuple(layer.output_shape)), f"{layer.params:,}",
                      f"{layer.macs:,}", fmt_rf(layer))
    table.add_section()
    table.add_row("total", f"{len(summary.layers)} layers", "", f"{summary.total_params:,}",
                  f"{summary.total_macs:,}", fmt_rf(summary.layers[-1]))
    out.print(table)


@app.command("compile")
def compile_cmd(
    model: Path = typer.Argument(..., help="Model YAML file."),
    output: Path = typer.Option(None, "--output", "-o", show_default="build/<yaml name>",
                                help="Output folder for model.onnx and report.json."),
    opset: int = typer.Option(None, show_default="export.opset, else the target's highest, else 17",
                              help="ONNX opset to export (11 to the newest dlc writes); "
                              "at most what export.target loads."),
    weights: Path = typer.Option(None, help="Take the weights from this checkpoint instead of training."),
    skip_train: bool = typer.Option(False, "--skip-train",
                                    help="Export the initial (filler) weights without training, e.g. to check the graph."),
    retrain: bool = typer.Option(False, "--retrain",
                                 help="Train again even when DIR/checkpoint.safetensors is up to date with the YAML."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ranks: int = typer.Option(1, "--ranks", min=1, help="Train data-parallel on this many processes of this machine "
                              "(runs mpirun for you)."),
) -> None:
    """Validate, build and export a model to ONNX; check it with onnx's checker and onnxruntime.

    With a `train:` section, trains first (as `dlc train` does, into the same folder) so the ONNX file
    carries the trained weights; a finished checkpoint already in DIR whose model, data and train sections (and
    dlc version) are unchanged is reused instead (--retrain trains anyway). Writes DIR/model.onnx (with dlc's
    metadata: model name, input size and normalization, classes, dlc version, the YAML's sha256) and
    DIR/report.json, replaced atomically.

    Under `mpirun -n K` (or with `--ranks K` on one machine), the training runs data-parallel on K ranks (see
    `dlc train --help`); pruning, export and verification then run on rank 0.
    """
    _launch_ranks(ranks)
    from .pipeline import compile_model
    from .train.distributed import World

    output = output or Path("build") / model.stem
    try:
        world = World.detect()
        with _claim(output, "compile", world):
            result = compile_model(model, output, opset, weights, progress=not as_json, console=err,
                                   skip_train=skip_train, retrain=retrain, world=world)
    except DlcError as exc:
        _fail(exc)
    if result is None:  # another rank under mpirun: it helped train; rank 0 exports and reports
        return
    report = result.report
    if as_json:
        out.print_json(json.dumps(report))
        return
    s = report["summary"]
    out.print(f"[bold green]compiled[/] {report['model']}: {len(s['layers'])} layers, "
              f"{s['total_params']:,} parameters, {s['total_macs']:,} MACs per image")
    shapes = ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in s["output_shapes"].items())
    out.print(f"  output      {shapes}")
    rf = s["receptive_field"]
    out.print(f"  receptive   {rf[0]:g}×{rf[1]:g} px (largest feature-map field, before global pooling)")
    onnx = report["onnx"]
    out.print(f"  onnx        {onnx['path']}  (opset {onnx['opset']}, IR {onnx['ir_version']}, {onnx['precision']}, "
              f"{onnx['nodes']} nodes, {onnx['bytes'] / 1024:.1f} KiB)")
    out.print(f"  verified    onnx checker + onnxruntime ({report['verification']['provider']})")
    w = report.get("weights")
    if w:
        fresh = w["initialised"]
        kept = (f"; initialised from fillers: {', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''}"
                if fresh else "")
        out.print(f"  weights     {w['file']}: {w['loaded']} of {w['tensors']} tensors loaded{kept}", highlight=False)
    t = report.get("training") or {}
    if "reused" in t:
        out.print(f"  trained     reused {t['reused']} ({t['epochs']} epochs, {t['stopped']}): {_val_score(t)}, "
                  f"val loss {t['val_loss']:.4f}", highlight=False)
    elif "epochs" in t:
        out.print(f"  trained     {t['epochs']} epochs in {t['seconds']:.1f} s ({t['stopped']}): "
                  f"{_val_score(t)}, val loss {t['val_loss']:.4f}")
    p = report.get("pruning")
    if p:
        b, a = p["before"], p["after"]
        metric = p.get("metric") if p.get("metric") in ("mAP@0.5", "mIoU") else "accuracy"
        acc = f"; val {metric} {a['val_accuracy']:.4f}" if a.get("val_accuracy") is not None else ""
        tuned = "fine-tuned" if p["fine_tuned"] else "not fine-tuned"
        out.print(f"  pruned      {p['config']['method']} {p['config']['amount']:g} in {len(p['steps'])} step(s), "
                  f"{tuned}: params {b['params']:,} -> {a['params']:,}, MACs {b['macs']:,} -> {a['macs']:,}{acc}")
    out.print(f"  report      {result.report_path}")


def _launch_ranks(ranks: int) -> None:
    """--ranks K (K > 1, not already under a launcher): become `mpirun -n K dlc <same arguments>`."""
    if ranks <= 1 or _UNDER_MPI:
        return
    from .train.launcher import mpirun_command, without_ranks_option

    try:
        command, env = mpirun_command(ranks, without_ranks_option(sys.argv[1:]))
    except DlcError as exc:
        _fail(exc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)  # mpirun takes this process's place (and its Ctrl-C)


def _claim(output: Path, command: str, world):
    """Rank 0 alone holds the output folder (it alone writes there)."""
    import contextlib

    from .outdir import claim_output_folder

    return claim_output_folder(output, command, console=err) if world.is_root else contextlib.nullcontext()


def _val_score(metrics: dict) -> str:
    """The headline validation score of a training run: mAP@0.5 for detectors, mIoU for segmentation models,
    accuracy for classifiers."""
    if metrics.get("val_miou") is not None:
        return f"val mIoU {metrics['val_miou']:.4f}"
    if metrics.get("val_map") is not None:
        return f"val mAP@0.5 {metrics['val_map']:.4f}"
    return f"val accuracy {metrics['val_accuracy']:.4f}"


@app.command()
def train(
    model: Path = typer.Argument(..., help="Model YAML file with train: and data: sections."),
    output: Path = typer.Option(None, "--output", "-o", show_default="build/<yaml name>",
                                help="Folder for checkpoint.safetensors, metrics.json, curves.png, snapshots/."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the folder's checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (no progress bar)."),
    ranks: int = typer.Option(1, "--ranks", min=1, help="Train data-parallel on this many processes of this machine "
                              "(runs mpirun for you; see below)."),
) -> None:
    """Train a model on the CPU with dlc's native kernels.

    A checkpoint is written after every epoch; Ctrl-C writes one at the current iteration and exits, and
    `--resume` continues from it exactly (same data order, augmentation and dropout). A NaN or inf loss stops
    training, names the epoch and iteration, and keeps the last good checkpoint.

    **On several processes or machines**: `mpirun -n K dlc train model.yaml -o DIR` trains data-parallel over
    MPI (install it with `pip install -e ".[mpi]"`). train.batch_size is per rank; base_lr is for the global
    batch of K × batch_size (`train.scale_lr: true` multiplies it by K); `train.sync_bn: true` normalises
    batch norm over the global batch. Rank 0 writes every file; `--resume` works with any K. DLC_MPI_TIMEOUT
    (seconds, default 300) bounds the wait for a rank that died or hangs. On one machine, `--ranks K` runs
    mpirun for you with the settings it needs (each rank its share of the cores, root allowed).
    """
    _launch_ranks(ranks)
    from .frontend import load_model
    from .prune.pipeline import training_callbacks
    from .train.distributed import World
    from .train.trainer import dumps, train_model

    output = output or Path("build") / model.stem
    try:
        loaded = load_model(model)
        if loaded.spec.train is None:
            raise DlcError(f"{model}: no 'train:' section: add one (and a 'data:' section) to train")
        world = World.detect()
        with _claim(output, "train", world):
            result = train_model(loaded, output, resume=resume, progress=not as_json, console=err,
                                 callbacks=training_callbacks(loaded.prune),  # prune.bn_l1: network slimming
                                 world=world)
    except DlcError as exc:
        _fail(exc)
    if not world.is_root:  # rank 0 reports
        raise typer.Exit(130 if result.stopped == "interrupted" else 0)
    if as_json:
        out.print_json(dumps(result))
    elif result.stopped == "interrupted":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while we exit: no second message or kill
        err.print(f"interrupted: checkpoint written; continue with: dlc train {model} -o {output} --resume")
        raise typer.Exit(130)
    else:
        final = result.final
        out.print(f"[bold green]trained[/] {loaded.spec.name}: {len(result.history)} epochs in "
                  f"{result.seconds:.1f} s ({result.stopped.replace('_', ' ')}); {_val_score(final)}, val loss "
                  f"{final['val_loss']:.4f}")
        out.print(f"  outputs     {output}/checkpoint.safetensors, metrics.json, curves.png")


@app.command()
def time(
    model: Path = typer.Argument(..., help="Model YAML file."),
    batch: int = typer.Option(None, min=1, show_default="train.batch_size, else 64", help="Batch size."),
    iterations: int = typer.Option(10, min=1, help="Timed iterations (after 2 warm-up ones)."),
    as_json: bool = typer.Option(False, "--json", help="Print the timings as JSON."),
) -> None:
    """Forward and backward milliseconds per layer on dlc's CPU backend (like `caffe time`), which build of the
    kernels runs them (baseline, avx2 or avx512: the best this CPU runs, or DLC_ISA's choice) and the route each
    convolution takes (winograd, im2col, depthwise)."""
    from .analysis import fmt_shape
    from .frontend import load_model
    from .train.profile import profile

    try:
        loaded = load_model(model)
        batch = batch or (loaded.spec.train.batch_size if loaded.spec.train else 64)
        result = profile(loaded.graph, batch, iterations)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"{loaded.spec.name}: batch {batch}, median of {iterations} iterations; conv kernels: "
                  f"{result['isa']} (this CPU runs {', '.join(result['isa_runnable'])}; DLC_ISA=... picks one)",
                  title_justify="left")
    for col in ("layer", "type", "output", "forward ms", "backward ms", "GFLOP/s"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for row in result["layers"]:
        gflops = f"{row['gflops']:.1f}" if row["gflops"] else ""
        if row.get("fused_into"):
            table.add_row(row["name"], row["type"], fmt_shape(tuple(row["output_shape"])),
                          f"in {row['fused_into']}", f"in {row['fused_into']}", "")
            continue
        kind = f"{row['type']} ({row['algorithm']})" if row.get("algorithm") else row["type"]
        table.add_row(row["name"], kind, fmt_shape(tuple(row["output_shape"])), f"{row['forward_ms']:.3f}",
                      f"{row['backward_ms']:.3f}", gflops)
    table.add_section()
    table.add_row("total", "", "", f"{result['forward_ms']:.2f}", f"{result['backward_ms']:.2f}",
                  f"{result['gflops']:.1f}")
    out.print(table)


@app.command()
def optimize(
    model: Path = typer.Argument(None, help="ONNX model file to optimize (not needed with --list)."),
    output: Path = typer.Option(None, "--output", "-o", help="Where to write the optimized model."),
    passes: str = typer.Option(None, show_default="the default list (see --list)",
                               help="Comma-separated passes to run, in order."),
    check: int = typer.Option(3, min=0, help="Random inputs to compare before vs after (0: no check)."),
    rtol: float = typer.Option(1e-3, help="Relative tolerance of the check."),
    atol: float = typer.Option(1e-4, help="Absolute tolerance of the check."),
    list_passes: bool = typer.Option(False, "--list", help="List the passes and the default order, then exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Optimize any ONNX model with dlc's passes (fold BN, fuse, eliminate, fold constants, CSE, DCE) and prove
    the result: by default it runs both models on random inputs through onnxruntime (its own optimizations
    off) and fails loudly if any output differs beyond the tolerance."""

    from .passes import DEFAULT_PASSES, PASSES

    if list_passes:
        out.print("passes: " + ", ".join(sorted(PASSES)))
        out.print("default order: " + ", ".join(DEFAULT_PASSES))
        return
    try:
        if model is None:
            raise DlcError("dlc optimize: give the ONNX model to optimize (dlc optimize in.onnx -o out.onnx), or "
                           "--list to see the passes")
        if model.suffix.lower() in (".yaml", ".yml"):
            raise DlcError(f"{model}: is a model YAML; dlc optimize works on ONNX files: run `dlc compile {model}` "
                           "(it runs the YAML's optimize: passes) or optimize the model.onnx it writes")
        if output is None:
            raise DlcError("dlc optimize: give the output file: -o OUT.onnx")
        names = [p.strip() for p in passes.split(",") if p.strip()] if passes else None
        nodes, reports, proof, seconds = _optimize_file(model, output, names, check, rtol, atol)
    except DlcError as exc:
        _fail(exc)
    result = {"input": str(model), "output": str(output), "nodes_before": nodes[0], "nodes_after": nodes[1],
              "passes": [r.to_dict() for r in reports], "verification": proof.to_dict() if proof else None,
              "seconds": seconds}
    if as_json:
        out.print_json(json.dumps(result))
        return
    for r in reports:
        out.print(r.line(), highlight=False)
    out.print(f"[bold green]optimized[/] {model} -> {output}: {result['nodes_before']} -> {result['nodes_after']} "
              "nodes")
    out.print("  seconds     " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()), highlight=False)
    if proof:
        out.print(f"  verified    {proof.runs} random inputs, max abs diff {proof.max_abs_diff:.3g} "
                  f"(rtol {rtol:g} of each output's scale, atol {atol:g})")
    else:
        out.print("  [yellow]not verified[/] (--check 0)")


def _optimize_file(model: Path, output: Path, names: list[str] | None, check: int, rtol: float, atol: float):
    """Load, run the passes, check, write and verify, timing each step; returns the node counts before and after,
    the pass reports, the verification and the seconds. Never holds a large model's
    weights more than twice: the input's ModelProto is dropped once the passes have read it, the result is
    written to a temporary file beside `output`, and verification reads both models from their files, one
    session at a time. The temporary file replaces `output` only once it has passed."""
    import os
    import tempfile
    from time import perf_counter

    from .metadata import finalize_metadata
    from .onnx_io import load_onnx, save_onnx, weightless
    from .passes import optimize as run_passes
    from .passes import verify

    seconds: dict[str, float] = {}
    t0 = perf_counter()
    loaded = [load_onnx(model)]
    seconds["load"] = perf_counter() - t0
    t0 = perf_counter()
    optimized, reports = run_passes(loaded.pop(), names)  # the list held the only reference: freed inside
    finalize_metadata(optimized, passes=reports, file=str(model))  # a dlc file's pass log stays true
    seconds["passes"] = perf_counter() - t0
    t0 = perf_counter()
    # The checker reads the graph and shape-like values; the weights' bytes it would only copy (weightless)
    problem = _checker_problem(weightless(optimized))
    if problem is not None:
        before = _checker_problem(weightless(load_onnx(model)))
        if before is not None:
            raise DlcError(f"{model}: fails onnx's checker already, before any pass ({before}); re-export "
                           "it, then optimize; not written")
        raise DlcError(f"the optimized model fails onnx's checker ({problem}); not written")
    seconds["check"] = perf_counter() - t0
    t0 = perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    nodes = (reports[0].nodes_before if reports else len(optimized.graph.node), len(optimized.graph.node))
    try:
        save_onnx(optimized, tmp)
        del optimized  # verification reads the file; its weights need not be held twice
        seconds["write"] = perf_counter() - t0
        proof = None
        if check:
            t0 = perf_counter()
            proof = verify(model, tmp, check, rtol, atol)
            seconds["verify"] = perf_counter() - t0
        os.replace(tmp, output)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return nodes, reports, proof, seconds


def _checker_problem(model) -> str | None:
    """The first line of what onnx's full check (structure and shape inference) finds wrong, or None. Its C++
    side reports some problems as a plain ValueError; all of them are about the model, none a bug of ours."""
    import onnx
    import onnx.shape_inference

    from .errors import shorten

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        return shorten((str(exc).strip().splitlines() or [type(exc).__name__])[0])
    return None


@app.command("export")
def export_cmd(
    model: Path = typer.Argument(..., help="A model YAML (with --weights, or model.weights in the YAML), or any "
                                 "ONNX file."),
    output: Path = typer.Option(..., "--output", "-o", help="The ONNX file to write."),
    weights: Path = typer.Option(None, "--weights", help="YAML only: the checkpoint to export (dlc train's "
                                 "checkpoint.safetensors)."),
    target: str = typer.Option(None, "--target", show_default="export.target in the YAML",
                               help="The runtime the file is for: onnxruntime@1.14, onnxruntime@1.16:cuda, ... "
                               "Picks the highest opset and the IR version it loads."),
    opset: int = typer.Option(None, "--opset", help="An explicit opset (11 to the newest dlc writes), at most "
                              "what --target loads."),
    dynamic: str = typer.Option(None, "--dynamic", show_default="export.dynamic, else batch",
                                help="YAML only: symbolic axes, e.g. batch or batch,height,width (fully "
                                "convolutional nets); '' for none."),
    precision: str = typer.Option(None, "--precision", show_default="export.precision, else fp32",
                                  help="fp32, fp16 (fp32 inputs/outputs) or int8 (static, calibrated)."),
    data: Path = typer.Option(None, "--data", help="int8: a YAML whose data: section calibrates and scores (default: "
                              "the model's own YAML)."),
    samples: int = typer.Option(None, "--samples", min=1, help="int8: calibration images (default 256)."),
    method: str = typer.Option(None, "--method", help="int8 calibration: minmax, entropy or percentile."),
    max_accuracy_drop: float = typer.Option(None, "--max-accuracy-drop", min=0.0, max=100.0,
                                            help="int8: points of validation accuracy (mAP@0.5 × 100) it may lose "
                                            "(default 1)."),
    force: bool = typer.Option(False, "--force", help="int8: write it even when it is not faster than fp32."),
    embed_nms: bool = typer.Option(False, "--embed-nms", help="Detectors: NMS inside the model (score threshold, "
                                   "NonMaxSuppression, cap), any batch size; thresholds from the detect layer."),
    max_detections: int = typer.Option(None, "--max-detections", min=1, max=100_000,
                                       help="--embed-nms: detections per image (default: the detect layer's)."),
    layout: str = typer.Option(None, "--layout", help="--embed-nms: padded (detections (N, max, 6) + "
                               "num_detections) or efficient_nms (TensorRT's four outputs). Default padded."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Export for a target runtime: the opset and IR version it loads, every op in that opset's form.

    A YAML model is rebuilt from its weights and checked against dlc's backend; an ONNX file is converted with
    onnx's version converter and checked against the source through onnxruntime. Then the precision is applied
    (fp16, or int8 as `dlc quantize` does), the file is loaded in the installed onnxruntime, and dlc says when
    that runtime is newer than the target (the load check then proves less)."""
    from .export_cmd import export_onnx_file, export_yaml, overrides

    try:
        changes = overrides(target, dynamic, precision, samples, method, max_accuracy_drop, force,
                            embed_nms=embed_nms, max_detections=max_detections, layout=layout)
        if model.suffix.lower() == ".onnx":
            if weights is not None:
                raise DlcError("--weights applies to a YAML model; an ONNX file carries its own")
            report = export_onnx_file(model, output, opset, changes, data, console=None if as_json else err)
        else:
            report = export_yaml(model, output, weights, opset, changes, data, console=None if as_json else err)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(report))
        return
    out.print(f"[bold green]exported[/] {report['output']}: opset {report['opset']}, IR version "
              f"{report['ir_version']}, {report['precision']}, {report['bytes'] / 1024:.1f} KiB", highlight=False)
    out.print(f"  why         {report['reason']}", highlight=False)
    if "conversion" in report:
        conv = report["conversion"]
        worst = max(conv["verification"]["max_scaled_error"].values(), default=0.0)
        out.print(f"  converted   opset {conv['source_opset']} -> {report['opset']}; equal to the source on "
                  f"{conv['verification']['runs']} random inputs (worst {worst:.2g} of scale)", highlight=False)
    if "backend_check" in report:
        worst = max(report["backend_check"]["max_scaled_error"].values(), default=0.0)
        out.print(f"  verified    equal to dlc's backend (worst {worst:.2g} of scale)", highlight=False)
    out.print(f"  loaded      onnxruntime (installed) on {report['loaded_on']}", highlight=False)
    for note in report["notes"]:
        out.print(f"  [yellow]note[/]        {note}", highlight=False)


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Float ONNX model to quantize."),
    output: Path = typer.Option(..., "--output", "-o", help="The INT8 model to write; its report goes beside it "
                                "(same name, .json)."),
    data: Path = typer.Option(None, "--data", help="YAML file with a data: section (e.g. the model's own YAML): "
                              "calibration reads its training split, accuracy its validation split."),
    samples: int = typer.Option(256, "--samples", min=1, help="Calibration images from the training split."),
    method: str = typer.Option("minmax", "--method", help="Calibration: minmax, entropy or percentile."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", min=0.0, max=100.0,
                                            help="Points of validation accuracy (mAP@0.5 × 100 for detectors) "
                                            "INT8 may lose."),
    formats: str = typer.Option(None, "--formats", show_default="all the target runs",
                                help="Comma-separated formats to try: qoperator, qdq, dynamic."),
    force: bool = typer.Option(False, "--force", help="Write the INT8 model even when it is not faster than fp32."),
    device: str = typer.Option("cpu", help="Target execution provider the candidates are timed on: cpu, cuda or "
                               "tensorrt."),
    threads: int = typer.Option(2, "--threads", min=1, help="onnxruntime intra-op threads while timing."),
    min_time: float = typer.Option(1.0, "--min-time", min=0.0, help="Seconds of measured time per finalist and "
                                   "batch (candidates are screened with a quarter of it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Static INT8 with onnxruntime.quantization, the format chosen by measurement: calibrates on the training
    split, tries QOperator/QDQ × U8S8/S8S8 × per-channel/per-tensor, scores each on the validation split, times
    them against fp32 interleaved (the `dlc bench` harness), and keeps the fastest within --max-accuracy-drop,
    keeping the costliest layers float if it must. Refuses (exit 2) when no INT8 model is faster than fp32,
    unless --force."""
    from .quantize import QuantOptions, QuantRefused, quantize_file
    from .quantize.report import summary

    try:
        names = tuple(f.strip().lower() for f in formats.split(",") if f.strip()) if formats else None
        options = QuantOptions(samples=samples, method=method, max_accuracy_drop=max_accuracy_drop, force=force,
                               formats=names, device=device, threads=threads, min_time_s=min_time)
        result = quantize_file(model, output, data, options, console=None if as_json else err)
    except QuantRefused as exc:
        if as_json:
            out.print_json(json.dumps(exc.result.to_dict()))
        else:
            out.print(summary(exc.result, str(model), None))
        _fail(exc)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps({"output": str(output), **result.to_dict()}))
        return
    out.print(summary(result, str(model), str(output)))


@app.command("import")
def import_cmd(
    model: Path = typer.Argument(..., help="ONNX model file to import."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for model.yaml and weights.safetensors."),
    name: str = typer.Option(None, show_default="dlc's metadata in the file, else the file name",
                             help="Model name in the YAML."),
    check: int = typer.Option(3, min=0, help="Random inputs to compare the imported model with the original on "
                              "onnxruntime (0: no check)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Import an ONNX model (e.g. a pretrained network exported from PyTorch) as a dlc model: DIR/model.yaml, one
    line per layer, and DIR/weights.safetensors, which the YAML loads through `weights:`.

    Edit the YAML like any other (e.g. the last linear layer's `out` for new classes: that layer starts from its
    filler, the rest keep their weights), add `data:` and `train:` to fine-tune, and `dlc compile` it. Any op dlc
    has no layer for is listed, all at once, with the nodes that use it."""
    from collections import Counter

    from .analysis import summarize
    from .atomic import write_text
    from .frontend import load_model
    from .onnx_import import import_onnx, verify_import
    from .onnx_io import load_onnx
    from .train.checkpoint import save_checkpoint
    from .yaml_writer import graph_to_yaml

    yaml_path, weights_path = output / "model.yaml", output / "weights.safetensors"
    try:
        original = load_onnx(model)
        graph = import_onnx(original, name=name, source=model.name)
        proof = verify_import(original, graph, check) if check else None
        save_checkpoint(weights_path, graph, info={"imported_from": model.name})
        write_text(yaml_path, graph_to_yaml(graph, weights_path.name))
        reloaded = load_model(yaml_path)
        if reloaded.graph.meta["weights"]["initialised"]:
            raise DlcError(f"{yaml_path}: layers {reloaded.graph.meta['weights']['initialised'][:5]} did not load "
                           "their weights back: a dlc bug, please report it with the model")
    except DlcError as exc:
        _fail(exc)
    summary = summarize(graph)
    inp = graph.meta["input"]
    result = {
        "input": str(model), "model": graph.name, "yaml": str(yaml_path), "weights": str(weights_path),
        "onnx_nodes": len(original.graph.node), "layers": len(summary.layers),
        "layer_types": dict(Counter(layer.type for layer in summary.layers)),
        "total_params": summary.total_params, "total_macs": summary.total_macs,
        "input_shape": summary.input_shape, "output_shapes": summary.output_shapes,
        "verification": proof.to_dict() if proof else None,
    }
    if as_json:
        out.print_json(json.dumps(result))
        return
    types = ", ".join(f"{k} ×{v}" for k, v in result["layer_types"].items())
    out.print(f"[bold green]imported[/] {model}: {result['onnx_nodes']} ONNX nodes -> {result['layers']} layers "
              f"({types}), {summary.total_params:,} parameters, {summary.total_macs:,} MACs per image",
              highlight=False)

    def one(v: list[float]) -> str:
        return f"{v[0]:g}" if len(set(v)) == 1 else ", ".join(f"{x:g}" for x in v)

    plain = set(inp["mean"]) == {0.0} and set(inp["std"]) == {1.0}
    note = ": set model.input's mean and std to the model's preprocessing" if plain else ""
    out.print(f"  input       {inp['name']} {'×'.join(map(str, inp['shape']))} (mean {one(inp['mean'])}, std "
              f"{one(inp['std'])}{note})", highlight=False)
    shapes = ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in summary.output_shapes.items())
    out.print(f"  output      {shapes}", highlight=False)
    if proof:
        out.print(f"  verified    {proof.runs} random inputs against the original on onnxruntime, max abs diff "
                  f"{proof.max_abs_diff:.3g}")
    out.print(f"  written     {yaml_path}, {weights_path}", highlight=False)
    out.print(f"  next        dlc compile {yaml_path}", highlight=False)


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Model YAML (with model.weights or a --weights checkpoint) or ONNX file."),
    output: Path = typer.Option(None, "--output", "-o", help="Where to write the pruned ONNX model (its report: "
                                "the same name with .json)."),
    method: str = typer.Option(None, show_default="prune.method, else structured",
                               help="structured (removes channels: smaller and faster) or unstructured (zeros)."),
    importance: str = typer.Option(None, show_default="l1 (structured), magnitude (unstructured)",
                                   help="Criterion: l1, l2, bn_scale or random (structured); magnitude."),
    ratio: float = typer.Option(None, show_default="prune.amount, else 0.5",
                                help="Structured: fraction of channels removed per group; unstructured: sparsity."),
    scope: str = typer.Option(None, help="layer (every group / layer loses the ratio) or global (the least important "
                              "channels or weights across all layers go)."),
    round_to: str = typer.Option(None, "--round-to", help="Keep a multiple of this many channels (e.g. 8), or "
                                 "auto: the channel block of onnxruntime's CPU kernels on this machine (16 with "
                                 "AVX-512, 8 with AVX2, else 1)."),
    skip: str = typer.Option("", help="Comma-separated layer names or patterns left whole."),
    weights: Path = typer.Option(None, help="Checkpoint with the YAML model's weights (e.g. from dlc train)."),
    steps: int = typer.Option(None, min=1, help="Prune in this many steps, fine-tuning after each."),
    fine_tune_epochs: int = typer.Option(None, "--fine-tune-epochs", min=0, show_default="prune.fine_tune.epochs, "
                                         "else max(1, train epochs // 4)", help="Fine-tune epochs per step (0: none)."),
    lr: float = typer.Option(None, "--lr", min=0.0, show_default="the fine-tune / train base_lr",
                             help="Fine-tuning learning rate."),
    data: Path = typer.Option(None, "--data", help="YAML with a data: (and optional train:) section to fine-tune "
                              "and measure accuracy with (needed for an ONNX model)."),
    target_speedup: float = typer.Option(None, "--target-speedup", help="Structured: choose each group's width so "
                                         "the pruned model measures this many times faster than the unpruned one "
                                         "on onnxruntime (latency tables per layer, measured once and cached; "
                                         "instead of --ratio)."),
    batch: int = typer.Option(None, "--batch", min=1, show_default="prune.target.batch, else 1",
                              help="--target-speedup: the batch size the speed-up is measured at."),
    device: str = typer.Option(None, "--device", show_default="prune.target.device, else cpu",
                               help="--target-speedup: onnxruntime provider to measure on: cpu, cuda, tensorrt or "
                               "auto."),
    threads: int = typer.Option(None, "--threads", min=1, show_default="onnxruntime's default (one per core)",
                                help="--target-speedup: onnxruntime intra-op threads to measure with."),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="Instead of pruning: accuracy vs ratio for every "
                                     "prunable group (or layer), one at a time, without fine-tuning."),
    ratios: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="--sensitivity: the ratios to try."),
    plot: Path = typer.Option(None, "--plot", help="--sensitivity: also write a PNG of accuracy vs ratio here."),
    allow_untrained: bool = typer.Option(False, "--allow-untrained", help="Prune a YAML model that has no trained "
                                         "weights (no --weights, no model.weights): its random initial weights."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Prune a model, then fine-tune it when there is data (the YAML's data: and train:, or --data).

    Structured pruning removes whole channels, with every coupled tensor (batch norm, the next layer's inputs,
    residual adds, concat offsets, depthwise convs) pruned alike, so the ONNX file is physically smaller and
    faster. Unstructured pruning zeros the smallest weights: the file compresses better, but dense runtimes such
    as onnxruntime run it no faster. With --steps N, each step removes the same fraction of what is left and
    is fine-tuned (into OUT's folder, prune/step_k/). With --sensitivity, prints accuracy vs ratio per group.

    With --target-speedup S (or prune.target), each group's width is chosen so the pruned model measures S times
    faster than the unpruned one on onnxruntime at --batch, --device and --threads: per-layer latency tables
    (measured once, cached in ~/.cache/dlc), a greedy search that narrows where validation loss suffers least per
    millisecond saved, and whole-model measurements along its path. --round-to auto keeps widths on onnxruntime's
    channel blocks."""
    from .atomic import write_bytes, write_json
    from .export_onnx import check, to_onnx
    from .metadata import finalize_metadata
    from .pipeline import artifact_metadata
    from .prune.pipeline import ValData, cli_config, load_for_pruning, run_prune

    skips = [s.strip() for s in skip.split(",") if s.strip()]
    try:
        if not sensitivity and output is None:
            raise DlcError("give the output file: -o OUT.onnx (or --sensitivity for the analysis)")
        if output is not None and output.suffix.lower() != ".onnx":
            raise DlcError(f"-o must name an .onnx file, got '{output}'")
        loaded, train_section = load_for_pruning(model, weights, data)
        cfg = cli_config(loaded, train_section, method, importance, ratio, scope, round_to, skips, steps,
                         fine_tune_epochs, lr, target_speedup, batch, device, threads)
        if (model.suffix.lower() != ".onnx" and weights is None and "weights" not in loaded.graph.meta
                and not allow_untrained):
            ckpt = Path("build") / model.stem / "checkpoint.safetensors"
            raise DlcError(f"{model}: no trained weights, so this would prune the random initial weights: pass "
                           f"--weights {ckpt} (from dlc train) or prune the trained {ckpt.parent / 'model.onnx'}, "
                           "or --allow-untrained to prune the initial weights anyway")
        if sensitivity:
            _prune_sensitivity(loaded, cfg, ratios, plot, as_json)
            return
        val = ValData.from_spec(loaded.spec, loaded.graph) if loaded.spec.data is not None else None
        result = run_prune(loaded, cfg, output.parent / output.stem, progress=not as_json, console=err, val=val)
        exported = to_onnx(loaded.graph, metadata=artifact_metadata(loaded, val.classes if val else None))
        check(exported)
        finalize_metadata(exported)  # opset, IR, minimum onnxruntime, precision: read from the file
        write_bytes(output, exported.SerializeToString())
        report = {"input": str(model), "output": str(output), **result.to_dict()}
        report_path = write_json(output.with_suffix(".json"), report)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(report))
        return
    what = (f"to {cfg.target.speedup:g}x at batch {cfg.target.batch}" if result.target else f"{cfg.amount:g}")
    table = Table(title=f"{cfg.method} pruning of {model} ({cfg.importance}, {what} in {cfg.steps} "
                  f"step{'s' if cfg.steps > 1 else ''})", title_justify="left")
    score = f"val {result.metric}" if result.metric in ("mAP@0.5", "mIoU") else "val acc"
    for col in ("step", "amount", "params", "MACs", "sparsity", f"{score} pruned", f"{score} fine-tuned",
                "epochs", "seconds"):
        table.add_column(col, justify="right")

    def acc(v) -> str:
        return f"{v:.4f}" if v is not None else "-"

    for r in result.rows:
        tuned = acc(r["val_accuracy"]) if r["fine_tune_epochs"] else "-"
        pruned = acc(r["val_accuracy_pruned"] if r["step"] else r["val_accuracy"])
        table.add_row(str(r["step"]), f"{r['amount']:.3f}", f"{r['params']:,}", f"{r['macs']:,}",
                      f"{r['sparsity']:.1%}", pruned, tuned, str(r["fine_tune_epochs"]), f"{r['seconds']:.1f}")
    out.print(table)
    b, a = result.before, result.after
    out.print(f"[bold green]pruned[/] {model} -> {output}", highlight=False)
    out.print(f"  params      {b['params']:,} -> {a['params']:,} ({a['params'] / max(b['params'], 1):.0%}); MACs "
              f"{b['macs']:,} -> {a['macs']:,} ({a['macs'] / max(b['macs'], 1):.0%})")
    if b["val_accuracy"] is not None:
        out.print(f"  {result.metric if result.metric in ('mAP@0.5', 'mIoU') else 'accuracy':<11} "
                  f"{b['val_accuracy']:.4f} -> "
                  f"{a['val_accuracy']:.4f} (validation split)")
    if result.target:
        t = result.target
        threads_text = f", {t['threads']} threads" if t["threads"] else ""
        out.print(f"  speed       {t['measured_speedup']:.2f}x measured at batch {t['batch']} on {t['device']}"
                  f"{threads_text} ({t['baseline_ms']:.3f} -> {t['pruned_ms']:.3f} ms, ratio of minima; "
                  f"{len(t['rounds'])} measurements); target {t['speedup']:g}x", highlight=False)
        out.print("  widths      " + ", ".join(f"{p} {t['sizes'][p]}->{w}" for p, w in t["widths"].items()),
                  highlight=False)
        tab = t["table"]
        out.print(f"  latencies   {tab['entries']} table entries ({tab['measured']} measured, {tab['cached']} "
                  f"cached in {tab['cache'] or 'no cache'})", highlight=False)
    if result.sizes:
        s = result.sizes
        out.print(f"  sizes       file {s['dense_bytes'] / 1024:,.1f} -> {s['sparse_bytes'] / 1024:,.1f} KiB; "
                  f"compressed {s['dense_compressed'] / 1024:,.1f} -> {s['sparse_compressed'] / 1024:,.1f} KiB "
                  f"({s['compressed_ratio']:.0%})")
    for note in result.notes:
        out.print(f"  [yellow]note[/]        {note}", highlight=False)
    out.print(f"  report      {report_path}; each step's model and checkpoint in {output.parent / output.stem}/prune/",
              highlight=False)


def _prune_sensitivity(loaded, cfg, ratios: str, plot: Path | None, as_json: bool) -> None:
    from .prune.pipeline import ValData
    from .prune.sensitivity import plot_sensitivity
    from .prune.sensitivity import sensitivity as run_sensitivity

    if loaded.spec.data is None:
        raise DlcError("--sensitivity measures validation accuracy: it needs data (the YAML's data: section, or "
                       "--data FILE.yaml)")
    try:
        values = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise DlcError(f"--ratios: expected comma-separated numbers such as 0.25,0.5,0.75, got '{ratios}'") from None
    if not values or not all(0.0 <= r < 1.0 for r in values):
        raise DlcError(f"--ratios must be numbers in [0, 1), got '{ratios}'")
    val = ValData.from_spec(loaded.spec, loaded.graph)
    if val is None:
        raise DlcError("--sensitivity measures validation accuracy (a classifier: one output of class scores), "
                       "mAP@0.5 (a detector with a detection data set) or mIoU (a segmentation model with a "
                       "segmentation data set); this model and data are neither")
    result = run_sensitivity(loaded.graph, val, cfg.method, cfg.importance, values, cfg.exclude, cfg.round_to)
    if plot is not None:
        plot_sensitivity(result, plot, f"{loaded.spec.name}: {cfg.method} pruning sensitivity ({cfg.importance})")
    if as_json:
        out.print_json(json.dumps({**result.to_dict(), "plot": str(plot) if plot else None}))
        return
    table = Table(title=f"{loaded.spec.name}: {result.label} with one {'group' if cfg.method == 'structured' else 'layer'}"
                  f" pruned, no fine-tuning (base {result.base_accuracy:.4f})", title_justify="left")
    table.add_column("group" if cfg.method == "structured" else "layer")
    table.add_column("channels" if cfg.method == "structured" else "weights", justify="right")
    for r in result.ratios:
        table.add_column(f"{r:g}", justify="right")
    for row in result.rows:
        table.add_row(row["name"], f"{row['size']:,}", *(f"{a:.3f}" for a in row["accuracy"]))
    out.print(table)
    if plot is not None:
        out.print(f"  plot        {plot}", highlight=False)


@app.command()
def run(
    model: Path = typer.Argument(..., help="ONNX model file."),
    random: bool = typer.Option(False, "--random", help="Feed random inputs of the model's shape."),
    input_file: Path = typer.Option(None, "--input", help="Feed this .npy array (or .npz: one array per input)."),
    batch: int = typer.Option(1, min=1, help="Batch size for --random."),
    runs: int = typer.Option(20, min=1, help="Timed runs (after 3 warm-up runs)."),
    device: str = typer.Option("auto", "--device", "--provider", help="Execution provider: auto (TensorRT, CUDA, then CPU), tensorrt, cuda or cpu."),
    trt_fp16: bool = typer.Option(False, "--trt-fp16", help="TensorRT: build fp16 engines."),
    trt_cache: Path = typer.Option(None, "--trt-cache", help="TensorRT: keep built engines in this folder (built "
                                   "once per model and GPU, not per run)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Run an ONNX model on onnxruntime: print output shapes, the provider that really ran and the latency."""
    from dlc.runtime import Session, measure

    try:
        if random == (input_file is not None):
            raise DlcError("give exactly one of --random or --input FILE")
        session = Session(model, device=device, trt_fp16=trt_fp16, trt_cache=trt_cache)
        feeds = session.random_inputs(batch) if random else _read_inputs(input_file, session)
        outputs = session.run(feeds)
        latency = measure(lambda: session.run(feeds), runs=runs)
    except DlcError as exc:
        _fail(exc)
    result = {
        "model": str(model), "provider": session.provider, "placement": session.placement,
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
        "latency_ms": latency.to_dict(),
    }
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"[bold]{model}[/] on {session.provider}")
    if session.placement:
        nodes = ", ".join(f"{k.removesuffix('ExecutionProvider')} {v}" for k, v in session.placement["nodes"].items())
        out.print(f"  nodes   {nodes}; Memcpy {session.placement['memcpy']}", highlight=False)
    for k, v in result["inputs"].items():
        out.print(f"  input   {k}: {'×'.join(map(str, v))}")
    for k, v in result["outputs"].items():
        out.print(f"  output  {k}: {'×'.join(map(str, v))}")
    out.print(f"  latency median {latency.median_ms:.3f} ms, p90 {latency.p90_ms:.3f} ms over {latency.runs} runs")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="ONNX model made by dlc (classifier or detector), or a bundle from "
                                 "dlc package."),
    images: list[Path] = typer.Argument(..., help="Image files, or folders of images."),
    output: Path = typer.Option(Path("predictions"), "--output", "-o",
                                help="Folder for predictions.json and the annotated PNG images."),
    device: str = typer.Option("auto", "--device", "--provider", help="Execution provider: auto (TensorRT, CUDA, then CPU), tensorrt, cuda or cpu."),
    batch: int = typer.Option(16, min=1, help="Images per onnxruntime call."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classifiers: how many classes to list per image."),
    conf: float = typer.Option(None, "--conf", min=0.0, max=1.0,
                               help="Detectors: score threshold (default: the model's, from its metadata)."),
    iou: float = typer.Option(None, "--iou", min=0.0, max=1.0, help="Detectors: NMS IoU threshold (default: the model's)."),
    max_det: int = typer.Option(None, "--max-det", min=1, help="Detectors: most detections per image (default: the model's)."),
    draw: bool = typer.Option(True, "--draw/--no-draw", help="Write one PNG per image with boxes, the top class or the class colours over the image (a segmentation model's index masks are written either way)."),
    on_error: str = typer.Option("skip", "--on-error", help="An unreadable image: skip it (named on stderr and in "
                                 "predictions.json's 'skipped'; exit 0 while at least one image was read) or stop "
                                 "(exit 2, nothing written)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Run a classifier, detector or segmentation model on images: writes DIR/predictions.json and annotated
    PNGs (segmentation: per image <name>_mask.png with the class index of every pixel at the image's own size,
    <name>_colour.png and the overlay <name>.png).

    Input size, normalisation, class names and (for detectors) post-processing come from the model's metadata;
    detections are NMS-filtered with dlc's native code and given in the original images' pixels (xyxy)."""
    from dlc.runtime.predict import expand_images, write_outputs
    from dlc.runtime.predict import predict as run_predict

    try:
        from .bundle import model_file

        if output.exists() and not output.is_dir():
            raise DlcError(f"-o {output}: is a file; dlc predict writes a folder there (predictions.json and one "
                           "PNG per image): give a folder path")
        files = expand_images(images)
        with model_file(model) as onnx_file:  # a bundle: its verified model.onnx
            results, summary = run_predict(onnx_file, files, device, batch, top_k, conf, iou, max_det,
                                           on_error=on_error)
        summary["model"] = str(model)
        path = write_outputs(results, summary, output, images=draw)
    except DlcError as exc:
        _fail(exc)
    for s in summary["skipped"]:
        err.print("[yellow]warning:[/] ", end="")
        err.out(f"skipped {s['image']}: {s['error']}", highlight=False)
    if summary["skipped"]:
        err.out(f"{len(summary['skipped'])} of {len(files)} images could not be read (skipped; the others are in "
                f"{path})", highlight=False)
    if as_json:
        out.print_json(json.dumps({**summary, "results": [r.to_dict() for r in results], "json": str(path)}))
        return
    out.print(f"[bold]{model}[/] ({summary['task']}) on {summary['provider']}: {len(results)} image(s)")
    for r in results:
        if summary["task"] == "detection":
            found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in r.detections[:8]) or "nothing"
            more = f" (+{len(r.detections) - 8} more)" if len(r.detections) > 8 else ""
            out.print(f"  {r.path}: {len(r.detections)} detection(s): {found}{more}", highlight=False)
        elif summary["task"] == "segmentation":
            pixels = r.to_dict()["segmentation"]["pixels"]
            total = max(sum(pixels.values()), 1)
            shares = ", ".join(f"{name} {100 * n / total:.1f} %" for name, n in
                               sorted(pixels.items(), key=lambda kv: -kv[1]))
            out.print(f"  {r.path}: {shares} -> {r.files['mask']}", highlight=False)
        else:
            best = ", ".join(f"{t['label']} {t['score']:.3f}" for t in r.top[:3])
            out.print(f"  {r.path}: {best}", highlight=False)
    out.print(f"  results     {path}", highlight=False)


@app.command()
def bench(
    models: list[Path] = typer.Argument(..., help="ONNX model files; the first is the baseline."),
    batch: str = typer.Option("1", help="Comma-separated batch sizes, e.g. 1,32."),
    device: str = typer.Option("auto", "--device", "--provider", help="Execution provider: auto (TensorRT, CUDA, then CPU), tensorrt, cuda or cpu."),
    min_time: float = typer.Option(2.0, "--min-time", min=0.0,
                                   help="Seconds of measured time per model and batch (at least 20 runs)."),
    warmup: int = typer.Option(5, min=0, help="Warm-up runs per model and batch."),
    data: Path = typer.Option(None, "--data", help="YAML file with a data: section (e.g. the model's own YAML): "
                              "also measure top-1 accuracy and macro-F1 on its validation split."),
    threads: int = typer.Option(None, "--threads", min=1, show_default="onnxruntime's default",
                                help="onnxruntime intra-op threads for every model."),
    plot: Path = typer.Option(None, "--plot", help="Also write a PNG: accuracy vs latency with --data, else "
                              "latency bars."),
    postprocess: bool = typer.Option(False, "--postprocess", help="Time a detector without NMS inside together "
                                     "with dlc's NMS after each run, to compare it with an --embed-nms export."),
    trt_fp16: bool = typer.Option(False, "--trt-fp16", help="TensorRT: build fp16 engines."),
    trt_cache: Path = typer.Option(None, "--trt-cache", help="TensorRT: keep built engines in this folder (built "
                                   "once per model and GPU, not per run)."),
    io_binding: bool = typer.Option(False, "--io-binding", help="Also time each model with IO binding (inputs "
                                    "placed on the device once, outputs left there): without host copies."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Benchmark ONNX models side by side on one runtime: latency percentiles, throughput, size, parameters,
    MACs and the speed-up against the first model; with --data, accuracy beside them.

    Runs are interleaved (A, B, A, B, ...) so machine drift hits every model alike; the speed-up is the ratio
    of minimum latencies, which is steady on shared machines where the ratio of medians (shown beside it) is
    not. Runs above Q3 + 3·IQR are clipped from the percentiles. The speed-up's min-max over 5 blocks of rounds
    is shown too; where minima and medians, or the blocks, disagree by over 25 %, the rounds are doubled (twice at
    most, within a time budget) and a pair still unstable gets a warning and `unstable: true` in --json.

    The models are timed in a child process whose sessions share one onnxruntime thread pool: with a pool per
    session, the threads of the session that just ran keep spinning on the cores the next one needs, and that
    inflated the slower model's times (a pruned ResNet-20 measured 1.72x its baseline that way, 1.57x shared and
    1.60x with each model alone)."""
    from dlc.runtime.bench import bench_table, plot_bench
    from dlc.runtime.bench_isolated import bench_isolated as run_bench

    try:
        try:
            batches = [int(b) for b in batch.split(",") if b.strip()]
        except ValueError:
            raise DlcError(f"--batch: expected comma-separated integers such as 1,32, got '{batch}'") from None
        result = run_bench(models, batches, device=device, min_time_s=min_time, warmup=warmup, data=data,
                           threads=threads, postprocess=postprocess, trt_fp16=trt_fp16,
                           trt_cache=trt_cache, io_binding=io_binding)
        if plot is not None:
            plot_bench(result, plot)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(bench_table(result))
    for note in result.notes:
        out.print(f"  note        {note}", highlight=False)
    runs = ", ".join(f"{r.model} b{r.batch}: {r.runs} runs" + (f", {r.clipped} clipped" if r.clipped else "")
                     for r in result.rows)
    out.print(f"  runs        {runs}", highlight=False)
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if plot is not None:
        out.print(f"  plot        {plot}", highlight=False)


@app.command("eval")
def eval_cmd(
    gt: Path = typer.Option(None, "--gt", help="COCO instances JSON (images, annotations, categories)."),
    pred: Path = typer.Option(None, "--pred", help="COCO results JSON: a list of {image_id, category_id, "
                              "bbox [x, y, w, h], score}."),
    iou: float = typer.Option(0.5, "--iou", min=0.0, max=1.0, help="IoU threshold of the VOC metrics."),
    score: float = typer.Option(0.5, "--score", min=0.0, max=1.0,
                                help="Score threshold for TP/FP/FN, precision, recall and F1."),
    plot: Path = typer.Option(None, "--plot", help="Also write a PNG of the per-class PR curves here."),
    model: Path = typer.Option(None, "--model", help="Evaluate this ONNX model (made by dlc) instead of files."),
    data: Path = typer.Option(None, "--data", help="With --model: a YAML whose data: section gives the "
                              "validation split (usually the model's own YAML)."),
    save: Path = typer.Option(None, "--save", help="With --model: also write the ground truth and detections as "
                              "COCO JSON here (DIR/instances.json, DIR/detections.json)."),
    device: str = typer.Option("auto", "--device", "--provider", help="Execution provider: With --model: auto (TensorRT, CUDA, then CPU), tensorrt, cuda or cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Evaluate detections against COCO ground truth: the 12 COCO statistics (as pycocotools' COCOeval),
    VOC mAP (all-point and 11-point) at --iou, and precision/recall/F1 at --score; crowd GT counts as
    difficult in the VOC metrics.

    Either from files (--gt instances.json --pred detections.json) or end to end (--model model.onnx --data
    model.yaml): the model runs through onnxruntime on the data section's validation split, its detections go
    through dlc's NMS (confidence threshold 0.001, the model's NMS settings) and are scored the same way. A
    classifier given --model/--data gets top-1 accuracy and macro-F1; a segmentation model mIoU, pixel
    accuracy, mean class accuracy, frequency-weighted IoU, mDice and per-class IoU/Dice (ignored pixels left
    out)."""
    from dlc.runtime.coco import coco_report
    from dlc.runtime.metrics import plot_pr_curves

    try:
        if model is not None or data is not None:
            if model is None or data is None or gt is not None or pred is not None:
                raise DlcError("dlc eval: pass either --model model.onnx --data model.yaml, or --gt instances.json "
                               "--pred detections.json")
            report = _eval_model(model, data, device, iou, score, save, as_json)
            if report is None:
                return
            gt, pred = data, model  # printed as "model vs data"
        elif gt is None or pred is None:
            raise DlcError("dlc eval: pass both --gt instances.json and --pred detections.json (or --model and "
                           "--data)")
        else:
            report = coco_report(gt, pred, iou, score)
        if plot is not None:
            plot_pr_curves(report.voc, plot, f"{pred.name} vs {gt.name}", report.coco.category_names)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    c = report.coco
    out.print(f"[bold]{pred}[/] vs {gt}: {c.num_detections:,} detections, {c.num_gt:,} GT boxes, "
              f"{c.num_images:,} images, {len(c.category_ids)} categories")
    out.print(report.summary(), highlight=False)
    if plot is not None:
        out.print(f"  plot        {plot}", highlight=False)


def _eval_model(model: Path, data: Path, device: str, iou: float, score: float, save: Path | None, as_json: bool):
    """`dlc eval --model --data`: a detector's CocoReport; a classifier's accuracy is printed here (returns None)."""
    from dlc.runtime import Session
    from dlc.runtime.coco import coco_report
    from dlc.runtime.evaluate import Evaluator, coco_results, detect_validation, read_data_spec

    from .atomic import write_json
    from .bundle import model_file

    with model_file(model) as onnx_file:  # a bundle: its verified model.onnx (loaded into memory here)
        session = Session(onnx_file, device=device)
    spec = read_data_spec(data)
    if (session.metadata or {}).get("task") != "detection":
        result = Evaluator(spec).evaluate(session)
        if as_json:
            out.print_json(json.dumps({"model": str(model), "data": str(data), **result.to_dict()}))
        elif result.task == "segmentation":
            _print_segmentation(model, data, result.details)
        else:
            out.print(f"[bold]{model}[/] on the validation split of {data}: top-1 accuracy {result.accuracy:.4f} "
                      f"({result.correct}/{result.total}), macro-F1 {result.macro_f1:.4f}")
        if not as_json:
            for note in result.notes:
                err.print(f"[yellow]note:[/] {note}", highlight=False)
        return None
    val, preds, _ = detect_validation(session, spec)
    instances, detections = coco_results(val, preds)
    if save is not None:
        write_json(save / "instances.json", instances)
        write_json(save / "detections.json", detections)
    return coco_report(instances, detections, iou, score)


def _print_segmentation(model: Path, data: Path, m: dict) -> None:
    from rich.table import Table

    out.print(f"[bold]{model}[/] on the validation split of {data} ({m['pixels']:,} pixels counted): "
              f"mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_accuracy']:.4f}, mean class accuracy "
              f"{m['mean_accuracy']:.4f}, frequency-weighted IoU {m['fwiou']:.4f}, mDice {m['mdice']:.4f}",
              highlight=False)
    table = Table("class", "IoU", "Dice", "accuracy", "pixels")

    def cell(v):
        return "-" if v is None else f"{v:.4f}"

    for name, c in m["per_class"].items():
        table.add_row(name, cell(c["iou"]), cell(c["dice"]), cell(c["accuracy"]), f"{c['pixels']:,}")
    out.print(table)


@app.command()
def info(
    model: Path = typer.Argument(..., help="ONNX model file."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON (the full metadata included)."),
) -> None:
    """What an ONNX file is and how to use it: opset, IR version and the oldest onnxruntime that loads it,
    precision, inputs and outputs, op histogram, params and MACs, and dlc's metadata (task, preprocessing,
    classes, output convention, pass log). Works on any ONNX file; says so when it has no dlc metadata."""
    from dlc.runtime.info import info_lines, model_info

    try:
        result = model_info(model)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(result))
        return
    for label, text in info_lines(result):
        style = "bold yellow" if label == "problem" else "bold"
        out.print(f"[{style}]{label:>12}[/]  ", end="")
        out.out(text, highlight=False)



@app.command()
def package(
    model: Path = typer.Argument(..., help="ONNX model written by dlc (compile, export, quantize, prune)."),
    output: Path = typer.Option(..., "-o", "--output", help="The bundle to write (.tar.gz)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """A bundle that runs with onnxruntime, numpy and Pillow only: model.onnx, model.ort with its
    required_operators_and_types.config (for reduced onnxruntime builds), labels.txt, a parity sample, run.py
    (preprocess from the metadata, run, post-process, JSON out; `run.py --check` runs the parity sample) and
    manifest.json (sha256 and size of every file, opset, IR, inputs/outputs, metadata, minimum onnxruntime)."""
    from .bundle import package as make

    try:
        manifest = make(model, output, console=None if as_json else err)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(manifest))
        return
    total = sum(f["bytes"] for f in manifest["files"].values())
    out.print(f"[bold green]packaged[/] {output}: {len(manifest['files']) + 1} files, {total / 1024:.1f} KiB "
              f"unpacked; opset {manifest['opset']}, IR {manifest['ir_version']}, {manifest['precision']}, "
              f"onnxruntime {manifest['min_onnxruntime'] or '?'} or newer", highlight=False)
    out.print(f"  on the device: tar xzf {output.name} && python run.py --check && python run.py IMAGES",
              highlight=False)


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="A bundle from dlc package (.tar.gz)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a bundle: unpack it safely (no absolute paths, '..', links or devices), check every file's sha256
    against the manifest, load model.onnx and model.ort in onnxruntime and run the parity sample."""
    from .bundle import verify as check_bundle

    try:
        report = check_bundle(bundle)
    except DlcError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(report))
        return
    worst = max(report["parity"]["max_scaled_error"].values(), default=0.0)
    out.print(f"[bold green]verified[/] {bundle}: {report['files']} files match the manifest; model.onnx and "
              f"model.ort load in onnxruntime {report['onnxruntime']} and match the parity sample (worst "
              f"{worst:.2g} of scale, allowed {report['parity']['rtol']:g})", highlight=False)

def _read_inputs(path: Path, session) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DlcError(f"{path}: file not found") from None
    except (ValueError, OSError) as exc:
        raise DlcError(f"{path}: not a readable .npy/.npz array file ({exc})") from None
    names = [a.name for a in session.inputs]
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise DlcError(f"{path}: the model has {len(names)} inputs; pass an .npz with arrays {names}")
        return {names[0]: data.astype(np.float32)}
    missing = [n for n in names if n not in data.files]
    if missing:
        raise DlcError(f"{path}: no array for input(s) {missing}; the file holds {data.files}")
    return {n: data[n].astype(np.float32) for n in names}


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # outside any command (while the CLI starts)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
