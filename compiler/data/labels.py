"""Class labels that match the data: model.classes, the data set's classes and the model's output width agree.

Checked when a YAML file is loaded (every command), from what is cheap to know without reading images: the
names of the built-in sets, an ImageFolder's sub-folders, a yolo set's class list. A data root that does not
exist (yet) is left to the loader, which says so when data is needed.

The class index of an ImageFolder is its sorted folder order. When model.classes names the same classes in
another order, dlc refuses rather than remapping: the order of model.classes is the order of the model's
outputs, and a checkpoint trained with one order must never be relabelled silently by editing the YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import Diagnostic, DlcError
from .synthetic import SHAPES

DIGITS = [str(k) for k in range(10)]


def _line(section: Any, key: str) -> int | None:
    return section.line_of(key) if hasattr(section, "line_of") and key in section else None


def data_classes(cfg: Any, base_dir: Path, width: int | None) -> tuple[list[str] | None, str, str, str]:
    """(class names or None when they cannot be known cheaply, whose they are and what they are called (for
    messages), the data key that decides them). `width` is the model's output width, the synthetic set's
    default number of classes."""
    from .datasets import class_folders, image_folder_root

    kind = cfg.get("dataset")
    if kind == "synthetic":
        n = cfg.get("num_classes", width)
        if not isinstance(n, int) or not 2 <= n <= len(SHAPES):
            return None, "", "", "num_classes"
        return list(SHAPES[:n]), "the synthetic set", "classes", "num_classes" if "num_classes" in cfg else "dataset"
    if kind == "synthetic_detection":
        n = cfg.get("num_classes", 3)
        if not isinstance(n, int) or not 1 <= n <= len(SHAPES):
            return None, "", "", "num_classes"
        return list(SHAPES[:n]), "the synthetic_detection set", "classes", (
            "num_classes" if "num_classes" in cfg else "dataset")
    if kind == "synthetic_segmentation":
        n = cfg.get("num_classes", 4)
        if not isinstance(n, int) or not 2 <= n <= len(SHAPES) + 1:
            return None, "", "", "num_classes"
        return ["background", *SHAPES[:n - 1]], "the synthetic_segmentation set", "classes (background first)", (
            "num_classes" if "num_classes" in cfg else "dataset")
    if kind == "segmentation":
        from .segmentation import segmentation_classes

        try:
            names = segmentation_classes(cfg, base_dir)
        except (DlcError, OSError, UnicodeDecodeError):
            return None, "", "", "classes"  # reported with the file's name when the data is read
        if names is None:
            return None, "", "", "classes"
        return names, "data.classes" if "classes" in cfg else "the set's classes.txt", "names", (
            "classes" if "classes" in cfg else "root")
    if kind == "digits":
        return list(DIGITS), "the digits set", "classes", "dataset"
    if kind == "yolo" and isinstance(cfg.get("classes"), list):
        return [str(c) for c in cfg["classes"]], "data.classes", "names", "classes"
    if kind == "imagefolder" and isinstance(cfg.get("root"), str) and cfg["root"]:
        root = image_folder_root(cfg, base_dir)
        if (root / "train").is_dir() and (root / "val").is_dir():
            root = root / "train"
        try:
            if not root.is_dir():
                return None, "", "", "root"
            names = class_folders(root)
        except OSError:
            return None, "", "", "root"
        split = "/train" if root.name == "train" and root.parent == image_folder_root(cfg, base_dir) else ""
        return names, f"data.root '{cfg['root']}{split}'", "class folders", "root"
    return None, "", "", "dataset"  # coco: the categories are in the annotations file, checked when it is read


def output_width(graph, per_pixel: bool = False) -> tuple[int | None, str, str]:
    """(number of classes the model predicts, which layer sets it, how to change it) or (None, '', '') when it
    has no single class output: a detector's detect layer `classes`, else the width of a single flat output
    (per_pixel: the channels of a single C×H×W output, a segmentation model's)."""
    detect = [n for n in graph.nodes() if n.op == "detect"]
    if len(detect) == 1:
        node = detect[0]
        return (int(node.attrs["classes"]), f"detect layer '{node.name}' has classes: {node.attrs['classes']}",
                f"'classes: {{n}}' on detect layer '{node.name}'")
    if detect or len(graph.outputs) != 1:
        return None, "", ""
    out = graph.outputs[0]
    shape = graph.shapes.get(out)
    if shape is None or len(shape) != (3 if per_pixel else 1):
        return None, "", ""
    node = graph.producer(out)
    for _ in range(8):  # softmax, dropout, activations keep the width: name the layer that sets it
        if node is None or "out" in node.attrs or not node.inputs:
            break
        node = graph.producer(node.inputs[0])
    if node is not None and "out" in node.attrs:
        return (int(shape[0]), f"layer '{node.name}' has out: {node.attrs['out']}",
                f"'out: {{n}}' on layer '{node.name}'")
    return int(shape[0]), f"the output '{out}' has {shape[0]} values", "the last layer's width to {n}"


def per_pixel_output(spec, graph) -> Diagnostic | None:
    """A segmentation data set needs one output of class scores at the input's height and width."""
    _, h, w = spec.input.shape
    if len(graph.outputs) != 1:
        return Diagnostic(f"a segmentation model has one output (class scores per pixel); this model has "
                          f"{len(graph.outputs)}", file=spec.file, hint="name one output in model.outputs")
    out = graph.outputs[0]
    shape = tuple(graph.shapes.get(out) or ())
    if len(shape) == 3 and shape[1:] == (h, w):
        return None
    node = graph.producer(out)
    layer = node.name if node is not None else out
    return Diagnostic(f"the data is a segmentation set, so the output must be classes×{h}×{w} (a score per class "
                      f"for every input pixel), but '{out}' is {'×'.join(map(str, shape))}",
                      file=spec.file, line=node.source.line if node is not None else None, layer=layer,
                      hint="upsample back to the input size (conv_transpose or upsample) and end with a 1×1 conv "
                           "whose out is the number of classes")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:12])
    return f"[{shown}{', ...' if len(names) > 12 else ''}]"


