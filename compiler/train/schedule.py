"""Learning-rate policies (Caffe's names) with optional linear warm-up, as a function of the iteration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

POLICIES = ("fixed", "step", "multistep", "exp", "poly", "cosine")


@dataclass
class LRSchedule:
    base_lr: float
    policy: str = "fixed"
    iters_per_epoch: int = 1
    total_iters: int = 1
    gamma: float = 0.1
    step_size: float = 1.0  # epochs (step)
    steps: list[float] = field(default_factory=list)  # epochs (multistep)
    power: float = 1.0  # poly
    min_lr: float = 0.0  # cosine and poly end here
    warmup_iters: int = 0
    warmup_start_factor: float = 0.1

    def __call__(self, iteration: int) -> float:
        """The learning rate for 0-based `iteration`."""
        epoch = iteration / self.iters_per_epoch
        p = self.policy
        if p == "fixed":
            lr = self.base_lr
        elif p == "step":
            lr = self.base_lr * self.gamma ** math.floor(epoch / self.step_size)
        elif p == "multistep":
            lr = self.base_lr * self.gamma ** sum(epoch >= s for s in self.steps)
        elif p == "exp":
            lr = self.base_lr * self.gamma ** epoch
        elif p == "poly":
            frac = min(iteration / max(self.total_iters, 1), 1.0)
            lr = self.min_lr + (self.base_lr - self.min_lr) * (1 - frac) ** self.power
        elif p == "cosine":
            frac = min(iteration / max(self.total_iters, 1), 1.0)
            lr = self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
        else:
            raise ValueError(f"unknown lr policy {p!r}")
        if iteration < self.warmup_iters:
            start = self.warmup_start_factor
            lr *= start + (1 - start) * iteration / self.warmup_iters
        return lr
