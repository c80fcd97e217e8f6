"""Measures what DeepSpeed really holds per rank for each bundled ZeRO config, next to fastmae's estimate.

Run as ``python tests/helpers/memory_runner.py OUT.jsonl [--benchmark-rows ROWS.jsonl]`` (one rank) or under
``torchrun --nproc_per_node N``. For each stage and gradient accumulation 1 and 2 (only 1 on several ranks) it
builds the pre-training model, optimizer and engine as the trainer does (``fastmae.engine``), takes one optimizer
step, then measures the bytes allocated at the end of the next backward (the model states plus the gradients in
flight; activations are freed by then) and after ``engine.destroy()``. One JSON line per (accumulation, stage,
rank). ``--benchmark-rows`` then measures ``benchmarks/throughput.py``'s rows before and after each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import fastmae
from fastmae.config import build_config
from fastmae.distributed import init_distributed, shutdown_distributed
from fastmae.engine import fill_ds_config, load_ds_config, make_engine, zero3_bucket_elements
from fastmae.memory import allocated_bytes, estimate_memory
from fastmae.optim import build_adamw, param_groups

REPO = Path(__file__).resolve().parents[2]
# a mid-size MAE (12 M parameters at 64 px): the per-parameter terms outweigh ZeRO's fixed buffers
OVERRIDES = ["model.embed_dim=384", "model.num_heads=6", "model.depth=6", "model.decoder_embed_dim=256",
             "model.decoder_num_heads=8", "mask.backend=torch", "train.precision=fp32"]


def measure(stage: int, world_size: int, accum: int = 1, overrides: list[str] = OVERRIDES) -> dict:
    cfg = build_config("debug", overrides)
    base = allocated_bytes()
    model = fastmae.MaskedAutoencoderViT(cfg.model, cfg.mask)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_adamw(param_groups(model, 0.05, model.no_weight_decay()), cfg.optim, 1e-4, torch.device("cpu"))
    ds = fill_ds_config(load_ds_config(f"zero{stage}.json"), micro_batch=2, grad_accum=accum, world_size=world_size,
                        precision="fp32", clip_grad=0.0)
    engine = make_engine(model, opt, ds)
    imgs = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size)
    held = 0
    for i in range(accum + 1):  # one whole step, then the backward of the next micro batch
        loss = engine(imgs, mask_seed=i)[0]
        engine.backward(loss)
        if i == accum:
            del loss
            held = allocated_bytes() - base
        engine.step()
    est = estimate_memory(cfg.model, cfg.mask.ratio, 2, stage, world_size, "fp32",
                          reduce_bucket_size=zero3_bucket_elements(ds), grad_accum=accum)
    engine.destroy()
    del engine, model, opt
    after = allocated_bytes() - base
    return {"stage": stage, "world_size": world_size, "accum": accum, "rank": torch.distributed.get_rank(),
            "params": params, "held": held, "estimate": est.model_states, "left_after_destroy": after}


def benchmark_rows(path: str) -> None:
    """``benchmarks/throughput.py``'s rows one after another (DeepSpeed ZeRO-2, 0, 1 and the plain torch step):
    the bytes allocated before and after each, which must be the same once a row is done."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput

    cfg = build_config("debug", ["train.precision=fp32"]).model
    kw = dict(cfg=cfg, ratio=0.75, batch=4, device=torch.device("cpu"), dtype=torch.float32, warmup=1, repeats=1,
              count=False)

    def job(stage: int) -> dict:
        s = throughput.Settings("torch", "sdpa", "off", False, zero_stage=stage)
        return dict(preset="debug", variant="fastmae", label=f"engine {stage}", s=s, with_m=False,
                    build=throughput.fastmae_builder("debug", cfg, 0.75, s, False), loss_fn=throughput.mae_loss)

    throughput.time_sequential([job(2)], kw, None)  # what the first engine allocates for good
    with open(path, "a") as f:
        for stage in (2, 0, 1, -1, 2):
            before = allocated_bytes()
            (row,) = throughput.time_sequential([job(stage)], kw, None)
            f.write(json.dumps({"stage": stage, "status": row["status"], "params_m": row["params_m"],
                                "before": before, "after": allocated_bytes()}) + "\n")


def main() -> int:
    dist = init_distributed()
    # on several ranks ZeRO-1 is left out: with accumulation it holds more than the one-rank figure, and without it
    # the same as ZeRO-2
    stages = (0, 1, 2, 3) if dist.world_size == 1 else (0, 2, 3)
    for stage in stages:  # once with the tiny preset: what the first engine of each kind allocates for good
        measure(stage, dist.world_size, 1, ["mask.backend=torch", "train.precision=fp32"])
    with open(sys.argv[1], "a") as f:
        for accum in (1, 2) if dist.world_size == 1 else (1,):
            for stage in stages:
                f.write(json.dumps(measure(stage, dist.world_size, accum)) + "\n")
                f.flush()
    if len(sys.argv) > 3 and sys.argv[2] == "--benchmark-rows":
        benchmark_rows(sys.argv[3])
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
