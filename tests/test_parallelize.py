"""Performance toggles change speed and memory, never results or parameter names."""

from __future__ import annotations

import pytest
import torch

import fastmae
from fastmae.config import get_preset
from fastmae.memory import estimate_memory
from fastmae.parallelize import apply_performance_toggles
from fastmae.precision import Precision


def _loss_and_grads(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor):
    model.zero_grad()
    loss, _, _ = model(imgs, noise=noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(**kw):
    torch.manual_seed(0)
    a = fastmae.create_model("debug", **kw)
    b = fastmae.create_model("debug", **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def test_activation_checkpointing_same_loss_grads_and_names() -> None:
    plain, ac = _pair()
    applied = apply_performance_toggles(ac, activation_checkpointing=True, compile=False)
    assert applied == ["activation checkpointing (6 blocks)"]
    assert list(ac.state_dict()) == list(plain.state_dict())
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    l1, g1 = _loss_and_grads(plain, imgs, noise)
    l2, g2 = _loss_and_grads(ac, imgs, noise)
    assert torch.equal(l1, l2) and g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-7)


def test_compile_same_loss_and_names() -> None:
    plain, comp = _pair(depth=1, decoder_depth=1)
    apply_performance_toggles(comp, activation_checkpointing=False, compile=True)
    assert list(comp.state_dict()) == list(plain.state_dict())
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    l1, g1 = _loss_and_grads(plain, imgs, noise)
    l2, g2 = _loss_and_grads(comp, imgs, noise)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6)


def test_memory_estimate_orders_and_vit_h_fits_80gb() -> None:
    m = get_preset("mae_vit_huge_patch14").model
    without = estimate_memory(m, 0.75, 256, zero_stage=2, activation_checkpointing=False)
    with_ac = estimate_memory(m, 0.75, 256, zero_stage=2, activation_checkpointing=True)
    assert with_ac.activations < without.activations / 4
    assert without.total < 0.9 * 80e9  # the estimate says ViT-H/14 at 256 fits an 80 GB card without recompute
    z1 = estimate_memory(m, 0.75, 256, zero_stage=1, world_size=8)
    z3 = estimate_memory(m, 0.75, 256, zero_stage=3, world_size=8)
    assert z3.weights * 8 == z1.weights and z3.gradients < z1.gradients and z3.optimizer == z1.optimizer
    # the model states of ViT-H in bf16 autocast + AdamW: ~18 bytes per parameter (fp32 weights and gradients)
    assert 9e9 < without.model_states < 12e9


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_blocks_trace_without_graph_breaks(backend: str, precision: str) -> None:
    """What train.compile compiles (every block, fullgraph) traces as one graph with each attention backend
    choice, in fp32 and under the bf16 autocast policy, with and without activation checkpointing."""
    torch._dynamo.reset()
    model = fastmae.create_model("debug", attention=backend)
    x = torch.randn(2, 17, model.blocks[0].attn.qkv.in_features, requires_grad=True)
    for checkpointed in (False, True):
        if checkpointed:
            apply_performance_toggles(model, activation_checkpointing=True, compile=False)
        with Precision(precision).autocast("cpu"):
            explained = torch._dynamo.explain(model.blocks[0])(x)
        assert explained.graph_break_count == 0, (checkpointed, explained.break_reasons)
        assert explained.graph_count == 1, checkpointed


def test_attention_looks_flash_attn_up_only_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a lookup inside forward would be traced code (a graph break per block); on CPU the device check
    used to hide it, so the lookup itself is made to fail after construction."""
    import fastmae.attention as attention

    model = fastmae.create_model("debug", attention="auto")

    def looked_up() -> bool:
        raise AssertionError("flash_attn looked up inside forward")

    monkeypatch.setattr(attention, "flash_attn_available", looked_up)
    loss = model(torch.randn(2, 3, 64, 64), noise=torch.rand(2, 64))[0]
    assert torch.isfinite(loss)
