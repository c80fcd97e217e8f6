"""The training augmentations of the MAE paper's Table 1e on both shard backends (torch, and DALI's CPU twin):
data.crop (random_resized | fixed | center), data.hflip and data.color_jitter — the crop boxes and flips of
``sample_crop``, the jitter formula, bit-identical default batches, the backends' agreement, resume, and the
synthetic backend's refusal. The other loader tests: tests/unit/test_data_loaders.py."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastmae.data import build_loader
from fastmae.data.base import color_jitter, normalize_uint8
from fastmae.data.constants import CROPS, IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.index import ShardIndex, expand_shards
from fastmae.data.sampling import (
    CropSpec,
    batch_uniforms,
    center_crop_box,
    eval_resize_size,
    image_size,
    jitter_factors,
    jitter_uniforms,
    random_resized_crop_box,
    sample_crop,
)
from loaderutil import DALI_ONLY
from loaderutil import loader_cfg as _cfg
from loaderutil import read_epoch as _epoch
from PIL import Image

BACKENDS = ["torch", pytest.param("dali", marks=DALI_ONLY)]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
SIZES = [(500, 375), (375, 500), (200, 150), (64, 64), (1000, 600), (40, 30)]


def _spec(crop: str, hflip: bool = True, img_size: int = 224) -> CropSpec:
    return CropSpec(img_size, crop, (0.2, 1.0), hflip)


def _uint8(x: torch.Tensor) -> torch.Tensor:
    """A loader's normalised float batch back to the uint8 images it was made from (exact: errors << 0.5)."""
    return (x * STD * 255 + MEAN * 255).round().clamp(0, 255).to(torch.uint8)


def _sizes_by_label(shards: Path) -> dict[int, tuple[int, int]]:
    index = ShardIndex(expand_shards(str(shards)))
    out = {}
    for i in range(len(index)):
        data, label = index.read_sample(i)
        out[label] = image_size(data)
    return out


def test_fixed_crop_boxes_are_eval_sized_squares_anywhere_in_the_image() -> None:
    u = batch_uniforms(5, 0, 0, 0, 400)
    assert eval_resize_size(224) == 256
    for w, h in SIZES:
        side = round(min(w, h) * 224 / 256)  # the img_size square of the image resized to 256 on its shorter side
        boxes = np.array([sample_crop(row, w, h, _spec("fixed"))[:4] for row in u])
        assert (boxes[:, 2] == side).all() and (boxes[:, 3] == side).all(), (w, h)
        x, y = boxes[:, 0], boxes[:, 1]
        assert x.min() >= 0 and y.min() >= 0 and (x + side).max() <= w and (y + side).max() <= h, (w, h)
        for pos, room in ((x, w - side), (y, h - side)):  # uniform over every position that fits
            if room >= 20:
                assert len(np.unique(pos)) > 0.5 * min(room + 1, 400)
                assert pos.min() <= 0.05 * room and pos.max() >= 0.95 * room
                assert abs(pos.mean() / room - 0.5) < 0.08
            else:
                assert set(np.unique(pos)) == set(range(room + 1)), (w, h, room)
    flips = [sample_crop(row, 500, 375, _spec("fixed"))[4] for row in u]
    assert 0.4 < np.mean(flips) < 0.6


