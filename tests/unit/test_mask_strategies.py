"""Mask sampling strategies (paper Table 1f / Fig. 6): random, block and grid through the model's masking.

Each keeps exactly K = int(N * (1 - ratio)) patches per sample, is a pure function of (seed, sample), and goes
through the same masking code (argsort of keys + gather) as random masking; the fused kernel's side of that
(the same keys through the Triton kernel) is in tests/integration/test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from fastmae.kernels import num_kept, random_masking_ref
from fastmae.kernels.mask_patterns import BLOCK_TRIES, block_boxes, block_min_area, grid_kept, pattern_keys

import fastmae
from fastmae.config import ConfigError, build_config

SIDE, N = 14, 196  # ViT-B/16 at 224 px


def _mask(pattern: str, ratio: float, batch: int, seed: int | torch.Tensor = 7) -> torch.Tensor:
    """(B, side, side) masks (1 = masked) of ``pattern`` through the torch masking."""
    keys = pattern_keys(pattern, batch, N, num_kept(N, ratio), seed=seed)
    _, mask, _ = random_masking_ref(torch.zeros(batch, N, 1), ratio, noise=keys)
    return mask.view(batch, SIDE, SIDE)


def _boundary(mask: torch.Tensor) -> torch.Tensor:
    """Per sample: neighbouring pairs of patches (4-neighbourhood) with one masked and one visible."""
    return ((mask[:, 1:, :] != mask[:, :-1, :]).sum(dim=(1, 2)) + (mask[:, :, 1:] != mask[:, :, :-1]).sum(dim=(1, 2)))


@pytest.mark.parametrize("pattern,ratio", [("block", 0.5), ("block", 0.75), ("grid", 0.75)])
def test_exact_number_kept(pattern: str, ratio: float) -> None:
    masks = _mask(pattern, ratio, batch=64)
    assert (masks.sum(dim=(1, 2)) == N - num_kept(N, ratio)).all()


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_block_masks_are_the_union_of_the_placed_blocks(ratio: float) -> None:
    """The covered patches are exactly the union of the accepted boxes, inside the grid, never more than N - K;
    the few patches still missing after BLOCK_TRIES blocks are all that random filling adds."""
    B, masked = 128, N - num_kept(N, ratio)
    boxes, accepted, covered = block_boxes(torch.tensor(11), B, SIDE, masked)
    assert boxes.shape == (B, BLOCK_TRIES, 4)
    top, left, h, w = boxes.unbind(-1)
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= SIDE).all() and (left + w <= SIDE).all()
    union = torch.zeros(B, SIDE, SIDE, dtype=torch.bool)
    for b, t in accepted.nonzero().tolist():
        y, x, hh, ww = boxes[b, t].tolist()
        union[b, y:y + hh, x:x + ww] = True
    assert torch.equal(union.view(B, N), covered)
    counts = covered.sum(dim=1)
    assert (counts <= masked).all()
    assert counts.float().mean() > 0.98 * masked  # random filling is at most a couple of patches on average
    mask = _mask("block", ratio, B, seed=11).bool().view(B, N)
    assert (mask | ~covered).all()  # every covered patch is masked


def test_block_size_distribution() -> None:
    """Large blocks of the documented shape: the first block of each sample has an area about uniform in
    [min_area, N - K] (clipped by the grid), aspect ratios within [0.3, 1/0.3] up to rounding."""
    B, masked = 512, N - num_kept(N, 0.75)
    boxes, accepted, _ = block_boxes(torch.tensor(3), B, SIDE, masked)
    # nothing is covered yet: the first block is refused only when rounding takes it past N - K
    assert accepted[:, 0].float().mean() > 0.8
    first = boxes[:, 0][accepted[:, 0]]
    area = (first[:, 2] * first[:, 3]).float()
    lo, hi = block_min_area(N), masked
    assert block_min_area(N) == 16
    # a uniform area in [16, 147], rounded into h x w <= 14 x 14: mean near (16 + 147) / 2, both halves used
    assert 60 < area.mean() < 95, area.mean()
    assert (area < (lo + hi) / 2).float().mean() > 0.3 and (area > (lo + hi) / 2).float().mean() > 0.3
    big = accepted & (boxes[..., 2] * boxes[..., 3] >= 16)
    aspect = (boxes[..., 2].float() / boxes[..., 3].float())[big]
    assert aspect.min() >= 0.2 and aspect.max() <= 5.0
    assert (aspect < 0.7).any() and (aspect > 1.4).any()  # both orientations


def test_block_masks_are_contiguous() -> None:
    """At 50 % the masked/visible boundary of block masks is a fraction of random masking's (182 on average)."""
    block = _boundary(_mask("block", 0.5, 256)).float().mean()
    keys = torch.rand(256, N, generator=torch.Generator().manual_seed(0))
    _, rnd, _ = random_masking_ref(torch.zeros(256, N, 1), 0.5, noise=keys)
    random = _boundary(rnd.view(256, SIDE, SIDE)).float().mean()
    assert 160 < random < 200
    assert block < 0.35 * random, (block, random)


