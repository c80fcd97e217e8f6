"""Partial fine-tuning (paper Fig. 9, ``cls.finetune_blocks``) as users run it: the fine-tuning program through
DeepSpeed on CPU (gloo, one rank) under ZeRO 0, 2 and 3, with activation checkpointing and compiled blocks; the
frozen weights come out bit-identical, DeepSpeed's optimizer holds the trainable parameters only, and a run stopped
at step 2 and resumed ends with the uninterrupted run's weights bit for bit. In the test process (what freezes,
the optimizer, no backward graph, the settings' checks): tests/unit/test_partial_finetune.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from dsutil import deepspeed_env, free_port, run_job

from fastmae.config import get_preset
from fastmae.model import MaskedAutoencoderViT

RUNNER = "tests/helpers/train_runner.py"
ARGS = ["--preset", "debug", "train.log_interval=1", "data.num_workers=0", "data.backend=torch",
        "train.progress=false", "train.trackers=", "cls.finetune_blocks=1"]
# debug preset (depth 4), the last block trains: what stays frozen and what trains
FROZEN = ("patch_embed.", "cls_token", "pos_embed", "blocks.0.", "blocks.1.", "blocks.2.")
TRAINED = ("blocks.3.", "fc_norm.", "head.")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return deepspeed_env()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug-preset MAE saved as ``python -m fastmae.checkpoint export`` saves one."""
    cfg = get_preset("debug")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pre") / "mae_debug.pth"
    torch.save({"model": MaskedAutoencoderViT(cfg.model, cfg.mask).state_dict(), "config": cfg.to_dict(),
                "step": 0, "epoch": 0}, path)
    return path


def finetune(args: list[str], env: dict[str, str]) -> str:
    """The fine-tuning program on one rank (the test runner, no instrumentation)."""
    e = dict(env, MASTER_PORT=str(free_port()), FASTMAE_TEST_PROGRAM="finetune")
    proc = run_job([sys.executable, RUNNER, *args], env=e, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def optimizer_state_elements(ckpt_dir: Path) -> int:
    """Elements of AdamW's first moment in a one-rank DeepSpeed checkpoint (ZeRO-0: the torch optimizer's state in
    the model states file; ZeRO-1/2/3: the partitioned optimizer's file)."""
    zero = list(ckpt_dir.glob("*optim_states.pt"))
    if zero:
        sd = torch.load(zero[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = sd.get("base_optimizer_state", sd.get("optimizer_state_dict"))
    else:
        base = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["optimizer"]
    return sum(s["exp_avg"].numel() for s in base["state"].values())


def check_partial(out_dir: Path, pretrained: Path, log: str) -> None:
    """Frozen tensors equal the checkpoint's, the last block trained, the log and DeepSpeed's optimizer count the
    trainable parameters only."""
    src = torch.load(pretrained, weights_only=True)["model"]
    sd = torch.load(out_dir / "last.pth", weights_only=True)["model"]
    frozen = [k for k in sd if k.startswith(FROZEN)]
    assert len(frozen) == 4 + 3 * 12 and all(torch.equal(sd[k], src[k]) for k in frozen), "a frozen weight changed"
    block = [k for k in sd if k.startswith("blocks.3.")]
    assert len(block) == 12 and not any(torch.equal(sd[k], src[k]) for k in block), "the last block did not train"
    trainable = sum(v.numel() for k, v in sd.items() if k.startswith(TRAINED))
    total = sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var")))
    assert f"trains: {trainable / 1e6:.2f} M trainable ({trainable:,} of {total:,} parameters) | partial " \
           "fine-tuning: the last 1 of 4 blocks" in log
    steps = sorted((out_dir / "checkpoints").glob("step_[0-9]*[0-9]"))
    assert optimizer_state_elements(steps[-1]) == trainable


def test_resume_is_exact_with_checkpointing_and_compiled_blocks(env: dict[str, str], pretrained: Path,
                                                                tmp_path: Path) -> None:
    """ZeRO-2, activation checkpointing (the trainable block only) and per-block compile (aot_eager): a run
    stopped after step 2 and resumed ends with the uninterrupted run's weights, bit for bit."""
    args = [*ARGS, "--ds_config", "zero2.json", "--checkpoint", str(pretrained), "train.activation_checkpointing=on",
            "train.compile=blocks", "train.compile_backend=aot_eager"]
    full = finetune([*args, "train.steps=4", f"train.output_dir={tmp_path / 'full'}"], env)
    assert ("toggles: activation checkpointing (1 blocks), torch.compile per block (4 blocks) with backend "
            "aot_eager") in full
    check_partial(tmp_path / "full", pretrained, full)
    finetune([*args, "train.steps=2", f"train.output_dir={tmp_path / 'split'}"], env)
    out = finetune([*args, "train.steps=4", f"train.output_dir={tmp_path / 'split'}"], env)
    assert f"resumed from {tmp_path / 'split' / 'checkpoints' / 'step_00000002'} at step 2" in out
    ref = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    got = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert ref["step"] == got["step"] == 4
    assert ref["model"].keys() == got["model"].keys()
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k


@pytest.mark.parametrize("stage,compiled", [(0, False), (3, True)])
def test_frozen_prefix_under_zero_stage(stage: int, compiled: bool, env: dict[str, str], pretrained: Path,
                                        tmp_path: Path) -> None:
    """ZeRO-0 (the torch optimizer, no partitioning) and ZeRO-3 with compiled leaf blocks (whose hooks need the
    frozen prefix's output to require grad; ZeRO-1 shares ZeRO-2's optimizer, tested above): frozen parameters
    never reach the optimizer."""
    compile_args = ["train.compile=blocks", "train.compile_backend=aot_eager"] if compiled else []
    out = finetune([*ARGS, "--ds_config", f"zero{stage}.json", "--checkpoint", str(pretrained), "train.steps=2",
                    *compile_args, f"train.output_dir={tmp_path}"], env)
    assert f"ZeRO stage {stage}" in out and "val top-1" in out
    assert ("frozen prefix output requires grad (compiled blocks under ZeRO-3)" in out) == compiled
    check_partial(tmp_path, pretrained, out)
