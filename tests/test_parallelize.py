"""Performance toggles change speed and memory, never results or parameter names."""

from __future__ import annotations

import pytest
import torch

import fastmae
from fastmae.config import get_preset
from fastmae.memory import estimate_memory, trainable_params
from fastmae.parallelize import apply_activation_checkpointing, apply_performance_toggles, compile_mode_for
from fastmae.precision import Precision


def reset_dynamo() -> None:
    """torch._dynamo.reset(), retried: it iterates its cache of backends while a compile context made elsewhere in
    the process may be adding to it ("dictionary changed size during iteration")."""
    for attempt in range(3):
        try:
            torch._dynamo.reset()
            return
        except RuntimeError:
            if attempt == 2:
                raise


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
    z1_accum = estimate_memory(m, 0.75, 256, zero_stage=1, world_size=8, grad_accum=2)
    z3 = estimate_memory(m, 0.75, 256, zero_stage=3, world_size=8)
    assert z3.weights * 8 == z1.weights and z3.optimizer == z1.optimizer and z3.buffers == 4 * 50_000_000
    assert z3.gradients == z1.gradients < z1_accum.gradients  # ZeRO-1 keeps full gradients when accumulating
    # ViT-H in bf16 autocast + AdamW on one GPU with ZeRO-2: 20 bytes of model state per parameter (fp32 weights,
    # DeepSpeed's fp32 partition copy, fp32 gradients, m and v: tests/test_memory.py measures it), and the bf16
    # weight copies autocast keeps for backward
    P = trainable_params(m)
    assert without.model_states == 20 * P and without.weight_copies == 2 * P
    assert 13e9 < without.model_states < 13.5e9  # P = 657 M (encoder 632 M + decoder)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_blocks_trace_without_graph_breaks(backend: str, precision: str) -> None:
    """What train.compile compiles (every block, fullgraph) traces as one graph with each attention backend
    choice, in fp32 and under the bf16 autocast policy, with and without activation checkpointing."""
    reset_dynamo()
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


@pytest.mark.parametrize("masking", ["torch", "triton"])
@pytest.mark.parametrize("order", ["gather_first", "embed_first"])
def test_whole_training_forward_and_loss_trace_without_graph_breaks(masking: str, order: str) -> None:
    """train.compile=step compiles masking, encoder, decoder and loss as one graph: no graph break with either
    masking backend (the kernel is one custom op; the torch path draws its keys from the seed tensor without a
    Generator), either patch-embedding order, under bf16 autocast, with and without activation checkpointing."""
    reset_dynamo()
    model = fastmae.create_model("debug", masking=masking, patch_embed_order=order)
    imgs, seed = torch.randn(2, 3, 64, 64), torch.tensor(5)
    for checkpointed in (False, True):
        if checkpointed:
            apply_activation_checkpointing(model)
        with Precision("bf16").autocast("cpu"):
            explained = torch._dynamo.explain(model)(imgs, mask_seed=seed)
        assert explained.graph_break_count == 0, (checkpointed, explained.break_reasons)
        assert explained.graph_count == 1, checkpointed


def test_whole_step_compile_equals_eager_and_compiles_once() -> None:
    """The compiled whole forward + loss gives the eager loss and gradients, and a new mask seed (a device
    tensor) reuses the graph instead of recompiling."""
    from torch._dynamo.utils import counters

    reset_dynamo()
    counters.clear()
    plain, comp = _pair(depth=1, decoder_depth=1)
    assert apply_performance_toggles(comp, False, "step") == ["torch.compile of the whole forward and loss"]
    assert list(comp.state_dict()) == list(plain.state_dict())
    imgs = torch.randn(2, 3, 64, 64)
    for seed in (3, 4):
        plain.zero_grad()
        comp.zero_grad()
        l1, _, m1 = plain(imgs, mask_seed=torch.tensor(seed))
        l2, _, m2 = comp(imgs, mask_seed=torch.tensor(seed))
        assert torch.equal(m1, m2)  # the same masks: the seed's Philox keys, compiled or not
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
        l1.backward()
        l2.backward()
        for (n, p1), p2 in zip(plain.named_parameters(), comp.parameters(), strict=True):
            if p1.grad is not None:
                torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert counters["stats"]["unique_graphs"] == 1


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


def test_classifier_blocks_with_a_drop_path_schedule_share_graphs() -> None:
    """Fine-tuning's linear drop-path schedule gives every block its own rate. Compiled per block, the rate is read
    from a tensor, so the blocks share three graphs (the rate-0 first block, training, evaluation) instead of one
    per block and mode: ViT-L's 24 blocks would pass dynamo's recompile limit and stop the run."""
    from fastmae.vit import build_classifier

    graphs = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:  # dynamo's graphs, run as traced
        graphs.append(gm)
        return gm.forward

    reset_dynamo()
    model = build_classifier(get_preset("debug").model, 10, drop_path=0.3)
    assert [round(b.drop_path1.p, 6) for b in model.blocks] == [0.0, 0.1, 0.2, 0.3]
    apply_performance_toggles(model, activation_checkpointing=True, compile="blocks", backend=counting)
    imgs = torch.randn(4, 3, 64, 64)
    for _ in range(2):
        model.train()
        model(imgs).sum().backward()
        model.eval()
        model(imgs)
    assert len(graphs) == 3
