"""Semantic segmentation: per-pixel losses (the task's loss beside detection's compiler/detect)."""