def test_center_crop_is_the_eval_box_and_hflip_false_never_flips() -> None:
    u = batch_uniforms(6, 1, 2, 0, 300)
    for w, h in SIZES:
        for row in u:
            assert sample_crop(row, w, h, _spec("center"))[:4] == center_crop_box(w, h, 224)
            assert sample_crop(row, w, h, _spec("center"))[:4] == sample_crop(None, w, h, _spec("fixed"))[:4]
            for crop in CROPS:
                on, off = sample_crop(row, w, h, _spec(crop)), sample_crop(row, w, h, _spec(crop, hflip=False))
                assert off[4] is False and on[:4] == off[:4]  # the flip switch never moves the box
            # random_resized is today's RandomResizedCrop + flip from the same uniforms
            want = (*random_resized_crop_box(row, w, h, (0.2, 1.0)), bool(row[-1] < 0.5))
            assert sample_crop(row, w, h, _spec("random_resized")) == want
    flips = [sample_crop(row, 500, 375, _spec("center"))[4] for row in u]
    assert 0.35 < np.mean(flips) < 0.65  # centre crop + flip: only the flip varies
    assert all(sample_crop(None, 500, 375, _spec(c))[4] is False for c in CROPS)  # evaluation never flips
    with pytest.raises(ValueError, match="data.crop='random'.*random_resized, fixed, center"):
        CropSpec(224, "random", (0.2, 1.0), True)


def test_default_batches_are_todays_random_resized_crop_and_flip(ids_shards: Path) -> None:
    """crop=random_resized, hflip=true, color_jitter=0: exactly PIL's crop + resize of the RandomResizedCrop box
    (drawn from the batch's uniforms as before these settings existed), flipped when u < 0.5, normalised."""
    loader = build_loader(_cfg("torch", ids_shards, batch=4, color_jitter=0.0), img_size=24, seed=2)
    plan = loader.layout().batch(0, 1)
    x, _ = _epoch(loader)[1]
    mean, std = MEAN * 255, STD * 255
    for j, i in enumerate(plan.indices):
        data, _ = loader.index.read_sample(int(i))
        img = Image.open(io.BytesIO(data)).convert("RGB")
        bx, by, bw, bh = random_resized_crop_box(plan.uniforms[j], *img.size, (0.2, 1.0))
        img = img.resize((24, 24), Image.Resampling.BICUBIC, box=(bx, by, bx + bw, by + bh))
        if plan.uniforms[j][-1] < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        want = (torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() - mean) / std
        assert torch.equal(x[j:j + 1], want), j


def _jitter_by_hand(img: np.ndarray, b: float, c: float, s: float) -> np.ndarray:
    """The documented formula pixel by pixel in float64: img (H, W, 3) in [0, 255]."""
    clamp = lambda v: min(max(v, 0.0), 255.0)  # noqa: E731
    grey = lambda p: 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]  # noqa: E731
    px = [[clamp(v * b) for v in p] for p in img.reshape(-1, 3).tolist()]
    m = sum(grey(p) for p in px) / len(px)
    px = [[clamp((v - m) * c + m) for v in p] for p in px]
    px = [[clamp((v - grey(p)) * s + grey(p)) for v in p] for p in px]
    return np.array(px).reshape(img.shape)


def test_color_jitter_follows_the_formula_by_hand() -> None:
    # sample 0, worked out on paper: pixels (100, 50, 200) and (250, 10, 30), b = 1.2, c = 0.5, s = 2
    #   brightness: (120, 60, 240), (300 -> 255, 12, 36)
    #   grey 98.46 and 87.393, mean m = 92.9265; contrast 0.5 x + 46.46325: (106.46325, 76.46325, 166.46325),
    #   (173.96325, 52.46325, 64.46325); their grey 95.69325 and 90.15975
    #   saturation 2 x - g: (117.23325, 57.23325, 237.23325), (257.76675 -> 255, 14.76675, 38.76675)
    # sample 1: random pixels, b = 0.7, c = 1.3, s = 0 (the grey image of the contrast result)
    rng = np.random.default_rng(0)
    imgs = np.zeros((2, 1, 2, 3))
    imgs[0, 0] = [[100, 50, 200], [250, 10, 30]]
    imgs[1] = rng.integers(0, 256, (1, 2, 3))
    factors = torch.tensor([[1.2, 0.5, 2.0], [0.7, 1.3, 0.0]])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    out = color_jitter(x.clone(), factors).permute(0, 2, 3, 1).double().numpy()
    paper = [[117.23325, 57.23325, 237.23325], [255.0, 14.76675, 38.76675]]
    np.testing.assert_allclose(out[0, 0], paper, atol=2e-4)
    for k in range(2):
        np.testing.assert_allclose(out[k], _jitter_by_hand(imgs[k], *factors[k].tolist()), atol=2e-4)
    assert np.ptp(out[1], axis=-1).max() < 1e-4  # s = 0: grey
    ident = color_jitter(x.clone(), torch.ones(2, 3))
    assert torch.equal(ident, x)  # factors 1: unchanged
    flat = color_jitter(x.clone(), torch.tensor([[1.0, 0.0, 1.0]] * 2))  # c = 0: every pixel the mean grey
    assert float((flat - flat[:, :1, :1, :1]).abs().max()) < 1e-4
    # through the normalisation: jitter first, then ImageNet mean/std; no factors = today's path
    u8 = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(torch.uint8)
    want = (color_jitter(u8.float(), factors) - MEAN * 255) / (STD * 255)
    torch.testing.assert_close(normalize_uint8(u8, torch.float32, factors), want, rtol=0, atol=1e-6)
    assert torch.equal(normalize_uint8(u8, torch.float32), (u8.float() - MEAN * 255) / (STD * 255))


