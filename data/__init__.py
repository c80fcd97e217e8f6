"""fastmae.data: shard writing/verification, the DALI pipeline, the torch fallback and synthetic loaders."""

from __future__ import annotations

from .synthetic import SyntheticLoader

__all__ = ["SyntheticLoader"]
