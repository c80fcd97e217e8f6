"""Partial fine-tuning (paper Fig. 9, ``cls.finetune_blocks``) in the test process: what is frozen and what
trains, the optimizer's parameters, no backward graph for the frozen prefix, activation checkpointing of the
trainable blocks only, the memory estimate and FLOPs, the settings' checks. Through DeepSpeed (ZeRO 0-3, resume):
tests/integration/test_partial_finetune_deepspeed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastmae.config import ConfigError, get_preset
from fastmae.finetune import build_model, classifier_optimizer, describe_trainable, finetune_flops, parse_program_args
from fastmae.memory import block_params, estimate_memory
from fastmae.model import MaskedAutoencoderViT
from fastmae.parallelize import apply_performance_toggles
from fastmae.recipes import PROBE_IGNORED, finetune_recipe, linprobe_recipe


def pretrained() -> tuple[dict[str, torch.Tensor], dict]:
    """A fresh debug MAE's state dict, as a loaded checkpoint (state dict, metadata)."""
    cfg = get_preset("debug")
    return MaskedAutoencoderViT(cfg.model, cfg.mask).state_dict(), {"config": cfg.to_dict()}


def classifier(blocks: int, global_pool: bool = True):
    cfg = finetune_recipe("debug")  # depth 4, drop path 0.1
    cfg.cls.finetune_blocks, cfg.cls.global_pool = blocks, global_pool
    model, _ = build_model(cfg, pretrained(), probe=False)
    return cfg, model


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))


def test_only_the_last_block_norm_and_head_train() -> None:
    """finetune_blocks=1: after a few AdamW steps (weight decay on) every frozen tensor is bit-identical to the
    start and every trainable one moved; the optimizer holds exactly the trainable parameters."""
    cfg, model = classifier(1)
    names = trainable_names(model)
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("blocks.3.", "fc_norm.", "head."))}
    opt = classifier_optimizer(model, cfg, 1e-3, torch.device("cpu"), probe=False)
    held = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(held) == len(trainable) == 16 and {id(p) for p in held} == {id(p) for p in trainable}
    # one block of width 96 (norms, qkv, proj, fc1, fc2), fc_norm, the 10-class head
    block = 4 * 96 + (96 * 288 + 288) + (96 * 96 + 96) + (96 * 384 + 384) + (384 * 96 + 96)
    assert sum(p.numel() for p in held) == block + 2 * 96 + (96 * 10 + 10)
    assert any(g["weight_decay"] > 0 for g in opt.param_groups)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        imgs, labels = batch()
        F.cross_entropy(model(imgs), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    for n, p in model.named_parameters():
        if n in names:
            assert not torch.equal(p, start[n]), f"{n} did not train"
        else:
            assert torch.equal(p, start[n]), f"frozen {n} changed"
            assert p.grad is None, f"frozen {n} got a gradient"
    assert len(model.state_dict()) == len(start)  # every weight is still in the state dict
    line = describe_trainable(model, 1, probe=False)
    assert f"({sum(p.numel() for p in trainable):,} of {sum(t.numel() for t in start.values()):,} parameters)" in line
    assert "the last 1 of 4 blocks" in line


@pytest.mark.parametrize("global_pool,norm", [(True, "fc_norm"), (False, "norm")])
def test_zero_blocks_trains_head_and_norm_only(global_pool: bool, norm: str) -> None:
    _, model = classifier(0, global_pool)
    assert trainable_names(model) == {f"{norm}.weight", f"{norm}.bias", "head.weight", "head.bias"}
    assert model.frozen_blocks == 4


def test_frozen_prefix_builds_no_backward_graph() -> None:
    """The prefix's output has no autograd history, autograd saves less in the forward pass, drop path is off in
    the frozen blocks and keeps its linear rate in the trainable ones; -1 (full fine-tuning) keeps the graph."""
    imgs, _ = batch()
    saved: dict[int, int] = {}
    for blocks in (-1, 1):
        _, model = classifier(blocks)
        prefix = model.forward_prefix(imgs)
        assert (prefix.grad_fn is None and not prefix.requires_grad) == (blocks == 1)
        count = [0]

        def pack(t: torch.Tensor, count: list[int] = count) -> torch.Tensor:
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(imgs).sum()
        saved[blocks] = count[0]
    assert 0 < saved[1] < saved[-1] / 3  # one of four blocks (and the head) keeps activations
    rates = [blk.drop_path1.p for blk in model.blocks]
    assert rates[:3] == [0.0, 0.0, 0.0] and rates[3] == pytest.approx(0.1)


def test_activation_checkpointing_wraps_the_trainable_blocks_only() -> None:
    """Checkpointing frozen blocks would recompute nothing: only the trainable ones are wrapped, with the same
    loss and gradients as without."""
    _, plain = classifier(2)
    _, ac = classifier(2)
    ac.load_state_dict(plain.state_dict())
    assert apply_performance_toggles(ac, activation_checkpointing=True, compile="off") == [
        "activation checkpointing (2 blocks)"]
    imgs, labels = batch()
    grads = []
    for m in (plain, ac):
        m.eval()  # no drop path: the two draw the same numbers either way, this keeps the check exact
        F.cross_entropy(m(imgs), labels).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == trainable_names(plain)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_memory_estimate_and_flops_count_the_trainable_blocks() -> None:
    m = get_preset("mae_vit_base_patch16").model
    full = estimate_memory(m, 0.5, 64, zero_stage=2, precision="bf16")
    for k in (4, 1, 0):
        part = estimate_memory(m, 0.5, 64, zero_stage=2, precision="bf16", trainable_blocks=k)
        P = k * block_params(768, 4.0) + 2 * 768
        assert part.weights == full.weights  # every weight stays on the device
        assert part.gradients == 4 * P and part.weight_copies == 2 * P and part.optimizer == 12 * P
        assert part.activations < full.activations
    ac = estimate_memory(m, 0.5, 64, activation_checkpointing=True, trainable_blocks=1)
    no_ac = estimate_memory(m, 0.5, 64, activation_checkpointing=False, trainable_blocks=1)
    assert ac.activations <= no_ac.activations
    # FLOPs: the frozen prefix runs forward only. The analytic count keeps one ratio to what FlopCounterMode
    # counts over a real step (they count attention differently) whatever the number of trained blocks
    from torch.utils.flop_counter import FlopCounterMode

    ratios = {}
    for k in (-1, 1, 0):
        _, model = classifier(k)
        imgs, labels = batch()
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(imgs), labels).backward()
        ratios[k] = finetune_flops(model, k, False) / (counter.get_total_flops() / 4)
    assert ratios[1] == pytest.approx(ratios[-1], rel=0.01) and ratios[0] == pytest.approx(ratios[-1], rel=0.01)
    assert finetune_flops(model, 0, False) < finetune_flops(model, 1, False) < finetune_flops(model, -1, False)


