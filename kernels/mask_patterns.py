"""The mask sampling strategies of the paper's Table 1f / Fig. 6 besides ``random``: ``block`` and ``grid``.

Each strategy is written as sort keys: ``pattern_keys(...)`` gives (B, N) float32 keys whose ascending order
lists the kept patches first, so the masking itself (``argsort`` + gather, the torch reference or the fused
Triton kernel's noise path) is the same code for every strategy. Every strategy keeps exactly
``K = int(N * (1 - mask_ratio))`` patches per sample (static shapes), and sample b's keys are a pure function
of (seed, b): Philox of counters (j, b, stream, 0), on the device, with no host sync.

- ``block``: blocks in the manner of BEiT's block-wise masking, placed one after another while they fit: block j
  of a sample has an area uniform in [min_area, what is still to mask] patches (min_area = 16 of 196 patches,
  scaled to the grid), a log-uniform aspect ratio in [0.3, 1/0.3] and a uniform position; a block that would
  mask more than what is still to mask is skipped. After ``BLOCK_TRIES`` blocks the few patches still missing
  (if any) are masked at random among the visible ones, so that exactly N - K are masked.
- ``grid``: one patch of every 2x2 cell is kept (mask ratio 0.75 only); which of the four positions is drawn
  once per sample, the same in every cell.
"""

from __future__ import annotations

import math

import torch

from .masking_ref import Seed, philox4x32

PATTERNS = ("block", "grid")
BLOCK_TRIES = 24  # blocks placed per sample (each vectorised over the batch)
BLOCK_MIN_AREA = 16 / 196  # BEiT's smallest block (16 patches of a 14 x 14 grid) as a share of the patches
BLOCK_MIN_ASPECT = 0.3
# key streams (the third Philox counter): one per use, so that no two draws share random numbers
_STREAM_ORDER, _STREAM_BLOCK, _STREAM_GRID = 1, 2, 3


def uniforms(seed: torch.Tensor, batch: int, count: int, stream: int) -> torch.Tensor:
    """(B, count) float32 uniforms in [0, 1): Philox of counters (j, b, stream, 0) under ``seed`` (a 0-d int64
    tensor); 24 bits each, exact in float32."""
    device = seed.device
    j = torch.arange(count, device=device, dtype=torch.int64).expand(batch, count)
    b = torch.arange(batch, device=device, dtype=torch.int64)[:, None].expand(batch, count)
    r0, _, _, _ = philox4x32(seed, j, b, torch.full_like(j, stream), torch.zeros_like(j))
    return (r0 >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _seed_tensor(seed: Seed | None, device: torch.device) -> torch.Tensor:
    if seed is None:
        return torch.empty((), dtype=torch.int64, device=device).random_()  # on the device: no host sync
    if isinstance(seed, torch.Tensor):
        return seed.reshape(()).to(device=device, dtype=torch.int64)
    return torch.tensor(int(seed) % (1 << 63), dtype=torch.int64, device=device)


def block_min_area(num_patches: int) -> int:
    """The smallest block, in patches: BEiT's 16 of 196, scaled to ``num_patches``."""
    return max(1, round(BLOCK_MIN_AREA * num_patches))


def block_boxes(seed: torch.Tensor, batch: int, side: int, masked: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place the blocks of ``block`` masking on a ``side`` x ``side`` grid until ``masked`` patches are covered.

    Returns (boxes (B, T, 4) int64 as (top, left, height, width), accepted (B, T) bool, covered (B, N) bool):
    the union of the accepted boxes is ``covered``, which never holds more than ``masked`` patches.
    """
    device = seed.device
    N, T = side * side, BLOCK_TRIES
    u = uniforms(seed, batch, 4 * T, _STREAM_BLOCK).view(batch, T, 4)
    rows = torch.arange(side, device=device).repeat_interleave(side)  # (N,) row of each patch
    cols = torch.arange(side, device=device).repeat(side)  # (N,)
    covered = torch.zeros(batch, N, dtype=torch.bool, device=device)
    boxes = torch.zeros(batch, T, 4, dtype=torch.int64, device=device)
    accepted = torch.zeros(batch, T, dtype=torch.bool, device=device)
    min_area = float(block_min_area(N))
    log_aspect = math.log(1 / BLOCK_MIN_ASPECT)
    for t in range(T):
        left_to_mask = masked - covered.sum(dim=1)  # (B,)
        hi = left_to_mask.to(torch.float32)
        lo = hi.clamp(max=min_area)
        area = lo + (hi - lo) * u[:, t, 0]  # (B,)
        aspect = torch.exp((2 * u[:, t, 1] - 1) * log_aspect)
        h = torch.round(torch.sqrt(area * aspect)).clamp(1, side).to(torch.int64)
        w = torch.round(torch.sqrt(area / aspect)).clamp(1, side).to(torch.int64)
        top = (u[:, t, 2] * (side - h + 1)).to(torch.int64)  # uniform in [0, side - h]
        left = (u[:, t, 3] * (side - w + 1)).to(torch.int64)
        region = ((rows >= top[:, None]) & (rows < (top + h)[:, None])
                  & (cols >= left[:, None]) & (cols < (left + w)[:, None]))  # (B, N)
        new = (region & ~covered).sum(dim=1)
        ok = (new > 0) & (new <= left_to_mask)
        covered |= region & ok[:, None]
        boxes[:, t] = torch.stack([top, left, h, w], dim=1)
        accepted[:, t] = ok
    return boxes, accepted, covered


def grid_kept(seed: torch.Tensor, batch: int, side: int) -> torch.Tensor:
    """(B, N) bool: the patches ``grid`` masking keeps, one of every 2x2 cell at a per-sample offset."""
    if side % 2:
        raise ValueError(f"grid masking needs an even number of patches per side, not {side}")
    device = seed.device
    offset = (uniforms(seed, batch, 2, _STREAM_GRID) * 2).to(torch.int64)  # (B, 2): row and column offsets
    rows = torch.arange(side, device=device).repeat_interleave(side)
    cols = torch.arange(side, device=device).repeat(side)
    return ((rows % 2) == offset[:, :1]) & ((cols % 2) == offset[:, 1:])


def pattern_keys(pattern: str, batch: int, num_patches: int, keep: int, seed: Seed | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(B, N) float32 sort keys of a ``block`` or ``grid`` masking keeping ``keep`` patches per sample: the
    ``keep`` smallest keys of a sample are its kept patches (in a random order). ``seed``: an int, an int64
    tensor (its device is used) or None (drawn on ``device`` from torch's generator)."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown mask pattern {pattern!r}; valid: {', '.join(PATTERNS)}")
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{pattern} masking needs a square grid of patches, not {num_patches}")
    if not 0 < keep <= num_patches:
        raise ValueError(f"{pattern} masking cannot keep {keep} of {num_patches} patches")
    device = seed.device if isinstance(seed, torch.Tensor) else torch.device(device or "cpu")
    s = _seed_tensor(seed, device)
    order = uniforms(s, batch, num_patches, _STREAM_ORDER)  # (B, N): random order inside each class
    if pattern == "grid":
        if keep * 4 != num_patches:
            raise ValueError(f"grid masking keeps one of every 2x2 patches ({num_patches // 4} of {num_patches}), "
                             f"not {keep}: it needs mask ratio 0.75")
        hidden = ~grid_kept(s, batch, side)
    else:
        _, _, hidden = block_boxes(s, batch, side, num_patches - keep)
    # visible patches first (keys in [0, 1)), covered ones after (keys in [2, 3)); the first `keep` are kept
    return order + 2.0 * hidden.to(torch.float32)
