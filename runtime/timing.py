"""Latency measurement: warm-up runs, then timed runs; the median is the number to quote on shared machines."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Latency:
    runs: int
    median_ms: float
    mean_ms: float
    p90_ms: float
    min_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def measure(fn, runs: int = 20, warmup: int = 3) -> Latency:
    for _ in range(warmup):
        fn()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn()
        times[i] = (time.perf_counter() - start) * 1e3
    return Latency(runs, float(np.median(times)), float(times.mean()), float(np.percentile(times, 90)),
                   float(times.min()))
