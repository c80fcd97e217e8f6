"""The pre-training recipe without DeepSpeed: the lr schedule, the weight-decay groups, and which checkpoint a
resume picks. The training program itself, on 1-3 real ranks: tests/integration/test_train.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import fastmae
from fastmae import checkpoint as ckpt
from fastmae.config import get_preset
from fastmae.optim import build_scheduler, lr_factor, param_groups, scaled_lr


def test_lr_schedule_matches_formula() -> None:
    total, warm = 100, 10
    assert lr_factor(0, total, warm) == 0.0
    assert lr_factor(5, total, warm) == 0.5
    assert lr_factor(10, total, warm) == 1.0
    assert math.isclose(lr_factor(55, total, warm), 0.5)  # half-way through the cosine
    assert math.isclose(lr_factor(100, total, warm), 0.0, abs_tol=1e-12)
    assert math.isclose(lr_factor(55, total, warm, min_ratio=0.1), 0.1 + 0.9 * 0.5)
    cfg = get_preset("mae_vit_large_patch16")
    assert scaled_lr(cfg.optim, 4096) == pytest.approx(1.5e-4 * 16)  # base_lr x 4096 / 256
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=2.0)
    sched = build_scheduler(opt, total, warm)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:3] == [0.0, 0.2, 0.4] and math.isclose(seen[10], 2.0) and seen[11] < 2.0


def test_weight_decay_groups_exclude_norms_biases_tokens_and_pos_embed() -> None:
    model = fastmae.create_model("debug", encoder_mask_tokens=True)
    groups = param_groups(model, 0.05, model.no_weight_decay())
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    for n in ["cls_token", "mask_token", "encoder_mask_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.bias", "decoder_pred.bias", "patch_embed.proj.bias"]:
        assert n in no_decay, n
    for n in ["blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "patch_embed.proj.weight",
              "decoder_embed.weight", "decoder_pred.weight"]:
        assert n in decay, n
    assert "pos_embed" not in decay | no_decay  # fixed, not trained at all
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}


def test_latest_never_points_at_incomplete_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    (d / "step_00000004").mkdir(parents=True)
    (d / "step_00000004" / ckpt.STATE_FILE).write_text("{}")
    (d / "step_00000008").mkdir()  # killed during the save: shards maybe, no marker
    (d / "latest").write_text("step_00000008")
    assert ckpt.latest_complete(d) == "step_00000004"
    assert ckpt.complete_tags(d) == ["step_00000004"]
