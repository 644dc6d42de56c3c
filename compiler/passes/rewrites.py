"""Imports every pass module, so that importing this registers all passes."""

from . import cleanup, fold, fuse  # noqa: F401
