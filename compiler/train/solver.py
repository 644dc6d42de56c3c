"""Parameter updates: SGD with momentum or Nesterov momentum, Adam and AdamW; L2 weight decay and L1;
per-tensor learning-rate multipliers and frozen tensors; gradient clipping by global norm.

Updates happen in place on the graph's parameter arrays, so the graph always holds the current weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SOLVERS = ("sgd", "adam", "adamw")


@dataclass
class SolverConfig:
    solver: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    l1: float = 0.0
    clip_grad_norm: float | None = None


class Solver:
    """`params` maps "node.tensor" names to the live float32 arrays; `lr_mult` scales each (0 freezes it)."""

    def __init__(self, params: dict[str, np.ndarray], config: SolverConfig, lr_mult: dict[str, float] | None = None):
        self.params = params
        self.config = config
        self.lr_mult = {k: (lr_mult or {}).get(k, 1.0) for k in params}
        self.state: dict[str, np.ndarray] = {}
        self.steps = 0
        for name, p in params.items():
            if self.lr_mult[name] == 0:
                continue
            if config.solver == "sgd":
                self.state[f"momentum/{name}"] = np.zeros_like(p)
            else:
                self.state[f"m/{name}"] = np.zeros_like(p)
                self.state[f"v/{name}"] = np.zeros_like(p)

    def grad_norm(self, grads: dict[str, np.ndarray]) -> float:
        return math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads.values()))

    def step(self, grads: dict[str, np.ndarray], lr: float) -> float:
        """Apply one update; returns the gradient's global norm (before clipping)."""
        c = self.config
        grads = {k: g for k, g in grads.items() if self.lr_mult.get(k, 0) != 0}
        norm = self.grad_norm(grads)
        scale = 1.0
        if c.clip_grad_norm and norm > c.clip_grad_norm:
            scale = c.clip_grad_norm / (norm + 1e-12)
        self.steps += 1
        for name, g in grads.items():
            p = self.params[name]
            g = g * scale if scale != 1.0 else g.copy()
            if c.weight_decay and c.solver != "adamw":
                g += c.weight_decay * p
            if c.l1:
                g += c.l1 * np.sign(p)
            step_lr = lr * self.lr_mult[name]
            if c.solver == "sgd":
                buf = self.state[f"momentum/{name}"]
                buf *= c.momentum
                buf += g
                p -= step_lr * (g + c.momentum * buf if c.nesterov else buf)
            else:
                b1, b2 = c.betas
                m, v = self.state[f"m/{name}"], self.state[f"v/{name}"]
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                m_hat = m / (1 - b1 ** self.steps)
                v_hat = v / (1 - b2 ** self.steps)
                if c.solver == "adamw" and c.weight_decay:
                    p -= step_lr * c.weight_decay * p
                p -= step_lr * m_hat / (np.sqrt(v_hat) + c.eps)
        return norm
