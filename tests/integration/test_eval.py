"""Fine-tuning, linear probing and evaluation as programs, on CPU: both programs through DeepSpeed (gloo, 1 rank,
and 2 ranks compiled) on the bundled sample with the debug preset, kill -9 and resume, the evaluation command,
pre-training's k-NN monitor on 2 ranks under ZeRO-3. The recipe's pieces and a real learning signal:
tests/unit/test_eval_recipe.py; the k-NN and robustness scoring in process: tests/unit/test_knn.py,
tests/unit/test_robustness.py."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dsutil import deepspeed_env, free_port, run_job
from fastmae.data import ShardIndex, bundled_sample_dir, dali_available, expand_shards
from fastmae.data.shards import write_shards

from fastmae.config import get_preset
from fastmae.evaluation import load_classifier
from fastmae.model import MaskedAutoencoderViT
from fastmae.vit import build_classifier

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the programs through DeepSpeed


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return deepspeed_env()


def run_program(script: str, args: list[str], env: dict[str, str]) -> str:
    """``python fastmae/<script>`` (1 rank, no launcher) in a subprocess, as a user would."""
    e = dict(env, MASTER_PORT=str(free_port()))
    proc = run_job([sys.executable, f"fastmae/{script}", *args], env=e, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug-preset MAE saved like ``python -m fastmae.checkpoint export`` does."""
    cfg = get_preset("debug")
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(cfg.model, cfg.mask)
    path = tmp_path_factory.mktemp("pre") / "mae_debug.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0, "epoch": 0}, path)
    return path


COMMON = ["--ds_config", "zero2.json", "--preset", "debug", "train.steps=3", "train.log_interval=1",
          "data.num_workers=0", "train.progress=false"]


