"""Plain-torch per-sample random masking: the readable reference of the fused Triton kernel in
:mod:`fastmae.kernels.masking`, which is checked against it element for element.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# Philox4x32-10 (Salmon et al. 2011), the constants of ``triton.language.philox``
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10

Seed = int | torch.Tensor


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Tokens kept per sample, ``int(N * (1 - mask_ratio))`` exactly as the official code."""
    return int(num_patches * (1 - mask_ratio))


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a constant ``a`` and int64 ``b``, both in [0, 2^32): the product
    is assembled from 16-bit halves so that no int64 operation overflows."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p00, p01, p10, p11 = b_lo * a_lo, b_lo * a_hi, b_hi * a_lo, b_hi * a_hi  # each < 2^32
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)  # < 3 * 2^16
    lo = ((mid & 0xFFFF) << 16) | (p00 & 0xFFFF)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return hi, lo


def philox4x32(seed: Seed, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of the counters (int64 tensors holding uint32 values) under the 64-bit key ``seed`` (an int
    or an int64 tensor, >= 0): bit for bit ``tl.philox(seed, c0, c1, c2, c3)``."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def masking_keys(seed: Seed, batch: int, num_patches: int, device: torch.device | str | None = None
                 ) -> torch.Tensor:
    """(B, N) distinct int64 sort keys of a seeded masking: sample b's permutation is ``argsort(keys[b])``.

    Philox of counter (patch n, sample b, 0, 0) gives 63 random bits; the low ``log2(next_pow2(N))`` of them are
    replaced by n, so keys never tie and the order is uniform (a random tie, broken towards the lower index, has
    probability ~N^2 / 2^56 per sample). The same keys as the Triton kernel's.
    """
    if isinstance(seed, torch.Tensor):
        device = seed.device
        seed = seed.reshape(())
    else:
        seed = int(seed) % (1 << 63)
    n_pow2 = 1 << max(0, num_patches - 1).bit_length()
    log2 = n_pow2.bit_length() - 1
    n = torch.arange(num_patches, device=device, dtype=torch.int64).expand(batch, num_patches)  # (B, N)
    b = torch.arange(batch, device=device, dtype=torch.int64)[:, None].expand(batch, num_patches)  # (B, N)
    zero = torch.zeros_like(n)
    r0, r1, _, _ = philox4x32(seed, n, b, zero, zero)
    rnd = ((r0 & 0x7FFFFFFF) << 32) | r1  # (B, N) 63 random bits
    return ((rnd >> log2) << log2) | n


def random_masking_ref(
    x: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    pos_embed: torch.Tensor | None = None,
    seed: Seed | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a uniformly random subset of ``K = int(N * (1 - mask_ratio))`` tokens per sample.

    Args:
        x: tokens (B, N, D).
        mask_ratio: share of tokens removed, in (0, 1).
        noise: optional (B, N) floats; the permutation of sample b is ``argsort(noise[b])`` (stable,
            so ties keep index order).
        generator: torch generator on ``x.device`` for uniform noise when neither ``noise`` nor ``seed`` is given
            (None: the global one).
        pos_embed: optional (N, D) or (1, N, D) added to the gathered rows (``x + pos_embed``).
        seed: without ``noise``: sample b's mask is a pure function of (seed, b, N, K) (:func:`masking_keys`, the
            Triton kernel's Philox keys). An int or an int64 tensor (on x's device: no host sync, and
            ``torch.compile`` sees one graph for every seed).

    Returns:
        x_vis (B, K, D): kept rows in the order of the sample's permutation;
        mask (B, N): 1 at masked positions, 0 at kept ones (dtype of ``x``, or of ``x + pos_embed``);
        ids_restore (B, N) int64: inverse permutation, ``x_full = gather(cat(x_vis, mask_tokens), ids_restore)``.
    """
    if x.dim() != 3:
        raise ValueError(f"random_masking_ref expects x of shape (B, N, D), got {tuple(x.shape)}")
    B, N, D = x.shape
    K = num_kept(N, mask_ratio)
    if not 0 < K <= N:
        raise ValueError(f"mask_ratio={mask_ratio} keeps {K} of {N} tokens")
    if noise is None and seed is not None:
        noise = masking_keys(seed, B, N, x.device)  # (B, N) distinct int64 keys
    elif noise is None:
        noise = torch.rand(B, N, device=x.device, generator=generator)
    elif noise.shape != (B, N):
        raise ValueError(f"noise must have shape {(B, N)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # (B, N) ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :K]  # (B, K)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, N, D)
    x_vis = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
    mask = (ids_restore >= K).to(x.dtype)  # (B, N): 1 = masked
    return x_vis, mask, ids_restore
