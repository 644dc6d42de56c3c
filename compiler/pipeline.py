"""`dlc compile`: YAML -> validated Graph -> ONNX artifact, verified, with a JSON report beside it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .analysis import summarize
from .atomic import write_json
from .errors import DlcError
from .export_onnx import check, save, to_onnx
from .frontend import LoadedModel, load_model
from .graph import Graph
from .metadata import build_metadata


@dataclass
class CompileResult:
    onnx_path: Path
    report_path: Path
    report: dict[str, Any]


def artifact_metadata(loaded: LoadedModel, classes: list[str] | None = None) -> dict[str, Any]:
    """The self-description stored in the ONNX file under metadata key 'dlc' (schema: compiler/metadata.py).
    Class names come from the model (model.classes) or else from the data it was trained on. Opset, IR
    version, precision and the pass log are stamped on the finished file by metadata.finalize_metadata."""
    spec = loaded.spec
    return build_metadata(loaded.graph, model=spec.name, classes=spec.classes or classes,
                          yaml_sha256=spec.sha256)


def verify_on_runtime(model_bytes: bytes, graph: Graph, batch: int = 2) -> dict[str, Any]:
    """Load the artifact in onnxruntime, run random inputs and compare every output's shape with the inferred
    one (batch first): dlc's shape inference for the graph's tensors; for the outputs an export step adds (the
    embedded NMS's), the shape the artifact declares, its symbolic axes the batch. `matches_inferred` says
    whether all agree; `mismatches` gives each output that differs with its runtime and inferred shapes (None
    where nothing declares one)."""
    import onnx

    from dlc.runtime import Session

    session = Session(model_bytes, device="cpu")
    outputs = session.run(session.random_inputs(batch=batch))
    declared = {o.name: [d.dim_value if d.HasField("dim_value") else batch for d in o.type.tensor_type.shape.dim]
                for o in onnx.load_from_string(model_bytes).graph.output if o.type.tensor_type.HasField("shape")}
    mismatches: dict[str, dict[str, list[int] | None]] = {}
    for name, value in outputs.items():
        inferred = [batch, *graph.shapes[name]] if name in graph.shapes else declared.get(name)
        if list(value.shape) != inferred:
            mismatches[name] = {"runtime": list(value.shape), "inferred": inferred}
    for name, value in outputs.items():
        if not np.all(np.isfinite(value)):
            raise DlcError(f"output '{name}' holds NaN or inf on random inputs: check the model's initial weights")
    return {"provider": session.provider, "output_shapes": {k: list(v.shape) for k, v in outputs.items()},
            "matches_inferred": not mismatches, "mismatches": mismatches}


def _reuse(loaded: LoadedModel, out_dir: str | Path, console, world=None) -> dict[str, Any] | None:
    """A finished checkpoint's training summary when it can be reused (rank 0 decides for every rank)."""
    from .prune.pipeline import training_callbacks
    from .train.trainer import reuse_checkpoint

    if world is None or not world.distributed:
        return reuse_checkpoint(loaded, out_dir, console, training_callbacks(loaded.prune))
    reused = reuse_checkpoint(loaded, out_dir, console, training_callbacks(loaded.prune)) if world.is_root else None
    return world.broadcast_json(reused, "reuse decision")


def compile_model(yaml_path: str | Path, out_dir: str | Path, opset: int | None = None,
                  weights: str | Path | None = None, progress: bool = False, console=None,
                  skip_train: bool = False, retrain: bool = False, world=None) -> CompileResult | None:
    """Load, (train or load weights), export, verify. With a train: section and no `weights`, trains first
    (into out_dir: checkpoint, metrics, curves), so the ONNX carries the trained weights; a finished checkpoint
    in out_dir with the same training fingerprint is reused instead, unless `retrain`.

    With a distributed `world` (mpirun), every rank trains; the rest runs on rank 0, and the other ranks return
    None once training is done (or at once when there is nothing to train)."""
    from .artifact import finish, load_check, plan_opset

    loaded = load_model(yaml_path)
    helper = world is not None and not world.is_root  # a rank other than 0: it only trains
    if helper and (weights is not None or skip_train or loaded.spec.train is None):
        return None
    cfg = loaded.export
    plan = plan_opset(cfg, opset, loaded.spec.file)  # before training: a bad target fails in a second, not an hour
    options = {"opset": plan.opset, "dynamic": cfg.dynamic}
    training, classes = None, None
    if weights is not None:
        from .train.checkpoint import load_params_into, read_checkpoint
        from .train.trainer import restore_anchors

        params, _, _, info = read_checkpoint(weights)
        load_params_into(loaded.graph, params, str(weights))
        restore_anchors(loaded.graph, info)  # anchors: auto, as found when the weights were trained
        training, classes = {"weights": str(weights)}, info.get("classes")
    elif loaded.spec.train is not None and skip_train:
        training = {"skipped": True}
    elif loaded.spec.train is not None and not retrain and (reused := _reuse(loaded, out_dir, console, world)):
        if helper:
            return None
        training = reused
        classes = training.pop("classes")
    elif loaded.spec.train is not None:
        from .prune.pipeline import training_callbacks
        from .train.trainer import train_model

        result = train_model(loaded, out_dir, progress=progress, console=console,
                             callbacks=training_callbacks(loaded.prune), world=world)
        if helper:
            return None
        if result.stopped == "interrupted":
            raise DlcError(f"training was interrupted; the checkpoint in {out_dir} keeps its state: continue with "
                           f"`dlc train {yaml_path} -o {out_dir} --resume`, then `dlc compile {yaml_path} -o "
                           f"{out_dir} --weights {out_dir}/checkpoint.safetensors`")
        classes = result.classes
        training = {"stopped": result.stopped, "epochs": len(result.history), "seconds": result.seconds,
                    "best_epoch": result.best_epoch,
                    # val_accuracy for classifiers, val_map for detectors, val_miou for segmentation models
                    **{k: result.final.get(k) for k in ("train_loss", "val_loss", "val_accuracy", "val_map", "val_miou")
                       if k in result.final},
                    **({"transfer": result.transfer} if result.transfer is not None else {})}
    pruning = None
    if loaded.prune is not None:  # between training (or --weights) and export: the exported model is the pruned one
        import dataclasses

        from .prune.pipeline import run_prune

        prune_cfg = dataclasses.replace(loaded.prune, fine_tune_epochs=0) if skip_train else loaded.prune
        pruning = run_prune(loaded, prune_cfg, out_dir, progress=progress, console=console).to_dict()
    model = to_onnx(loaded.graph, metadata=artifact_metadata(loaded, classes), **options)
    check(model)
    optimization, reports = None, []
    if "optimize" in loaded.spec.sections:
        from .passes import optimize, verify

        section = loaded.spec.sections["optimize"]
        optimized, reports = optimize(model, section.get("passes"))
        check(optimized)
        runs = section.get("check", 3)
        proof = verify(model, optimized, runs, section.get("rtol", 1e-3), section.get("atol", 1e-4)) if runs else None
        optimization = {"passes": [r.to_dict() for r in reports], "nodes_before": len(model.graph.node),
                        "nodes_after": len(optimized.graph.node), "verification": proof.to_dict() if proof else None}
        model = optimized
    float_model = model
    finished = finish(model, cfg, plan, data=yaml_path if "data" in loaded.spec.sections else None,
                      source=str(yaml_path), console=console, passes=reports)
    model = finished.model
    if console is not None:
        console.print(f"opset {plan.opset}, IR version {model.ir_version}: {plan.reason}", highlight=False)
        for note in finished.notes:
            console.print(f"[yellow]note[/] {note}", highlight=False)
    data = model.SerializeToString()
    if finished.precision == "fp32" and not cfg.embed_argmax:
        verification = {"onnx_checker": "passed (full_check)", **verify_on_runtime(data, loaded.graph)}
    else:  # the float scores were verified against inference; the low-precision / ArgMax model loads and runs
        verification = {"onnx_checker": "passed (full_check)",
                        **verify_on_runtime(float_model.SerializeToString(), loaded.graph),
                        "provider": load_check(model, str(yaml_path))}
    if not verification["matches_inferred"]:  # dlc's shape inference and the exported graph disagree: our bug
        raise RuntimeError(f"onnxruntime's output shapes differ from dlc's inferred ones: "
                           f"{verification['mismatches']}; model.onnx not written")

    out_dir = Path(out_dir)
    onnx_path = out_dir / cfg.filename
    save(model, onnx_path)
    if finished.quantization is not None:
        from .atomic import write_json as _write_json

        _write_json(onnx_path.with_suffix(".quantization.json"), finished.quantization.to_dict())
    summary = summarize(loaded.graph)
    report = {
        "model": loaded.spec.name,
        "yaml": str(yaml_path),
        "yaml_sha256": loaded.spec.sha256,
        "dlc_version": __version__,
        "onnx": {"path": str(onnx_path), "opset": options["opset"], "ir_version": model.ir_version,
                 "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "nodes": len(model.graph.node),
                 "dynamic": list(cfg.dynamic), "precision": finished.precision},
        "target": plan.to_dict(),
        "export": finished.report(),
        "verification": verification,
        "training": training,
        "optimization": optimization,
        "pruning": pruning,
        "weights": loaded.graph.meta.get("weights") if weights is None else None,
        "summary": summary.to_dict(),
    }
    report_path = write_json(out_dir / "report.json", report)
    return CompileResult(onnx_path, report_path, report)