def check_labels(spec, graph) -> list[Diagnostic]:
    """Every disagreement between model.classes, the data set's classes and the model's output width."""
    diags: list[Diagnostic] = []
    data = spec.sections.get("data")
    per_pixel = isinstance(data, dict) and data.get("dataset") in ("synthetic_segmentation", "segmentation")
    width, where, change = output_width(graph, per_pixel)
    classes, line = spec.classes, spec.classes_line
    if per_pixel:
        problem = per_pixel_output(spec, graph)
        if problem is not None:
            return [problem]
    if classes is not None:
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            diags.append(Diagnostic(f"'model.classes' repeats {', '.join(repeated)}: each output needs its own name",
                                    file=spec.file, line=line))
        if width is not None and len(classes) != width:
            diags.append(Diagnostic(
                f"'model.classes' names {len(classes)} classes but the model predicts {width} ({where})",
                file=spec.file, line=line, hint=f"list {width} names, or set {change.format(n=len(classes))}"))
    if not isinstance(data, dict) or spec.data is None:
        return diags
    if "classes" in data and data.get("dataset") not in ("yolo", "segmentation"):
        diags.append(Diagnostic(
            f"'data.classes' is only read by datasets yolo and segmentation (the names of their class numbers); "
            f"dataset "
            f"{data.get('dataset')!r} names its own classes", file=spec.file, line=_line(data, "classes"),
            hint="name the model's outputs with model.classes, or remove data.classes"))
        return diags
    names, whose, noun, key = data_classes(data, Path(spec.file).parent, width)
    if names is None:
        return diags
    data_line = _line(data, key) or spec.section_lines.get("data")
    if width is not None and len(names) != width:
        if data.get("dataset") == "imagefolder":
            fix = f"give data.root {width} class folders, or set {change.format(n=len(names))}"
        elif data.get("dataset") in ("synthetic", "synthetic_detection", "synthetic_segmentation"):
            fix = f"set data.num_classes to {width}, or {change.format(n=len(names))}"
        else:
            fix = f"set {change.format(n=len(names))}"
        diags.append(Diagnostic(f"{whose} has {len(names)} {noun} {_names(names)} but the model predicts {width} "
                                f"classes ({where})", file=spec.file, line=data_line, hint=fix))
    if classes is None or diags:  # a count already disagrees: that message says what to do
        return diags
    if classes == names:
        return diags
    if set(classes) == set(names):
        diags.append(Diagnostic(
            f"'model.classes' {_names(classes)} lists the {noun} of {whose} in another order: the data numbers "
            f"them {_names(names)}{' (sorted folder order)' if noun == 'class folders' else ''}, so predictions "
            f"would carry the wrong names", file=spec.file, line=line,
            hint=f"write model.classes: [{', '.join(names)}]; dlc does not reorder classes"))
        return diags
    extra = [c for c in classes if c not in names]
    missing = [n for n in names if n not in classes]
    parts = []
    if extra:
        parts.append(f"{', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not among them")
    if missing:
        parts.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing from model.classes")
    diags.append(Diagnostic(
        f"'model.classes' {_names(classes)} does not match the {noun} of {whose}, {_names(names)}: "
        f"{'; '.join(parts)}",
        file=spec.file, line=line,
        hint=f"write model.classes: [{', '.join(names)}], or remove it to use the data's names"))
    return diags
