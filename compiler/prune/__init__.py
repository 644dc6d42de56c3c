"""Model compression: structured (channel) pruning with dependency groups."""

from .structured import Group, channel_groups, importance, prune, prune_channels

__all__ = ["Group", "channel_groups", "importance", "prune", "prune_channels"]