def test_finetune_runs_on_bundled_sample(env: dict[str, str], pretrained: Path, tmp_path: Path) -> None:
    out = run_program("finetune.py", [*COMMON, "--checkpoint", str(pretrained), f"train.output_dir={tmp_path}"],
                      env)
    assert "fine-tuning | preset debug" in out and "val top-1" in out
    assert "mixup/cutmix" in out and "random erasing" in out
    # the recipe's RandAugment runs in the training loader: DALI's auto_aug ops on the default backend
    if dali_available():
        assert "RandAugment: rand-m9-mstd0.5-inc1 via DALI auto_aug" in out
    else:
        assert "RandAugment: rand-m9-mstd0.5-inc1 via timm" in out or "RandAugment: SKIPPED (" in out
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["classifier"] == {"num_classes": 10, "global_pool": True, "head_bn": False}
    assert best["step"] <= 3 and 0.0 <= best["acc1"] <= 100.0
    src = torch.load(pretrained, weights_only=True)["model"]
    last = torch.load(tmp_path / "last.pth", weights_only=True)["model"]
    assert not torch.equal(last["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])  # encoder trains
    model, _ = load_classifier(tmp_path / "best.pth", preset="debug")  # evaluation-only mode reads it
    assert model.num_classes == 10
    lines = [ln for ln in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(lines) == 3 and all(math.isfinite(float(ln.split('"loss": ')[1].split(",")[0])) for ln in lines)


def test_linprobe_keeps_encoder_frozen(env: dict[str, str], pretrained: Path, tmp_path: Path) -> None:
    out = run_program("linprobe.py", [*COMMON, "--checkpoint", str(pretrained), f"train.output_dir={tmp_path}"],
                      env)
    assert "linear probing" in out and "optimizer LARS" in out and "RandAugment: off" in out
    src = torch.load(pretrained, weights_only=True)["model"]
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    sd = last["model"]
    assert last["classifier"]["head_bn"] is True
    enc = [k for k in sd if not k.startswith("head.")]
    assert enc and all(torch.equal(sd[k], src[k]) for k in enc), "the frozen encoder changed"
    assert "head.0.weight" not in sd and "head.0.running_mean" in sd  # BatchNorm without affine, with stats
    assert not torch.equal(sd["head.0.running_mean"], torch.zeros_like(sd["head.0.running_mean"]))
    assert sd["head.1.weight"].abs().max() > 0


def test_evaluate_cli_on_val_split(env: dict[str, str], pretrained: Path, tmp_path: Path) -> None:
    model = build_classifier(get_preset("debug").model, 10)
    sd = torch.load(pretrained, weights_only=True)["model"]
    model.load_encoder(sd)
    ckpt = tmp_path / "clf.pth"
    torch.save({"model": model.state_dict(), "config": get_preset("debug").to_dict()}, ckpt)
    proc = subprocess.run([sys.executable, "-m", "fastmae.evaluation", "--checkpoint", str(ckpt), "--preset", "debug",
                           "--backend", "torch", "--num_workers", "0"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top-1" in proc.stdout and "20 images" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "fastmae.evaluation", "--checkpoint", str(pretrained)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "no classification head" in bad.stderr


def test_knn_monitor_on_two_ranks_under_zero3_matches_the_offline_knn(env: dict[str, str], tmp_path: Path) -> None:
    """Pre-training on 2 ranks under ZeRO-3 with knn.interval=1 logs knn_acc1/knn_acc5 after epoch 1 and after the
    last step; the last equals ``--knn`` in one process on the run's final checkpoint, so the partitioned weights
    were gathered whole and both ranks' features pooled (7 queries: the ranks hold 4 and 3)."""
    index = ShardIndex(expand_shards(bundled_sample_dir("val")))
    lines = []
    for i in range(7):
        jpg, label = index.read_sample(i)
        (tmp_path / f"q{i}.jpg").write_bytes(jpg)
        lines.append(f"{tmp_path / f'q{i}.jpg'} {label}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    val = tmp_path / "queries"
    write_shards(tmp_path / "list.txt", val, samples_per_shard=100, workers=1, shuffle=False, progress=False)
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "fastmae/train.py", "--ds_config", "zero3.json", "--preset", "debug", "train.steps=3",
           "train.log_interval=1", "data.num_workers=0", "data.backend=torch", "train.progress=false",
           "train.trackers=", "knn.interval=1", f"knn.val_shards={val}", f"train.output_dir={run_dir}"]
    proc = run_job(cmd, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ZeRO stage 3" in out and "k-NN monitor: every 1 epoch(s) and at the end" in out
    assert out.count("80 bank / 7 query images") == 2
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if "knn_acc1" in ln]
    assert [(r["step"], r["epoch"]) for r in recs] == [(2, 1), (3, 2)]  # 32 images a step: epoch 1 is 2 steps
    offline = tmp_path / "knn.json"
    proc = run_job([sys.executable, "-m", "fastmae.evaluation", "--knn", "--checkpoint", str(run_dir / "checkpoints"),
                    "--preset", "debug", "--backend", "torch", "--num_workers", "0", "--val-shards", str(val),
                    "--json", str(offline)], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(offline.read_text())
    assert (rec["bank"], rec["count"]) == (80, 7)
    assert (recs[-1]["knn_acc1"], recs[-1]["knn_acc5"]) == (rec["acc1"], rec["acc5"])


# ----------------------------------------------------------------------------- through the shared trainer


def run_runner(program: str, args: list[str], env: dict[str, str], expect: int = 0) -> str:
    e = dict(env, MASTER_PORT=str(free_port()), FASTMAE_TEST_PROGRAM=program)
    proc = run_job([sys.executable, "tests/helpers/train_runner.py", *args], env=e, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-4000:]
    return out


def train_losses(out_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


FT = ["--ds_config", "zero2.json", "--preset", "debug", "train.log_interval=1", "data.num_workers=0",
      "data.backend=torch", "train.progress=false", "train.checkpoint_interval=4", "train.trackers="]


def test_finetune_kill_9_and_resume_gives_the_same_losses(env: dict[str, str], pretrained: Path,
                                                          tmp_path: Path) -> None:
    """Fine-tuning through the trainer: killed after a checkpoint and resumed, it logs the uninterrupted run's
    losses exactly (mixup, erasing and drop path draw from (seed, micro batch))."""
    args = [*FT, "--checkpoint", str(pretrained), "train.steps=10"]
    run_runner("finetune", [*args, f"train.output_dir={tmp_path / 'full'}"], env)
    ref = train_losses(tmp_path / "full")
    assert sorted(ref) == list(range(1, 11))
    killed = tmp_path / "killed"
    e = dict(env, MASTER_PORT=str(free_port()), FASTMAE_TEST_PROGRAM="finetune")
    proc = subprocess.Popen([sys.executable, "tests/helpers/train_runner.py", *args[:-1], "train.steps=1000",
                             f"train.output_dir={killed}"], cwd=REPO, env=e, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints" / "step_00000004" / "fastmae_state.json"
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint at step 4"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    out = run_runner("finetune", [*args, f"train.output_dir={killed}"], env)
    assert "resumed from" in out
    got = train_losses(killed)
    for s in range(1, 11):
        assert got[s] == ref[s], (s, got[s], ref[s])


def test_finetune_nonfinite_skip_progress_bar_and_toggles(env: dict[str, str], pretrained: Path,
                                                          tmp_path: Path) -> None:
    """On a terminal fine-tuning shows the progress bar; a NaN batch is skipped; compile and activation
    checkpointing apply to the classifier's blocks (captured with aot_eager: the graphs without the CPU's slow
    code generation; inductor compiles the same blocks in tests/integration/test_parallelize.py)."""
    import pty

    e = dict(env, MASTER_PORT=str(free_port()), FASTMAE_TEST_PROGRAM="finetune", FASTMAE_TEST_NAN_AT="2")
    args = [*FT, "--checkpoint", str(pretrained), "train.steps=4", "train.progress=true",
            "train.on_nonfinite=skip", "train.compile=true", "train.compile_backend=aot_eager",
            "train.activation_checkpointing=on", f"train.output_dir={tmp_path}"]
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "tests/helpers/train_runner.py", *args], cwd=REPO, env=e, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    code = proc.wait(timeout=300)
    out = b"".join(chunks).decode(errors="replace")
    assert code == 0, out[-4000:]
    assert ("toggles: activation checkpointing (4 blocks), torch.compile per block (4 blocks) with backend "
            "aot_eager") in out
    assert "skipping a micro batch with non-finite loss at step 3" in out
    assert re.search(r"4/4 \[[0-9:<]+, *[0-9.?]+ *(step/s|s/step)\]", out), out[-2000:]  # tqdm's bar
    assert all(math.isfinite(v) for v in train_losses(tmp_path).values())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_finetune_compiled_on_two_ranks_with_every_zero_config(stage: int, env: dict[str, str], pretrained: Path,
                                                                tmp_path: Path) -> None:
    """Fine-tuning on 2 ranks with train.compile=on (every classifier block compiled, fullgraph) trains and
    validates with each bundled ZeRO config; under ZeRO-3 the blocks are leaf modules whose hook stays outside
    the compiled forward. (The aot_eager backend captures and differentiates the graphs without generating code;
    torchrun starts the ranks.)"""
    e = dict(env, FASTMAE_TEST_PROGRAM="finetune")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tests/helpers/train_runner.py", *FT, "--ds_config", f"zero{stage}.json", "--checkpoint", str(pretrained),
           "train.steps=2", "train.compile=on", "train.compile_backend=aot_eager", f"train.output_dir={tmp_path}"]
    proc = run_job(cmd, env=e, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"ZeRO stage {stage}" in out and "2 rank(s)" in out and "val top-1" in out
    assert "torch.compile per block (4 blocks)" in out
    assert ("ZeRO-3 leaf blocks (4)" in out) == (stage == 3)
    got = train_losses(tmp_path)
    assert sorted(got) == [1, 2] and all(math.isfinite(v) for v in got.values())