def test_bad_values_are_config_errors_naming_the_depth(tmp_path: Path) -> None:
    """The check runs with the architecture the program trains: the preset's, or the checkpoint's."""
    for bad in ("5", "-2"):
        with pytest.raises(ConfigError, match=f"cls.finetune_blocks={bad}: valid are 0 .* to model.depth=4"):
            parse_program_args("fastmae/finetune.py", "x", finetune_recipe,
                               ["--preset", "debug", f"cls.finetune_blocks={bad}"])
    _, cfg, _ = parse_program_args("fastmae/finetune.py", "x", finetune_recipe,
                                   ["--preset", "debug", "cls.finetune_blocks=4"])
    assert cfg.cls.finetune_blocks == 4
    shallow = get_preset("debug")
    shallow.model.depth = 2
    path = tmp_path / "mae_depth2.pth"
    torch.save({"model": MaskedAutoencoderViT(shallow.model, shallow.mask).state_dict(),
                "config": shallow.to_dict()}, path)
    with pytest.raises(ConfigError, match="cls.finetune_blocks=3: .*model.depth=2"):
        parse_program_args("fastmae/finetune.py", "x", finetune_recipe,
                           ["--preset", "debug", "--checkpoint", str(path), "cls.finetune_blocks=3"])
    with pytest.raises(ConfigError, match="cls.finetune_blocks is not used by linprobe"):
        parse_program_args("fastmae/linprobe.py", "x", linprobe_recipe, ["--preset", "debug", "cls.finetune_blocks=1"],
                           PROBE_IGNORED)
