"""Batch augmentation on images in [0, 1]: horizontal mirror, random crop with zero padding, and AlexNet's
PCA colour augmentation. Each works on a whole batch with numpy indexing; randomness comes from the caller's
generator, so a batch's augmentation is a function of (seed, epoch, iteration)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AugmentConfig:
    mirror: bool = False
    crop_pad: int = 0  # random crop of the original size out of the image padded by this many pixels
    pca_color: float = 0.0  # std of AlexNet's per-image colour-shift coefficients (0.1 in the paper)

    @property
    def active(self) -> bool:
        return self.mirror or self.crop_pad > 0 or self.pca_color > 0


def pca_basis(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the channel covariance over the training images."""
    c = images.shape[1]
    pixels = images.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64)
    cov = np.atleast_2d(np.cov(pixels))
    values, vectors = np.linalg.eigh(cov)
    return np.clip(values, 0, None).astype(np.float32), vectors.astype(np.float32)


def augment(x: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator,
            pca: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    n, c, h, w = x.shape
    if cfg.mirror:
        flip = rng.random(n) < 0.5
        x = x.copy()
        x[flip] = x[flip, :, :, ::-1]
    if cfg.crop_pad > 0:
        p = cfg.crop_pad
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        dy = rng.integers(0, 2 * p + 1, n)
        dx = rng.integers(0, 2 * p + 1, n)
        rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
        cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
        batch = np.arange(n)[:, None, None]
        # padded[b, :, rows, cols] with the advanced indices first gives (n, h, w, c)
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].transpose(0, 3, 1, 2)
    if cfg.pca_color > 0 and pca is not None:
        values, vectors = pca
        alpha = rng.normal(0, cfg.pca_color, (n, c)).astype(np.float32)
        shift = (alpha * values[None, :]) @ vectors.T  # (n, c)
        x = np.clip(x + shift[:, :, None, None], 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)
