"""Fine-tuning at a higher resolution than pre-training (paper Table 3: ViT-H fine-tuned at 448 from its 224-px
pre-training) as users run it, at small scale: the fine-tuning program through DeepSpeed on CPU turns a 64-px
debug MAE into a 128-px classifier, trains and validates at 128 px. The position-embedding resize and the fp16
warning in the test process: tests/unit/test_finetune_448_resize.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from dsutil import deepspeed_env, free_port, run_job

from fastmae.config import get_preset
from fastmae.model import MaskedAutoencoderViT


def test_finetune_program_at_twice_the_pretraining_resolution(tmp_path: Path) -> None:
    cfg = get_preset("debug")  # img 64, patch 8
    torch.manual_seed(0)
    sd = MaskedAutoencoderViT(cfg.model, cfg.mask).state_dict()
    torch.save({"model": sd, "config": cfg.to_dict(), "step": 0, "epoch": 0}, tmp_path / "mae64.pth")
    env = dict(deepspeed_env(), MASTER_PORT=str(free_port()))
    out_dir = tmp_path / "ft128"
    proc = run_job([sys.executable, "fastmae/finetune.py", "--ds_config", "zero2.json", "--preset", "debug",
                    "--checkpoint", str(tmp_path / "mae64.pth"), "model.img_size=128", "train.steps=2",
                    "train.log_interval=1", "data.num_workers=0", "data.backend=torch", "train.progress=false",
                    "train.trackers=", f"train.output_dir={out_dir}"], env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "model: img 128 patch 8 dim 96 depth 4" in out
    assert "val top-1" in out and "(20 images)" in out  # the validation split, read at 128 px
    last = torch.load(out_dir / "last.pth", weights_only=True)
    assert last["config"]["model"]["img_size"] == 128 and last["step"] == 2
    assert last["model"]["pos_embed"].shape == (1, 16 * 16 + 1, 96) and sd["pos_embed"].shape == (1, 8 * 8 + 1, 96)
    losses = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert "warning: train.precision=fp16" not in out  # the debug preset trains in fp32: no fp16 warning
