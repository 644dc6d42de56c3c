"""The `prune:` section, checked value by value into a typed PruneConfig (each problem with its YAML line).

Structure (unknown keys, types) is checked in sections.py; this adds choices, ranges, layer patterns and the
fine-tuning settings: `fine_tune:` takes any train: key, on top of the train: section's values (so a fine-tune
inherits the solver, batch size and loss), and is checked exactly like train:.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from ..errors import Diagnostic, did_you_mean
from ..yaml_loader import LDict

METHODS = ("structured", "unstructured")
IMPORTANCE = {"structured": ("l1", "l2", "bn_scale", "random"), "unstructured": ("magnitude",)}
SCOPES = ("layer", "global")
SCHEDULES = ("oneshot", "gmp")


def auto_round_to() -> int:
    """The channel block of onnxruntime's CPU convolutions on this machine: its NCHWc layout (MLAS) works in
    blocks of 16 channels with AVX-512F and 8 with AVX/AVX2, padding a layer's channels up to the next block, so
    a width between two multiples costs what the upper one does. 1 (no rounding) elsewhere (e.g. ARM64, where
    onnxruntime does not use NCHWc). This is the machine dlc runs on: prune on (a CPU like) the target."""
    import dlc._C as native

    features = native.cpu_features()
    if features.get("AVX512F"):
        return 16
    if features.get("AVX2") or features.get("AVX"):
        return 8
    return 1


@dataclass
class PruneConfig:
    method: str = "structured"
    importance: str = "l1"
    amount: float = 0.5  # structured: fraction of channels removed per group; unstructured: target sparsity
    scope: str = "layer"
    layers: dict[str, float] = field(default_factory=dict)  # name or pattern -> own amount (0 keeps it whole)
    exclude: list[str] = field(default_factory=list)
    round_to: int = 1
    round_to_auto: bool = False  # round_to came from `auto` (auto_round_to)
    steps: int = 1
    schedule: str = "oneshot"
    bn_l1: float = 0.0
    fine_tune_epochs: int = 0
    fine_tune: Any = None  # train.config.TrainConfig, None when there is nothing to fine-tune with
    target: Any = None  # speed_target.SpeedTarget: widths chosen to a measured speed-up instead of `amount`

    def step_amount(self, amount: float, step: int) -> float:
        """The cumulative amount after `step` of `steps`: each step removes the same fraction of what is left,
        so the kept fraction after the last step is exactly 1 - amount."""
        return 1.0 - (1.0 - amount) ** (step / self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "importance": self.importance, "amount": self.amount, "scope": self.scope,
                "layers": dict(self.layers), "exclude": list(self.exclude), "round_to": self.round_to,
                "round_to_auto": self.round_to_auto,
                "steps": self.steps, "schedule": self.schedule, "bn_l1": self.bn_l1,
                "fine_tune_epochs": self.fine_tune_epochs,
                "target": self.target.to_dict() if self.target is not None else None}


def default_fine_tune_epochs(train_epochs: int | None) -> int:
    return max(1, (train_epochs or 4) // 4)


def fine_tune_config(train: dict | None, fine_tune: dict | None, file: str, layer_names: list[str],
                     path: str = "prune.fine_tune"):
    """(TrainConfig, epochs or None when not given, diagnostics) from train: merged with fine_tune:."""
    from ..sections import SCHEMAS, _check
    from ..train.config import parse_train

    train, fine_tune = train or {}, fine_tune or {}
    diags = _check(path, fine_tune, SCHEMAS["train"], file, getattr(fine_tune, "line", None)) if fine_tune else []
    # init_from, reinit and strict set the starting weights of training; fine-tuning starts from the pruned ones
    merged = LDict({k: v for k, v in train.items() if k not in ("epochs", "max_iter", "init_from", "reinit",
                                                                 "strict")})
    merged.key_lines = {**getattr(train, "key_lines", {}), **getattr(fine_tune, "key_lines", {})}
    merged.line = getattr(fine_tune, "line", None) or getattr(train, "line", None)
    epochs = None
    for k, v in fine_tune.items():
        if k == "epochs":
            epochs = v
        elif k in SCHEMAS["train"]:
            merged[k] = v
    for key in ("init_from", "reinit", "strict"):
        if key in fine_tune:
            diags.append(Diagnostic(f"'{path}.{key}' is not allowed: fine-tuning starts from the pruned weights "
                                    "(set it in train:)", file=file, line=fine_tune.line_of(key)
                                    if isinstance(fine_tune, LDict) else None))
            merged.pop(key, None)
    cfg, more = parse_train(merged, file, layer_names)
    diags += [Diagnostic(d.message.replace("'train.", f"'{path}."), file=d.file, line=d.line, hint=d.hint)
              for d in more]
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0):
        line = fine_tune.line_of("epochs") if isinstance(fine_tune, LDict) else None
        diags.append(Diagnostic(f"'{path}.epochs' must be an integer >= 0 (0: prune without fine-tuning), got "
                                f"{epochs!r}", file=file, line=line))
        epochs = None
    return cfg, epochs, diags


def parse_prune(section: LDict, file: str, layer_names: list[str], train: dict | None = None,
                has_data: bool = False, section_line: int | None = None) -> tuple[PruneConfig, list[Diagnostic]]:
    diags: list[Diagnostic] = []

    def line(key: str, within=None) -> int | None:
        m = within if within is not None else section
        return m.line_of(key) if isinstance(m, LDict) else section_line

    def error(message: str, key: str, hint: str | None = None, within=None) -> None:
        diags.append(Diagnostic(message, file=file, line=line(key, within), hint=hint))

    def choice(key: str, default: str, choices) -> str:
        value = section.get(key, default)
        if value not in choices:
            error(f"'prune.{key}' must be one of {', '.join(choices)}, got {value!r}", key,
                  did_you_mean(str(value), choices))
            return default
        return value

    def fraction(value: Any, where: str, key: str, within=None) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            error(f"'{where}' must be a number in [0, 1) (the fraction removed), got {value!r}", key, within=within)
            return None
        return float(value)

    def known(pattern: str, where: str, key: str, within=None) -> bool:
        if any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in layer_names):
            return True
        error(f"'{where}' names '{pattern}', which matches no layer", key,
              did_you_mean(pattern, layer_names) or "give a layer name or a pattern such as 'stage1_*'", within)
        return False

    c = PruneConfig()
    c.method = choice("method", "structured", METHODS)
    c.importance = choice("importance", IMPORTANCE[c.method][0], IMPORTANCE[c.method])
    if isinstance(section.get("amount"), (int, float)):  # other types are reported by sections.py
        c.amount = fraction(section["amount"], "prune.amount", "amount") or 0.0
    c.scope = choice("scope", "layer", SCOPES)
    layers = section.get("layers", {})
    if not isinstance(layers, dict):
        error("'prune.layers' maps layer names or patterns to their own amount, e.g. {conv1: 0.3, 'stage3_*': 0.6}",
              "layers")
    else:
        for pattern, value in layers.items():
            r = fraction(value, f"prune.layers.{pattern}", pattern, layers)
            if known(str(pattern), f"prune.layers.{pattern}", pattern, layers) and r is not None:
                c.layers[str(pattern)] = r
    exclude = section.get("exclude", [])
    if isinstance(exclude, list):
        for item in exclude:
            if not isinstance(item, str):
                error(f"'prune.exclude' lists layer names, got {item!r}", "exclude")
            elif known(item, "prune.exclude", "exclude"):
                c.exclude.append(item)
    round_to = section.get("round_to", 1)
    if round_to == "auto":
        c.round_to = auto_round_to()
        c.round_to_auto = True
    elif isinstance(round_to, bool) or not isinstance(round_to, int):
        error(f"'prune.round_to' is a channel multiple (an integer >= 1) or auto (what onnxruntime's CPU kernels "
              f"block channels by here: {auto_round_to()}), got {round_to!r}", "round_to")
    for key, lo in (("round_to", 1), ("steps", 1)):
        v = section.get(key, 1)
        if isinstance(v, int) and not isinstance(v, bool) and v < lo:
            error(f"'prune.{key}' must be an integer >= {lo}, got {v!r}", key)
        elif isinstance(v, int) and not isinstance(v, bool):
            setattr(c, key, v)
    c.schedule = choice("schedule", "oneshot", SCHEDULES)
    if c.schedule == "gmp" and c.method != "unstructured":
        error("'prune.schedule: gmp' (gradual magnitude pruning) is for method unstructured", "schedule")
    bn_l1 = section.get("bn_l1", 0.0)
    if isinstance(bn_l1, bool) or not isinstance(bn_l1, (int, float)):
        pass  # reported by sections.py
    elif bn_l1 < 0:
        error(f"'prune.bn_l1' must be a number >= 0 (the L1 penalty on batch-norm scales), got {bn_l1!r}", "bn_l1")
    else:
        c.bn_l1 = float(bn_l1)
        if c.bn_l1 and train is None:
            error("'prune.bn_l1' applies during training: it needs a 'train:' section", "bn_l1")
    if "target" in section:
        c.target = _parse_target(section, c, error)
    ft = section.get("fine_tune")
    if ft is not None and not isinstance(ft, dict):
        error("'prune.fine_tune' takes train: keys, e.g. {epochs: 4, base_lr: 0.01}", "fine_tune")
        ft = None
    ft_cfg, epochs, more = fine_tune_config(train, ft, file, layer_names)
    diags += more
    if not has_data:
        if epochs:
            error("fine-tuning after pruning needs a 'data:' section saying what to train on (or set "
                  "prune.fine_tune.epochs: 0 to prune only)", "fine_tune")
        c.fine_tune_epochs, c.fine_tune = 0, None
    else:
        c.fine_tune = ft_cfg
        train_epochs = (train or {}).get("epochs")
        c.fine_tune_epochs = epochs if epochs is not None else default_fine_tune_epochs(
            train_epochs if isinstance(train_epochs, int) else None)
    return c, diags


def _parse_target(section: LDict, c: PruneConfig, error):
    """prune.target: {speedup, batch, device, threads} into a SpeedTarget, or None after reporting problems."""
    from dlc.runtime.session import DEVICES

    from .speed_target import SpeedTarget

    t = section["target"]
    if not isinstance(t, dict):
        error("'prune.target' takes {speedup: 2.0, batch: 1} (and optionally device, threads): the measured "
              "speed-up on onnxruntime to prune to", "target")
        return None
    ok = True
    for key in t:
        if key not in ("speedup", "batch", "device", "threads"):
            error(f"unknown key 'prune.target.{key}'", key, did_you_mean(str(key), ("speedup", "batch", "device",
                                                                                    "threads")), t)
            ok = False
    speedup = t.get("speedup")
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or speedup <= 1.0:
        error(f"'prune.target.speedup' must be a number > 1 (e.g. 2.0: twice as fast as the unpruned model), got "
              f"{speedup!r}", "speedup" if "speedup" in t else "target", within=t if "speedup" in t else None)
        ok = False
    for key in ("batch", "threads"):
        v = t.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            error(f"'prune.target.{key}' must be an integer >= 1, got {v!r}", key, within=t)
            ok = False
    device = t.get("device", "cpu")
    if device not in DEVICES:
        error(f"'prune.target.device' must be one of {', '.join(DEVICES)}, got {device!r}", "device",
              did_you_mean(str(device), DEVICES), t)
        ok = False
    if c.method != "structured":
        error("'prune.target' needs method structured: zeroed weights (unstructured) do not make onnxruntime "
              "faster", "target")
        ok = False
    for key, why in (("amount", "the search chooses each group's amount"),
                     ("layers", "the search chooses each layer's amount; list layers to keep whole in exclude")):
        if key in section:
            error(f"'prune.{key}' and 'prune.target' do not go together: {why}", key)
            ok = False
    if not ok:
        return None
    return SpeedTarget(float(speedup), int(t.get("batch", 1)), device, t.get("threads"))