@pytest.mark.parametrize("backend", BACKENDS)
def test_jitter_changes_only_the_colours_with_its_own_draws(backend: str, ids_shards: Path) -> None:
    """color_jitter=0.4 vs 0: the same samples, crops and flips (its own stream), and each batch equals the
    formula applied to the unjittered batch with the factors of (seed, epoch, step, rank)."""
    cfg = _cfg(backend, ids_shards, batch=4)
    plain = build_loader(cfg, img_size=24, seed=4)
    jit = build_loader(dataclasses.replace(cfg, color_jitter=0.4), img_size=24, seed=4)
    seen = []
    for epoch in range(2):
        for step, ((xa, ya), (xb, yb)) in enumerate(zip(_epoch(plain), _epoch(jit), strict=True)):
            assert torch.equal(ya, yb)
            f = jitter_factors(jitter_uniforms(4, epoch, step, 0, len(ya)), 0.4)
            assert np.array_equal(jit.layout().batch(epoch, step).jitter, f)
            assert plain.layout().batch(epoch, step).jitter is None
            want = normalize_uint8(_uint8(xa), torch.float32, torch.from_numpy(f))
            assert torch.equal(xb, want), (epoch, step)
            assert float((xa - xb).abs().mean()) > 0.01  # the pixels did change
            seen.append(f)
    f = np.concatenate(seen)
    assert f.min() >= 0.6 and f.max() <= 1.4 and f.std(0).min() > 0.15  # uniform in [1 - s, 1 + s], per sample


@pytest.mark.parametrize("backend", BACKENDS)
def test_center_crop_without_flip_trains_on_the_eval_images(backend: str, ids_shards: Path) -> None:
    """Table 1e "none": crop=center + hflip=false gives every training sample exactly its eval image."""
    cfg = _cfg(backend, ids_shards, batch=4)
    evals = {int(y): x for xb, yb in _epoch(build_loader(cfg, img_size=24, mode="eval"))
             for x, y in zip(xb, yb, strict=True)}
    none = build_loader(dataclasses.replace(cfg, crop="center", hflip=False), img_size=24, seed=9)
    n = 0
    for _ in range(2):
        for xb, yb in _epoch(none):
            for x, y in zip(xb, yb, strict=True):
                assert torch.equal(x, evals[int(y)]), int(y)
                n += 1
    assert n == 40  # 5 full batches of the 23 samples per epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_crops_cover_the_eval_share_at_moving_positions(backend: str, ids_shards: Path) -> None:
    """crop=fixed on the gradient images (R grows with x, G with y): each crop spans side/W of the x range and
    side/H of the y range (side = the eval crop's), and a sample's crop moves from epoch to epoch."""
    sizes = _sizes_by_label(ids_shards)
    loader = build_loader(_cfg(backend, ids_shards, batch=4, crop="fixed"), img_size=24, seed=3)
    starts: dict[int, set[float]] = {}
    for _ in range(3):
        for xb, yb in _epoch(loader):
            pix = xb * STD + MEAN
            for p, y in zip(pix, yb.tolist(), strict=True):
                w, h = sizes[y]
                side = center_crop_box(w, h, 24)[2]
                r, g = p[0], p[1]
                assert abs(float(r.amax() - r.amin()) - side / w) < 0.07, (y, w, h)
                assert abs(float(g.amax() - g.amin()) - side / h) < 0.07, (y, w, h)
                starts.setdefault(y, set()).add(round(float(r.amin()), 2))
    assert sum(len(s) > 1 for s in starts.values()) >= len(starts) // 2  # positions differ between epochs


