"""Performance toggles change speed, never results or parameter names: torch.compile per block and of the whole
step (inductor, on the CPU) against eager, and what train.compile traces has no graph break. The toggles without
compiling: tests/unit/test_parallelize_toggles.py."""

from __future__ import annotations

import pytest
import torch
from modelutil import loss_and_grads as _loss_and_grads
from modelutil import model_pair as _pair

import fastmae
from fastmae.config import get_preset
from fastmae.parallelize import apply_activation_checkpointing, apply_performance_toggles
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
