"""A built-in synthetic classification set: one shape per class (disc, square, triangle, plus, ring, bars,
diamond, X, half-disc, frame, dot pair) at a random position, size and colour over a noisy background, made on
the fly and deterministic by seed. Drawn with numpy broadcasting over the whole set — no loop over pixels."""

from __future__ import annotations

import numpy as np

SHAPES = ("disc", "square", "triangle", "plus", "ring", "hbar", "vbar", "diamond", "x", "half_disc", "frame",
          "dots")


def _mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the unit-sized shape covers the normalised coordinates (u right, v down, centre at 0)."""
    r2 = u * u + v * v
    au, av = np.abs(u), np.abs(v)
    cheb = np.maximum(au, av)
    if kind == "disc":
        return r2 <= 1
    if kind == "square":
        return cheb <= 0.8
    if kind == "triangle":
        return (v >= -0.8) & (v <= 0.8) & (au <= (v + 0.8) * 0.55)
    if kind == "plus":
        return ((au <= 0.25) & (av <= 0.95)) | ((av <= 0.25) & (au <= 0.95))
    if kind == "ring":
        return (r2 <= 1) & (r2 >= 0.3)
    if kind == "hbar":
        return (av <= 0.3) & (au <= 1)
    if kind == "vbar":
        return (au <= 0.3) & (av <= 1)
    if kind == "diamond":
        return au + av <= 1
    if kind == "x":
        return ((np.abs(u - v) <= 0.35) | (np.abs(u + v) <= 0.35)) & (cheb <= 0.9)
    if kind == "half_disc":
        return (r2 <= 1) & (v >= 0)
    if kind == "frame":
        return (cheb <= 0.95) & (cheb >= 0.6)
    if kind == "dots":
        return ((u - 0.5) ** 2 + v * v <= 0.16) | ((u + 0.5) ** 2 + v * v <= 0.16)
    raise ValueError(kind)


def make_shapes(samples: int, num_classes: int, shape: tuple[int, int, int], seed: int = 0,
                noise: float = 0.06) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (images float32 N×C×H×W in [0, 1], labels int64, class names)."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"the synthetic set has 2 to {len(SHAPES)} classes, asked for {num_classes}")
    c, h, w = shape
    rng = np.random.default_rng([seed, 7919])
    labels = np.arange(samples) % num_classes
    rng.shuffle(labels)
    side = min(h, w)
    radius = rng.uniform(0.22, 0.38, samples) * side
    cy = rng.uniform(radius, h - radius)
    cx = rng.uniform(radius, w - radius)
    yy = np.arange(h, dtype=np.float32)[None, :, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, None, :] + 0.5
    u = (xx - cx[:, None, None]) / radius[:, None, None]
    v = (yy - cy[:, None, None]) / radius[:, None, None]
    mask = np.zeros((samples, h, w), bool)
    for k in range(num_classes):
        idx = labels == k
        mask[idx] = _mask(SHAPES[k], u[idx], v[idx])
    background = rng.uniform(0.0, 0.45, (samples, c, 1, 1))
    foreground = np.clip(background + rng.uniform(0.35, 0.55, (samples, c, 1, 1)), 0, 1)
    images = np.where(mask[:, None], foreground, background)
    images = images + rng.normal(0, noise, images.shape)
    return np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int64), list(SHAPES[:num_classes])
