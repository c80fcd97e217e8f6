"""fastmae: high-throughput MAE pre-training (He et al. 2021, arXiv 2111.06377)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import (
    Config,
    ConfigError,
    MaskConfig,
    ModelConfig,
    build_config,
    get_preset,
    preset_names,
)
from .model import MaskedAutoencoderViT

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "MaskConfig", "MaskedAutoencoderViT", "ModelConfig",
    "build_config", "create_model", "get_preset", "list_models", "preset_names",
]

# create_model keywords that are not ModelConfig fields
_MASK_KWARGS = {"mask_ratio": "ratio", "masking": "backend", "mask_strategy": "strategy"}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return preset_names()


def create_model(name: str, **overrides: Any) -> MaskedAutoencoderViT:
    """Build a preset by name (timm's ``create_model`` convention).

    Overrides use the official ``MaskedAutoencoderViT`` argument names (``img_size``, ``patch_size``,
    ``embed_dim``, ``depth``, ``num_heads``, ``decoder_embed_dim``, ``decoder_depth``,
    ``decoder_num_heads``, ``mlp_ratio``, ``norm_pix_loss``) plus fastmae's ``attention``,
    ``encoder_mask_tokens``, ``mask_ratio``, ``masking`` (backend) and ``mask_strategy`` (random | block |
    grid). Example::

        fastmae.create_model("mae_vit_base_patch16", norm_pix_loss=False)
    """
    cfg = get_preset(name)
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in overrides.items():
        if key in model_fields:
            setattr(cfg.model, key, value)
        elif key in _MASK_KWARGS:
            setattr(cfg.mask, _MASK_KWARGS[key], value)
        else:
            valid = sorted(model_fields | set(_MASK_KWARGS))
            raise ConfigError(f"create_model: unknown argument {key!r}; valid arguments: {', '.join(valid)}")
    return MaskedAutoencoderViT(cfg.model, cfg.mask)
