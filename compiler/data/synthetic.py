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


DIFFICULTIES = ("easy", "hard")


def make_shapes(samples: int, num_classes: int, shape: tuple[int, int, int], seed: int = 0,
                noise: float | None = None, difficulty: str = "easy") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (images float32 N×C×H×W in [0, 1], labels int64, class names).

    `difficulty: easy` (the default) draws one large, high-contrast shape (radius 22–38 % of the side) over a
    flat background with a little noise: ResNet-20 scores 100 % on it, so it cannot tell a good model from a
    slightly worse one. `hard` draws it small (radius 11–19 %), at low contrast (the shape lighter or darker
    than the background, per channel), over a lit gradient with stronger noise and four small clutter blobs of
    random colour, some of which touch the shape: the accuracy it gives moves when a model gets worse (ResNet-20
    lands near 90 %, see the README)."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"the synthetic set has 2 to {len(SHAPES)} classes, asked for {num_classes}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    hard = difficulty == "hard"
    noise = (0.08 if hard else 0.06) if noise is None else noise
    c, h, w = shape
    rng = np.random.default_rng([seed, 7919])
    labels = np.arange(samples) % num_classes
    rng.shuffle(labels)
    side = min(h, w)
    radius = rng.uniform(*((0.17, 0.27) if hard else (0.22, 0.38)), samples) * side
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
    if not hard:
        foreground = np.clip(background + rng.uniform(0.35, 0.55, (samples, c, 1, 1)), 0, 1)
        images = np.where(mask[:, None], foreground, background)
    else:
        background = background + 0.25  # room for darker shapes
        contrast = rng.uniform(0.18, 0.40, (samples, c, 1, 1)) * rng.choice([-1.0, 1.0], (samples, c, 1, 1))
        tilt = rng.normal(0, 0.25, (samples, 1, 2))  # lighting: a linear gradient across the image
        gradient = (tilt[:, :, :1, None] * (yy / h - 0.5) + tilt[:, :, 1:, None] * (xx / w - 0.5))
        lit = background + gradient
        images = np.where(mask[:, None], lit + contrast, lit)
        for _ in range(3):  # clutter: small blobs of random colour anywhere, over or beside the shape
            br = rng.uniform(0.03, 0.07, samples) * side
            by, bx = rng.uniform(0, h, samples), rng.uniform(0, w, samples)
            blob = ((yy - by[:, None, None]) ** 2 + (xx - bx[:, None, None]) ** 2) <= (br ** 2)[:, None, None]
            images = np.where(blob[:, None], rng.uniform(0.1, 0.9, (samples, c, 1, 1)), images)
    images = images + rng.normal(0, noise, images.shape)
    return np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int64), list(SHAPES[:num_classes])
