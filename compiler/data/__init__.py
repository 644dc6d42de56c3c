"""Datasets (built-in synthetic shapes, scikit-learn's digits, ImageFolder directories), augmentation and a
background-thread batch loader. Every dataset yields float32 images in [0, 1], N×C×H×W, at the model's input
size, and int64 labels."""

from .datasets import Dataset, load_dataset
from .loader import BatchLoader

__all__ = ["BatchLoader", "Dataset", "load_dataset"]
