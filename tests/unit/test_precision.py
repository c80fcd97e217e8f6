"""The precision policy (fastmae.precision): bf16 autocast over fp32 weights, fp32 gradients, exact fixed tables;
DeepSpeed's bf16 mode refused; the benchmarks step under the same context as the training programs."""

from __future__ import annotations

import sys

import pytest
import torch

import fastmae
from fastmae.config import ConfigError
from fastmae.engine import fill_ds_config
from fastmae.precision import Precision

FILL = dict(micro_batch=8, grad_accum=2, world_size=2, clip_grad=0.0)


def step(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor, precision: str):
    model.zero_grad(set_to_none=True)
    with Precision(precision).autocast("cpu"):
        loss = model(imgs, noise=noise)[0]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_step_matches_fp32_step_within_tolerance() -> None:
    """One training step of the debug MAE, bf16 autocast against fp32, same weights, images and masks.
    Stated tolerance: loss within 1 % relative; every gradient tensor within 5 % relative (Frobenius norm)
    and a cosine similarity of at least 0.995. The gradients are fp32 tensors (the weights are fp32)."""
    torch.manual_seed(0)
    model = fastmae.create_model("debug")
    imgs = torch.randn(8, 3, 64, 64)
    noise = torch.rand(8, (64 // model.patch_embed.patch_size) ** 2)
    loss32, g32 = step(model, imgs, noise, "fp32")
    loss16, g16 = step(model, imgs, noise, "bf16")
    assert loss16.dtype == torch.float32 and abs(loss16 - loss32) / loss32 < 0.01, (loss16, loss32)
    assert g16.keys() == g32.keys() and len(g32) > 20
    for name, ref in g32.items():
        got = g16[name]
        assert got.dtype == torch.float32, name
        rel = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
        assert rel < 0.05 and cos > 0.995, (name, rel, cos)
    # the fixed tables were not touched
    fresh = fastmae.create_model("debug")
    assert torch.equal(model.pos_embed, fresh.pos_embed) and model.pos_embed.dtype == torch.float32


def test_bf16_runs_matrix_products_in_bf16() -> None:
    lin = torch.nn.Linear(8, 8)
    with Precision("bf16").autocast("cpu"):
        assert lin(torch.randn(2, 8)).dtype == torch.bfloat16
    with Precision("fp32").autocast("cpu"):
        assert lin(torch.randn(2, 8)).dtype == torch.float32


def test_deepspeed_runs_an_fp32_engine_for_bf16_and_refuses_its_bf16_mode() -> None:
    ds = fill_ds_config({"bf16": {"enabled": "auto"}}, precision="bf16", **FILL)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert fill_ds_config({}, precision="fp16", **FILL)["fp16"]["enabled"] is True
    with pytest.raises(ConfigError, match=r"accumulates and reduces gradients in bf16.*\"enabled\": \"auto\""):
        fill_ds_config({"bf16": {"enabled": True}}, precision="bf16", **FILL)
    with pytest.raises(ConfigError, match="make them agree"):
        fill_ds_config({"fp16": {"enabled": True}}, precision="fp32", **FILL)


def test_benchmark_steps_under_the_training_context() -> None:
    sys.path.insert(0, str(fastmae.__path__[0] + "/../benchmarks"))
    import common

    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        with common.autocast(torch.device("cpu"), dtype):
            got = lin(x).dtype
        with Precision(name).autocast("cpu"):
            assert lin(x).dtype == got
