"""Model compression: structured (channel) pruning with dependency groups; unstructured (magnitude) pruning."""

from .config import PruneConfig, parse_prune
from .pipeline import BNSlimming, PruneResult, ValData, run_prune
from .sensitivity import Sensitivity, plot_sensitivity, sensitivity
from .structured import Group, channel_groups, group_sizes, importance, prune, prune_channels
from .unstructured import (
    PRUNABLE_OPS,
    GradualPruner,
    MaskKeeper,
    apply_masks,
    compressed_size,
    gmp_sparsity,
    magnitude_masks,
    prunable_weights,
    size_report,
    sparsity_report,
)

__all__ = ["Group", "channel_groups", "group_sizes", "importance", "prune", "prune_channels",
           "PruneConfig", "parse_prune", "BNSlimming", "PruneResult", "ValData", "run_prune",
           "Sensitivity", "plot_sensitivity", "sensitivity",
           "PRUNABLE_OPS", "GradualPruner", "MaskKeeper", "apply_masks", "compressed_size", "gmp_sparsity",
           "magnitude_masks", "prunable_weights", "size_report", "sparsity_report"]
