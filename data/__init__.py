"""fastmae.data: shard writing/verification, the DALI pipeline, the torch fallback and synthetic loaders.

``build_loader(cfg, img_size=..., rank=..., world_size=..., seed=..., device=..., mode=..., randaug=...)`` returns the
loader of ``cfg.backend`` (``auto`` -> DALI when it imports, else torch); see :mod:`fastmae.data.sampling`
for the exact epoch layout and :data:`PAD_LABEL`.
"""

from __future__ import annotations

from pathlib import Path

from .index import ShardError, ShardIndex, expand_shards
from .loader import ShardLoader, build_loader, dali_available, resolve_backend
from .sampling import PAD_LABEL
from .synthetic import SyntheticLoader


def bundled_sample_dir(split: str = "train") -> Path:
    """Folder of the bundled sample's shards (``train``: 80 photos, ``val``: 20; 10 classes)."""
    from .sample import bundled_sample_dir as _dir  # imported late: ``python -m fastmae.data.sample`` runs it

    return _dir(split)

__all__ = [
    "PAD_LABEL",
    "ShardError",
    "ShardIndex",
    "ShardLoader",
    "SyntheticLoader",
    "build_loader",
    "bundled_sample_dir",
    "dali_available",
    "expand_shards",
    "resolve_backend",
]
