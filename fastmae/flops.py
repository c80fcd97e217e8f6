"""Analytic FLOPs of MAE per image, accounting for the mask ratio: forward and training (forward + backward)
FLOPs of every matmul, one multiply-add counted as 2 FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import MaskConfig, ModelConfig, get_preset
from .kernels import num_kept


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """Forward FLOPs of one pre-norm transformer block on ``tokens`` tokens of width ``dim``."""
    hidden = int(dim * mlp_ratio)
    qkv = 2 * tokens * dim * 3 * dim
    scores = 2 * tokens * tokens * dim  # q @ k^T over all heads
    values = 2 * tokens * tokens * dim  # attn @ v
    proj = 2 * tokens * dim * dim
    mlp = 2 * tokens * dim * hidden * 2
    return qkv + scores + values + proj + mlp


@dataclass(frozen=True)
class MAEFlops:
    """Forward FLOPs per image, by part, and the training total."""

    patch_embed: int
    encoder: int
    decoder_embed: int
    decoder: int
    decoder_pred: int

    @property
    def forward(self) -> int:
        return self.patch_embed + self.encoder + self.decoder_embed + self.decoder + self.decoder_pred

    @property
    def train(self) -> int:
        """Forward + backward (2x forward, except 1x for the patch embedding: no input gradient)."""
        return 3 * (self.forward - self.patch_embed) + 2 * self.patch_embed


def _resolve(config: ModelConfig | str) -> ModelConfig:
    return get_preset(config).model if isinstance(config, str) else config


def mae_flops(
    config: ModelConfig | str,
    mask_ratio: float | None = None,
    encoder_mask_tokens: bool | None = None,
) -> MAEFlops:
    """Per-image FLOPs of one MAE forward pass for a config or preset name.

    ``encoder_mask_tokens=True`` counts the paper's "encoder w/ [M]" variant (all N tokens in the encoder).
    The patch embedding counts the patches ``config.patch_embed_order`` embeds (the visible ones for
    ``gather_first``, all for ``embed_first`` and "w/ [M]").
    """
    m = _resolve(config)
    ratio = MaskConfig().ratio if mask_ratio is None else mask_ratio
    with_m = m.encoder_mask_tokens if encoder_mask_tokens is None else encoder_mask_tokens
    n = (m.img_size // m.patch_size) ** 2
    patch_dim = m.patch_size**2 * m.in_chans
    enc_tokens = (n if with_m else num_kept(n, ratio)) + 1  # + cls
    dec_tokens = n + 1
    # gather_first embeds the visible patches only
    embedded = n if with_m or m.patch_embed_order == "embed_first" else enc_tokens - 1
    return MAEFlops(
        patch_embed=2 * embedded * patch_dim * m.embed_dim,
        encoder=m.depth * block_flops(enc_tokens, m.embed_dim, m.mlp_ratio),
        decoder_embed=2 * enc_tokens * m.embed_dim * m.decoder_embed_dim,
        decoder=m.decoder_depth * block_flops(dec_tokens, m.decoder_embed_dim, m.mlp_ratio),
        decoder_pred=2 * dec_tokens * m.decoder_embed_dim * patch_dim,
    )


def forward_flops(config: ModelConfig | str, mask_ratio: float | None = None,
                  encoder_mask_tokens: bool | None = None) -> int:
    """Forward FLOPs per image."""
    return mae_flops(config, mask_ratio, encoder_mask_tokens).forward


def train_flops(config: ModelConfig | str, mask_ratio: float | None = None,
                encoder_mask_tokens: bool | None = None) -> int:
    """Training (forward + backward) FLOPs per image."""
    return mae_flops(config, mask_ratio, encoder_mask_tokens).train


def encoder_skip_flops_ratio(name_or_config: ModelConfig | str, mask_ratio: float | None = None) -> float:
    """Training FLOPs of "encoder w/ [M]" divided by fastmae's visible-only encoder (paper Table 1c: 3.3x, ViT-L)."""
    with_m = train_flops(name_or_config, mask_ratio, encoder_mask_tokens=True)
    without = train_flops(name_or_config, mask_ratio, encoder_mask_tokens=False)
    return with_m / without


def encoder_param_count(config: ModelConfig | str) -> int:
    """Parameters of the ViT encoder (patch embed, cls, blocks, norm; fixed pos embed excluded), analytically."""
    m = _resolve(config)
    D, h = m.embed_dim, int(m.embed_dim * m.mlp_ratio)
    patch = m.patch_size**2 * m.in_chans * D + D
    block = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * h + h) + (h * D + D)
    return patch + D + m.depth * block + 2 * D


def classifier_flops(model: Any, trainable_encoder: bool) -> float:  # a fastmae.vit.VisionTransformer
    """Training FLOPs per image: 3x forward (patch embed: 2x, no input gradient) when the encoder trains;
    forward + head backward when it is frozen (probing)."""
    pe = model.patch_embed
    D = model.embed_dim
    N = pe.num_patches
    patch = 2 * N * D * pe.proj.in_channels * pe.patch_size**2
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / D
    enc = len(model.blocks) * block_flops(N + 1, D, mlp_ratio)
    head = 2 * D * model.num_classes
    if trainable_encoder:
        return 3 * (enc + head) + 2 * patch
    return patch + enc + 3 * head
