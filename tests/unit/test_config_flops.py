"""Config parsing/validation messages and the analytic FLOPs against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastmae
from fastmae import flops
from fastmae.config import ConfigError, apply_overrides, build_config, config_from_dict, get_preset
from fastmae.optim import peak_lr, plan_steps


def test_presets_match_paper_architectures() -> None:
    expect = {"mae_vit_base_patch16": (16, 768, 12, 12), "mae_vit_large_patch16": (16, 1024, 24, 16),
              "mae_vit_huge_patch14": (14, 1280, 32, 16)}
    for name, (p, d, depth, heads) in expect.items():
        m = get_preset(name).model
        assert (m.patch_size, m.embed_dim, m.depth, m.num_heads) == (p, d, depth, heads)
        assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.mlp_ratio) == (512, 8, 16, 4.0)
        assert m.norm_pix_loss and m.img_size == 224
    assert get_preset("mae_vit_large_patch16").mask.ratio == 0.75


def test_overrides_both_syntaxes_and_types() -> None:
    cfg = build_config("debug", ["train.steps=7", "--model.depth", "3", "--mask.ratio=0.5", "model.norm_pix_loss=false",
                                 "optim.lr=none"])
    assert cfg.train.steps == 7 and cfg.model.depth == 3 and cfg.mask.ratio == 0.5
    assert cfg.model.norm_pix_loss is False and cfg.optim.lr is None
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("override,message", [
    ("model.dept=3", "unknown key 'model.dept'; valid keys in \\[model\\]: img_size, patch_size"),
    ("modle.depth=3", "unknown config section 'modle'.*valid sections: model, mask, data, optim, train"),
    ("mask.ratio=1.0", "mask.ratio=1.0 must lie strictly between 0 and 1"),
    ("mask.ratio=0", "mask.ratio=0.0 must lie strictly between 0 and 1"),
    ("model.img_size=100", "model.img_size=100 is not divisible by model.patch_size=8"),
    ("model.attention=xformers", "model.attention='xformers' is not valid; valid choices: auto, flash, sdpa, math"),
    ("mask.backend=cuda", "valid choices: auto, triton, torch"),
    ("data.backend=ffcv", "valid choices: auto, dali, torch, synthetic"),
    ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
    ("model.norm_pix_loss=maybe", "expected a boolean"),
        ("train.batch_size=0", "train.batch_size=0 must be > 0"),
        ("train.resume_allow_changes=model.depth", "'model.depth' is not a schedule setting; valid: train.batch_size"),
    ("depth=3", "must be section.key"),
    ("train.precision=fp8", "valid choices: bf16, fp16, fp32"),
    ("train.compile=maybe", "valid choices: auto, off, blocks, step, cudagraphs"),
    ("data.read=random", "data.read='random' is not valid; valid choices: auto, global, stream"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer=0 must be > 0"),
    ("data.stream_fetchers=0", "data.stream_fetchers=0 must be > 0"),
    ("data.feed_workers=-2", "data.feed_workers=-2 must be >= 0, or -1"),
    ("data.hw_decoder_load=1.5", "data.hw_decoder_load=1.5 must lie in"),
    ("data.preallocate_width_hint=-1", "data.preallocate_width_hint=-1 must be >= 0"),
])
def test_config_errors_name_key_and_choices(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("debug", [override])


def test_unreachable_effective_batch_takes_the_nearest_and_rescales_lr() -> None:
    """4096 on 3, 5, 6 or 7 nodes of 8 GPUs at micro batch 64 is not a multiple of 64 x ranks: the nearest
    reachable effective batch is used and the lr follows it (base_lr x batch / 256)."""
    cfg = get_preset("mae_vit_large_patch16")
    for nodes, want in [(1, 4096), (3, 4608), (5, 5120), (6, 3072), (7, 3584)]:
        plan = plan_steps(cfg.train, cfg.optim, 64, 8 * nodes, micro_per_epoch=1000)
        assert plan.effective_batch == want and want % (64 * 8 * nodes) == 0, (nodes, plan)
        assert plan.adjusted == (want != 4096)
        assert peak_lr(cfg.optim, plan) == pytest.approx(1.5e-4 * want / 256)
    plan = plan_steps(cfg.train, cfg.optim, 16, 2, micro_per_epoch=10)  # 4096 = 16 x 2 x 128: reachable
    assert (plan.effective_batch, plan.grad_accum, plan.adjusted) == (4096, 128, False)
    small = get_preset("debug")  # effective 16 at micro 16: 2 ranks step by 32, the nearest is 32
    plan = plan_steps(small.train, small.optim, 16, 2, micro_per_epoch=4)
    assert (plan.effective_batch, plan.grad_accum) == (32, 1)
    assert "using the nearest reachable effective batch 32" in plan.describe_adjustment(16, 2)


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="valid presets: mae_vit_base_patch16, mae_vit_large_patch16"):
        build_config("mae_vit_giant", [])


def test_compile_defaults_to_auto_and_takes_booleans() -> None:
    assert build_config("debug", []).train.compile == "auto"
    assert build_config("debug", ["train.compile=true"]).train.compile == "blocks"
    assert build_config("debug", ["train.compile=on"]).train.compile == "blocks"
    assert build_config("debug", ["train.compile=False"]).train.compile == "off"
    assert build_config("debug", ["train.compile=step"]).train.compile == "step"
    assert config_from_dict({"train": {"compile": True}}).train.compile == "blocks"  # configs saved before "auto"


def test_override_without_value() -> None:
    with pytest.raises(ConfigError, match="has no value"):
        apply_overrides(get_preset("debug"), ["--train.steps"])


def test_encoder_skip_flops_ratio_vit_l_near_paper() -> None:
    ratio = flops.encoder_skip_flops_ratio("mae_vit_large_patch16")
    assert 3.2 <= ratio <= 3.4, ratio  # paper Table 1c: 3.3x
    assert flops.encoder_skip_flops_ratio("mae_vit_huge_patch14") > ratio  # deeper encoder, larger share


def _counted(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor, backward: bool) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = model(imgs, noise=noise)
        if backward:
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("with_m,order", [(False, "gather_first"), (False, "embed_first"), (True, "gather_first")])
def test_analytic_flops_match_flop_counter(with_m: bool, order: str) -> None:
    B = 2
    model = fastmae.create_model("debug", attention="math", encoder_mask_tokens=with_m, patch_embed_order=order)
    imgs = torch.randn(B, 3, 64, 64)
    noise = torch.rand(B, 64)
    fwd = _counted(model, imgs, noise, backward=False) / B
    analytic = flops.forward_flops(model.config, 0.75)
    assert abs(fwd - analytic) / analytic < 0.02, (fwd, analytic)
    train = _counted(model, imgs, noise, backward=True) / B
    analytic_train = flops.train_flops(model.config, 0.75)
    assert abs(train - analytic_train) / analytic_train < 0.02, (train, analytic_train)
