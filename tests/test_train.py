"""The training program through DeepSpeed on CPU (gloo): ZeRO 1/2/3 with 2 ranks, kill -9 + exact resume,
non-finite loss handling, the README command, and the recipe's schedule and weight-decay groups."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dsutil import REPO, deepspeed_env, free_port

import fastmae
from fastmae import checkpoint as ckpt
from fastmae.config import get_preset
from fastmae.optim import build_scheduler, lr_factor, param_groups, scaled_lr

BIN = Path(sys.executable).parent
RUNNER = "tests/train_runner.py"
# tiny synthetic runs: 8 images per micro batch, effective batch 16
SMALL = ["data.backend=synthetic", "data.synthetic_size=512", "data.batch_size=8", "train.batch_size=16",
         "train.log_interval=1", "train.progress=false"]


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return deepspeed_env()


def launch(ranks: int, script: str, args: list[str]) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]


def run(cmd: list[str], env: dict[str, str], timeout: float = 300, expect: int = 0) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect}):\n{out[-4000:]}"
    return out


def losses(out_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl (the last record per step wins)."""
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


# ----------------------------------------------------------------------------- recipe (no DeepSpeed)


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


def test_config_error_exits_with_message(env: dict[str, str]) -> None:
    out = run([sys.executable, "fastmae/train.py", "model.dept=3"], env, timeout=60, expect=2)
    assert "unknown key 'model.dept'; valid keys in [model]" in out


# ----------------------------------------------------------------------------- DeepSpeed runs


@pytest.fixture(scope="module")
def one_rank_reference(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """1 rank, micro 8 x accum 2: the reference the 2-rank runs must reproduce."""
    out = tmp_path_factory.mktemp("ref1")
    run(launch(1, RUNNER, ["--ds_config", "zero2.json", *SMALL, "train.steps=5", f"train.output_dir={out}"]), env)
    return losses(out)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_two_ranks_matches_one_rank(stage: int, env: dict[str, str], tmp_path: Path,
                                               one_rank_reference: dict[int, float]) -> None:
    out = run(launch(2, RUNNER, ["--ds_config", f"zero{stage}.json", *SMALL, "train.steps=5",
                                 f"train.output_dir={tmp_path}"]), env)
    assert f"ZeRO stage {stage}" in out and "2 rank(s)" in out
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for s, ref in one_rank_reference.items():
        assert math.isfinite(got[s]) and got[s] == pytest.approx(ref, rel=2e-3), (s, got[s], ref)
    assert got[5] < got[1]


def test_kill_9_and_resume_reproduces_losses(env: dict[str, str], tmp_path: Path) -> None:
    common = ["--ds_config", "zero2.json", *SMALL, "train.checkpoint_interval=4", "train.keep_last=2"]
    full = tmp_path / "full"
    run(launch(2, RUNNER, [*common, "train.steps=40", f"train.output_dir={full}"]), env)
    ref = losses(full)
    assert sorted(ref) == list(range(1, 41))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(launch(2, RUNNER, [*common, "train.steps=1000", f"train.output_dir={killed}"]),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = killed / "checkpoints" / "step_00000008" / ckpt.STATE_FILE
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint at step 8 within 240 s"
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # somewhere after it: maybe in a step, maybe in a save
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = losses(killed)
    tag = ckpt.latest_complete(killed / "checkpoints")
    resumed_from = int(tag.split("_")[1])
    assert 8 <= resumed_from < 40

    stop = min(resumed_from + 4, 40)
    out = run(launch(2, RUNNER, [*common, f"train.steps={stop}", f"train.output_dir={killed}"]), env)
    assert f"resumed from {killed / 'checkpoints' / tag} at step {resumed_from}" in out
    after = losses(killed)
    # everything logged before the kill and everything after the resume equals the uninterrupted run
    for s in range(1, resumed_from + 1):
        assert before[s] == ref[s], s
    for s in range(resumed_from + 1, stop + 1):
        assert after[s] == ref[s], (s, after[s], ref[s])
    state = ckpt.read_state(killed / "checkpoints", ckpt.latest_complete(killed / "checkpoints"))
    assert state["step"] == stop and state["data"]["batch_in_epoch"] == (stop * 16 // 8 // 2) % 32


def test_non_finite_loss_stops_with_step_and_checkpoint(env: dict[str, str], tmp_path: Path) -> None:
    env = dict(env, FASTMAE_TEST_NAN_AT="12")  # micro batch 12 = step 7 (accum 2)
    args = ["--ds_config", "zero2.json", *SMALL, "train.log_interval=5", "train.checkpoint_interval=5",
            "train.steps=20", f"train.output_dir={tmp_path}"]
    out = run(launch(1, RUNNER, args), env, expect=1)
    assert "non-finite loss at step 7" in out
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step_00000005'}" in out
    assert ckpt.latest_complete(tmp_path / "checkpoints") == "step_00000005"  # nothing saved after the NaN
    skip_dir = tmp_path / "skip"
    out = run(launch(1, RUNNER, [*args[:-1], f"train.output_dir={skip_dir}", "train.on_nonfinite=skip"]), env)
    assert "skipping a micro batch with non-finite loss at step 7" in out
    assert all(math.isfinite(v) for v in losses(skip_dir).values()) and max(losses(skip_dir)) == 20


def test_readme_command_trains_on_bundled_sample(env: dict[str, str], tmp_path: Path) -> None:
    """`deepspeed fastmae/train.py --ds_config zero2.json` (the README's main job) on its defaults."""
    cmd = [str(BIN / "deepspeed"), "--master_port", str(free_port()), "fastmae/train.py", "--ds_config", "zero2.json",
           f"train.output_dir={tmp_path}"]
    out = run(cmd, env, timeout=600)
    assert "preset debug" in out and "data=" in out
    got = losses(tmp_path)
    assert max(got) == get_preset("debug").train.steps
    first, last = got[min(got)], got[max(got)]
    assert last < first * 0.9, (first, last)
    export = tmp_path / "mae.pth"
    run([sys.executable, "-m", "fastmae.checkpoint", "export", str(tmp_path / "checkpoints"), str(export)], env)
    sd = torch.load(export, weights_only=True)["model"]
    model = fastmae.create_model("debug")
    model.load_state_dict(sd)  # strict: official names, nothing missing


def test_bf16_zero3_two_ranks_trains_and_exports(env: dict[str, str], tmp_path: Path) -> None:
    """bf16 DeepSpeed (fp32 master weights) with ZeRO-3 partitioned parameters, fixed pos embeds included."""
    run(launch(2, RUNNER, ["--ds_config", "zero3.json", *SMALL, "train.precision=bf16", "train.steps=6",
                           f"train.output_dir={tmp_path}"]), env)
    got = losses(tmp_path)
    assert all(math.isfinite(v) for v in got.values()) and got[6] < got[1]
    export = tmp_path / "mae.pth"
    run([sys.executable, "-m", "fastmae.checkpoint", "export", str(tmp_path / "checkpoints"), str(export)], env)
    sd = torch.load(export, weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in sd.values())
    fastmae.create_model("debug").load_state_dict(sd)
