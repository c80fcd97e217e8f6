"""Performance toggles change speed and memory, never results or parameter names: activation checkpointing, the
memory estimate, the compile modes chosen (without compiling). What compiles and traces:
tests/integration/test_parallelize.py."""

from __future__ import annotations

import pytest
import torch
from modelutil import loss_and_grads as _loss_and_grads
from modelutil import model_pair as _pair

import fastmae
from fastmae.config import get_preset
from fastmae.memory import estimate_memory, trainable_params
from fastmae.parallelize import apply_performance_toggles, compile_mode_for


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


def test_memory_estimate_orders_and_vit_h_fits_80gb() -> None:
    m = get_preset("mae_vit_huge_patch14").model
    without = estimate_memory(m, 0.75, 256, zero_stage=2, activation_checkpointing=False)
    with_ac = estimate_memory(m, 0.75, 256, zero_stage=2, activation_checkpointing=True)
    assert with_ac.activations < without.activations / 4
    assert without.total < 0.9 * 80e9  # the estimate says ViT-H/14 at 256 fits an 80 GB card without recompute
    z1 = estimate_memory(m, 0.75, 256, zero_stage=1, world_size=8)
    z1_accum = estimate_memory(m, 0.75, 256, zero_stage=1, world_size=8, grad_accum=2)
    z3 = estimate_memory(m, 0.75, 256, zero_stage=3, world_size=8)
    assert z3.weights * 8 == z1.weights and z3.optimizer == z1.optimizer and z3.buffers == 4 * 50_000_000
    assert z3.gradients == z1.gradients < z1_accum.gradients  # ZeRO-1 keeps full gradients when accumulating
    # ViT-H in bf16 autocast + AdamW on one GPU with ZeRO-2: 20 bytes of model state per parameter (fp32 weights,
    # DeepSpeed's fp32 partition copy, fp32 gradients, m and v: tests/integration/test_memory.py measures it), and
    # the bf16 weight copies autocast keeps for backward
    P = trainable_params(m)
    assert without.model_states == 20 * P and without.weight_copies == 2 * P
    assert 13e9 < without.model_states < 13.5e9  # P = 657 M (encoder 632 M + decoder)


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


def test_cudagraphs_mode_is_the_whole_step_replayed() -> None:
    """``cudagraphs`` compiles the whole-step graph with inductor's CUDA-graph mode (on the CPU there is nothing to
    capture and it is ``step``; the GPU check times it); it needs inductor, and another backend is refused."""
    from fastmae.config import ConfigError, build_config

    model = fastmae.create_model("debug", depth=1, decoder_depth=1)
    assert apply_performance_toggles(model, False, "cudagraphs") == [
        "torch.compile of the whole forward and loss as CUDA graphs"]
    with pytest.raises(ConfigError, match="cudagraphs needs train.compile_backend=inductor"):
        build_config("debug", ["train.compile=cudagraphs", "train.compile_backend=aot_eager"])
    assert build_config("debug", ["train.compile_backend=aot_eager"]).train.compile_backend == "aot_eager"


def test_zero3_compiles_per_block() -> None:
    """ZeRO-3 gathers parameters in eager hooks between modules: step and CUDA-graph modes run per block there,
    and the start-up log says so; other stages keep the mode asked for."""
    assert compile_mode_for("step", 3)[0] == "blocks" and "ZeRO-3" in compile_mode_for("cudagraphs", 3)[1]
    assert compile_mode_for("step", 2) == ("step", "") and compile_mode_for("blocks", 3) == ("blocks", "")