def test_grid_is_regular_with_a_per_sample_offset() -> None:
    kept = 1 - _mask("grid", 0.75, 64)
    cells = kept.view(64, SIDE // 2, 2, SIDE // 2, 2).permute(0, 1, 3, 2, 4).reshape(64, -1, 4)  # (B, cells, 4)
    assert (cells.sum(-1) == 1).all()  # one kept patch per 2x2 cell
    position = cells.argmax(-1)  # (B, cells): which of the four
    assert (position == position[:, :1]).all()  # the same in every cell of a sample
    assert set(position[:, 0].tolist()) == {0, 1, 2, 3}  # all four offsets occur across samples
    assert torch.equal(grid_kept(torch.tensor(5), 64, SIDE), grid_kept(torch.tensor(5), 64, SIDE))


@pytest.mark.parametrize("pattern", ["block", "grid"])
def test_pure_function_of_seed_and_sample(pattern: str) -> None:
    """Sample b's keys depend on (seed, b) only: a longer batch extends a shorter one; a tensor seed on the
    device equals the same int; another seed differs."""
    K = N // 4
    small = pattern_keys(pattern, 4, N, K, seed=123)
    large = pattern_keys(pattern, 9, N, K, seed=123)
    assert torch.equal(small, large[:4])
    assert torch.equal(small, pattern_keys(pattern, 4, N, K, seed=torch.tensor([123])))
    assert not torch.equal(small, pattern_keys(pattern, 4, N, K, seed=124))
    torch.manual_seed(0)
    drawn = pattern_keys(pattern, 4, N, K)  # no seed: drawn from torch's generator
    torch.manual_seed(0)
    assert torch.equal(drawn, pattern_keys(pattern, 4, N, K))


@pytest.mark.parametrize("order", ["gather_first", "embed_first"])
@pytest.mark.parametrize("strategy", ["block", "grid"])
def test_model_masks_with_the_strategy(strategy: str, order: str) -> None:
    """The debug model (8 x 8 patches) masks with the configured strategy: exact K, the same mask for the same
    seed (what a resumed run relies on), the keys' mask exactly, and the loss trains."""
    torch.manual_seed(0)
    model = fastmae.create_model("debug", mask_strategy=strategy, patch_embed_order=order)
    imgs = torch.randn(4, 3, 64, 64)
    n, k = model.num_patches, num_kept(model.num_patches, model.mask_ratio)
    loss, _, mask = model(imgs, mask_seed=99)
    assert (mask.sum(dim=1) == n - k).all()
    assert torch.equal(model(imgs, mask_seed=99)[2], mask)
    keys = pattern_keys(strategy, 4, n, k, seed=99)
    assert torch.equal(mask, (torch.argsort(torch.argsort(keys, dim=1), dim=1) >= k).float())
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_encoder_with_mask_tokens_follows_the_strategy() -> None:
    model = fastmae.create_model("debug", mask_strategy="grid", encoder_mask_tokens=True)
    _, _, mask = model(torch.randn(2, 3, 64, 64), mask_seed=3)
    kept = (1 - mask).view(2, 8, 8)
    assert (kept.view(2, 4, 2, 4, 2).sum(dim=(2, 4)) == 1).all()


def test_impossible_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="mask.strategy='checkerboard' is not valid; valid choices: random, block"):
        build_config("debug", ["mask.strategy=checkerboard"])
    with pytest.raises(ConfigError, match="mask.ratio must be 0.75, not 0.5"):
        build_config("debug", ["mask.strategy=grid", "mask.ratio=0.5"])
    with pytest.raises(ConfigError, match="even number of patches per side, not 7"):
        build_config("debug", ["mask.strategy=grid", "model.img_size=56"])
    assert build_config("debug", ["mask.strategy=block", "mask.ratio=0.5"]).mask.strategy == "block"
    with pytest.raises(ValueError, match="needs mask ratio 0.75"):
        pattern_keys("grid", 2, N, 98, seed=0)
    with pytest.raises(ValueError, match="square grid"):
        pattern_keys("block", 2, 50, 10, seed=0)