@DALI_ONLY
@pytest.mark.parametrize("kw", [{"crop": "fixed"}, {"color_jitter": 0.4}], ids=["fixed", "jitter"])
def test_dali_and_torch_agree(kw: dict) -> None:
    """The same batches on both backends (the tolerance of test_data_loaders' bundled-sample agreement)."""
    cfg = _cfg("torch", "", batch=16, **kw)
    ref = _epoch(build_loader(cfg, img_size=64, seed=3))
    dali = _epoch(build_loader(dataclasses.replace(cfg, backend="dali"), img_size=64, seed=3))
    default = _epoch(build_loader(_cfg("torch", "", batch=16), img_size=64, seed=3))
    assert len(ref) == len(dali) == 5
    for (xa, ya), (xb, yb), (xd, _) in zip(ref, dali, default, strict=True):
        assert torch.equal(ya, yb)
        assert float((xa - xb).abs().mean()) < 0.02
        assert float((xa - xd).abs().mean()) > 0.05  # and they are not the default crops / colours


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_crop_and_jitter_resume_exactly(backend: str, ids_shards: Path) -> None:
    """A fresh loader restored from the state after 2 batches gives the same batches at the same (epoch, step)
    as an uninterrupted one, bit for bit; a fresh loader of the same seed repeats the epoch."""
    cfg = _cfg(backend, ids_shards, batch=4, crop="fixed", color_jitter=0.4)
    full = _epoch(build_loader(cfg, img_size=24, seed=8))
    again = _epoch(build_loader(cfg, img_size=24, seed=8))
    first = build_loader(cfg, img_size=24, seed=8)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    resumed = build_loader(cfg, img_size=24, seed=8)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    assert len(full) == 5 and len(rest) == 3
    for (xa, ya), (xb, yb) in zip(full, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(full[2:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_says_which_augmentation_and_synthetic_refuses_them(ids_shards: Path) -> None:
    assert "RandomResizedCrop(0.2-1) + flip" in build_loader(_cfg("torch", ids_shards), img_size=24).describe()
    text = build_loader(_cfg("torch", ids_shards, crop="fixed", hflip=False, color_jitter=0.4),
                        img_size=224).describe()
    assert "fixed 224px crop at a random position (shorter side 256px), no flip" in text
    assert "colour jitter 0.4 (brightness, contrast, saturation)" in text
    assert "centre crop" in build_loader(_cfg("torch", ids_shards, color_jitter=0.4), img_size=24,
                                         mode="eval").describe()
    build_loader(_cfg("synthetic", "", synthetic_size=8), img_size=16)  # the paper's settings: fine
    for kw, bad in (({"color_jitter": 0.4}, "data.color_jitter=0.4"), ({"crop": "fixed"}, "data.crop=fixed"),
                    ({"hflip": False}, "data.hflip=False")):
        with pytest.raises(ValueError, match=f"{bad} cannot apply to data.backend=synthetic"):
            build_loader(_cfg("synthetic", "", synthetic_size=8, **kw), img_size=16)
