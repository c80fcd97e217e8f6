"""Fine-tuning at a higher resolution than pre-training (paper Table 3, ViT-H at 448 from a 224-px checkpoint), in
the test process at small scale: a 64-px debug MAE fine-tuned with ``model.img_size=128``. The fine-tuning
program itself at 128 px: tests/integration/test_finetune_448.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastmae.data import build_loader
from fastmae.data.sample import bundled_sample_dir

from fastmae.config import get_preset
from fastmae.evaluation import evaluate
from fastmae.finetune import build_model, classifier_optimizer, fp16_resolution_warning, parse_program_args
from fastmae.layers import sincos_2d
from fastmae.model import MaskedAutoencoderViT
from fastmae.recipes import finetune_recipe


def save_mae_64(path: Path) -> dict[str, torch.Tensor]:
    """A debug MAE (img 64, patch 8: an 8x8 grid) saved as an export; returns its state dict."""
    cfg = get_preset("debug")
    sd = MaskedAutoencoderViT(cfg.model, cfg.mask).state_dict()
    torch.save({"model": sd, "config": cfg.to_dict(), "step": 0, "epoch": 0}, path)
    return sd


def bicubic_grid(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1+n*n, D) -> (1+grid*grid, D), written out here: the patch rows are a row-major n x n grid, resized
    bicubically (align_corners=False, as the official interpolate_pos_embed) and read back row-major after the
    unchanged cls row."""
    n = int(round((pos.shape[1] - 1) ** 0.5))
    D = pos.shape[2]
    img = pos[0, 1:].reshape(n, n, D).permute(2, 0, 1).unsqueeze(0)  # (1, D, n, n)
    up = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)[0]  # (D, grid, grid)
    return torch.cat([pos[0, :1], up.permute(1, 2, 0).reshape(grid * grid, D)])


def test_a_64_px_checkpoint_fine_tunes_and_evaluates_at_128(tmp_path: Path) -> None:
    sd = save_mae_64(tmp_path / "mae64.pth")
    _, cfg, loaded = parse_program_args("fastmae/finetune.py", "x", finetune_recipe,
                                        ["--preset", "debug", "--checkpoint", str(tmp_path / "mae64.pth"),
                                         "model.img_size=128"])
    assert cfg.model.img_size == 128 and cfg.model.patch_size == 8  # the override wins over the checkpoint's 64
    model, source = build_model(cfg, loaded, probe=False)
    assert "mae checkpoint" in source and "pos_embed" not in source.split("fresh:")[1]  # loaded, not fresh
    assert model.pos_embed.shape == (1, 16 * 16 + 1, 96) and sd["pos_embed"].shape == (1, 8 * 8 + 1, 96)
    assert torch.equal(model.pos_embed.detach()[0], bicubic_grid(sd["pos_embed"], 16))
    assert not torch.allclose(model.pos_embed.detach()[0], sincos_2d(96, 16))  # not the 128-px table's init
    # two training steps at 128 px: every patch of the bigger grid trains, pos_embed included
    opt = classifier_optimizer(model, cfg, 1e-3, torch.device("cpu"), probe=False)
    start = model.pos_embed.detach().clone()
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(2, 3, 128, 128)), torch.randint(0, 10, (2,)))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.pos_embed.detach(), start)
    # evaluation at 128 px on the bundled validation split (the loader resizes and centre-crops to 128)
    val = dataclasses.replace(cfg.data, shards=str(bundled_sample_dir("val")), backend="torch", num_workers=0)
    loader = build_loader(val, img_size=128, mode="eval", labels=True)
    stats = evaluate(model, loader, "cpu")
    assert stats["count"] == 20 and 0.0 <= stats["acc1"] <= 100.0 and stats["loss"] > 0
    with pytest.raises(ValueError, match="input images are 64x64, the model expects 128x128"):
        model(torch.randn(1, 3, 64, 64))


def test_fp16_above_224_px_warns() -> None:
    cfg = finetune_recipe("mae_vit_huge_patch14")
    cfg.model.img_size, cfg.train.precision = 448, "fp16"
    warning = fp16_resolution_warning(cfg)
    assert warning.startswith("warning: train.precision=fp16 at model.img_size=448") and "bf16" in warning
    cfg.train.precision = "bf16"
    assert fp16_resolution_warning(cfg) == ""
    cfg.model.img_size, cfg.train.precision = 224, "fp16"
    assert fp16_resolution_warning(cfg) == ""
