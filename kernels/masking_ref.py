"""Plain-torch per-sample random masking: the readable reference of the fused Triton kernel.

This is the official MAE ``random_masking`` (two argsorts and a gather) with an explicit contract so
the fused kernel in :mod:`fastmae.kernels.masking` can be checked against it element for element.
"""

from __future__ import annotations

import torch


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Tokens kept per sample, ``int(N * (1 - mask_ratio))`` exactly as the official code."""
    return int(num_patches * (1 - mask_ratio))


def random_masking_ref(
    x: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    pos_embed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a uniformly random subset of ``K = int(N * (1 - mask_ratio))`` tokens per sample.

    Args:
        x: tokens (B, N, D).
        mask_ratio: share of tokens removed, in (0, 1).
        noise: optional (B, N) floats; the permutation of sample b is ``argsort(noise[b])`` (stable,
            so ties keep index order). Without it, uniform noise is drawn from ``generator``.
        generator: torch generator on ``x.device`` for the noise (None: the global one).
        pos_embed: optional (N, D) or (1, N, D) added to the gathered rows (``x + pos_embed``).

    Returns:
        x_vis (B, K, D): kept rows in the order of the sample's permutation;
        mask (B, N): 1 at masked positions, 0 at kept ones (dtype of ``x``);
        ids_restore (B, N) int64: inverse permutation, ``x_full = gather(cat(x_vis, mask_tokens), ids_restore)``.
    """
    if x.dim() != 3:
        raise ValueError(f"random_masking_ref expects x of shape (B, N, D), got {tuple(x.shape)}")
    B, N, D = x.shape
    K = num_kept(N, mask_ratio)
    if not 0 < K <= N:
        raise ValueError(f"mask_ratio={mask_ratio} keeps {K} of {N} tokens")
    if noise is None:
        noise = torch.rand(B, N, device=x.device, generator=generator)
    elif noise.shape != (B, N):
        raise ValueError(f"noise must have shape {(B, N)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # (B, N) ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :K]  # (B, K)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, N, D)
    x_vis = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
    mask = torch.ones(B, N, device=x.device, dtype=x.dtype)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, N): 1 = masked
    return x_vis, mask, ids_restore
