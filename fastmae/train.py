"""MAE pre-training with DeepSpeed: ``deepspeed fastmae/train.py --ds_config zero2.json [--preset P] [k=v ...]``.

The program wires the pieces together (the only place that knows all of them): config -> distributed
init -> loader -> model -> performance toggles -> AdamW + schedule -> DeepSpeed engine -> resume -> loop
with metrics and checkpoints. Overrides are ``section.key=value`` or ``--section.key value``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastmae import checkpoint as ckpt
from fastmae.config import Config, ConfigError, build_config, config_from_dict, preset_names
from fastmae.flops import train_flops
from fastmae.memory import MemoryEstimate, estimate_memory
from fastmae.metrics import MetricsLogger, format_line, peak_tflops
from fastmae.model import MaskedAutoencoderViT, resolve_masking_backend
from fastmae.optim import build_adamw, build_scheduler, param_groups, plan_steps, scaled_lr
from fastmae.parallelize import apply_performance_toggles
from fastmae.runtime import (
    DistInfo,
    fill_ds_config,
    init_distributed,
    load_ds_config,
    mask_seed,
    seed_everything,
    shutdown_distributed,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf (train.on_nonfinite=stop)."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    ap = argparse.ArgumentParser(
        prog="fastmae/train.py", allow_abbrev=False,
        description="MAE pre-training. Extra arguments are config overrides: section.key=value or "
                    "--section.key value (sections: model, mask, data, optim, train).",
    )
    ap.add_argument("--ds_config", default="zero2.json",
                    help="DeepSpeed JSON: a bundled name (zero1.json, zero2.json, zero3.json) or a path")
    ap.add_argument("--preset", default="debug", help=f"one of: {', '.join(preset_names())}")
    ap.add_argument("--config", default=None, help="a config JSON (e.g. config.json of an earlier run); "
                                                   "overrides apply on top")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = ap.parse_known_args(argv)
    if args.config:
        import json

        cfg = config_from_dict(json.loads(Path(args.config).read_text()))
        from fastmae.config import apply_overrides

        apply_overrides(cfg, rest)
    else:
        cfg = build_config(args.preset, rest)
    return args, cfg


def make_loader(cfg: Config, dist: DistInfo) -> Any:
    """The configured loader for this rank (DALI / torch / synthetic)."""
    from fastmae.data import build_loader

    return build_loader(cfg.data, img_size=cfg.model.img_size, rank=dist.rank, world_size=dist.world_size,
                        seed=cfg.train.seed, device=dist.device, mode="train")


def decide_activation_checkpointing(cfg: Config, dist: DistInfo, zero_stage: int) -> tuple[bool, MemoryEstimate]:
    """``train.activation_checkpointing``: on / off, or auto = on only when the analytic estimate without it
    exceeds 90% of this GPU's memory. Returns the decision and the estimate that goes with it."""
    def est(ac: bool) -> MemoryEstimate:
        return estimate_memory(cfg.model, cfg.mask.ratio, cfg.data.batch_size, zero_stage, dist.world_size,
                               cfg.train.precision, ac, cfg.model.attention)

    mode = cfg.train.activation_checkpointing
    if mode == "auto":
        use = False
        if dist.device.type == "cuda":
            use = est(False).total > 0.9 * torch.cuda.get_device_properties(dist.device).total_memory
    else:
        use = mode == "on"
    return use, est(use)


def log0(dist: DistInfo, *msg: Any) -> None:
    if dist.is_main:
        print("[fastmae]", *msg, flush=True)


def train(cfg: Config, ds_config_name: str) -> dict[str, Any]:
    """Run pre-training; returns a summary (final step, last losses) for tests and scripts."""
    import deepspeed

    dist = init_distributed()
    try:
        return _train(cfg, ds_config_name, dist, deepspeed)
    finally:
        shutdown_distributed()


def _train(cfg: Config, ds_config_name: str, dist: DistInfo, deepspeed: Any) -> dict[str, Any]:
    t_cfg, o_cfg = cfg.train, cfg.optim
    seed_everything(t_cfg.seed, dist.rank)
    out_dir = Path(t_cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(cfg.to_json())

    # ---- data
    loader = make_loader(cfg, dist)
    micro = cfg.data.batch_size
    plan = plan_steps(t_cfg, o_cfg, micro, dist.world_size, len(loader))
    grad_accum, micro_per_epoch, budget = plan.grad_accum, plan.micro_per_epoch, plan.budget
    total_steps, warmup_steps = plan.total_steps, plan.warmup_steps

    # ---- model, toggles, optimizer, engine
    stage = int(load_ds_config(ds_config_name).get("zero_optimization", {}).get("stage", 0))
    use_ac, estimate = decide_activation_checkpointing(cfg, dist, stage)
    model = MaskedAutoencoderViT(cfg.model, cfg.mask)
    toggles = apply_performance_toggles(model, use_ac, t_cfg.compile)
    lr = scaled_lr(o_cfg, t_cfg.batch_size)
    groups = param_groups(model, o_cfg.weight_decay, model.no_weight_decay())
    optimizer = build_adamw(groups, o_cfg, lr, dist.device)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, o_cfg.min_lr / lr)
    ds_config = fill_ds_config(load_ds_config(ds_config_name), micro_batch=micro, grad_accum=grad_accum,
                               world_size=dist.world_size, precision=t_cfg.precision, clip_grad=o_cfg.clip_grad)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)

    masking = resolve_masking_backend(cfg.mask.backend, dist.device)
    from fastmae.attention import resolve_attention_backend

    act_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[t_cfg.precision]
    attention = resolve_attention_backend(cfg.model.attention, dist.device, act_dtype)
    flops_per_img = train_flops(cfg.model, cfg.mask.ratio)
    peak = peak_tflops(override=t_cfg.peak_tflops) if dist.device.type == "cuda" else None
    log0(dist, f"preset {cfg.preset} | {dist.world_size} rank(s) on {dist.device.type} | "
               f"ZeRO stage {ds_config['zero_optimization']['stage']} | precision {t_cfg.precision}")
    log0(dist, f"backends: masking={masking} attention={attention} data={getattr(loader, 'backend', '?')} | "
               f"toggles: {', '.join(toggles) or 'none'}")
    log0(dist, f"memory estimate per rank: {estimate.describe()}")
    log0(dist, f"batch: micro {micro} x accum {grad_accum} x ranks {dist.world_size} = {t_cfg.batch_size} | "
               f"lr {lr:.3e} (base {o_cfg.base_lr:.2e}) | warmup {warmup_steps} of {total_steps} steps | "
               f"this run: {budget} steps | {flops_per_img / 1e9:.2f} GFLOP/img (train)")

    # ---- resume
    step = 0
    found = ckpt.find_resume(t_cfg.resume, ckpt_dir)
    if found is not None:
        state = ckpt.load(engine, *found, dist.world_size)
        step = int(state["step"])
        loader.load_state_dict(state["data"])
        log0(dist, f"resumed from {found[0] / found[1]} at step {step} (epoch {loader.epoch}, "
                   f"batch {loader.batch_in_epoch})")
    else:
        loader.set_epoch(0)

    logger = MetricsLogger(out_dir, enabled=dist.is_main)
    bar = None
    if dist.is_main and t_cfg.progress and sys.stdout.isatty():
        from tqdm import tqdm

        bar = tqdm(total=budget, initial=step, unit="step", dynamic_ncols=True)

    # ---- loop
    dev = dist.device
    flags = torch.zeros(t_cfg.log_interval * grad_accum, dtype=torch.bool, device=dev)  # non-finite per micro
    loss_sum = torch.zeros((), device=dev)
    n_loss = 0
    imgs_seen = 0
    data_wait = 0.0
    t_last = time.perf_counter()
    last_good = str(ckpt_dir / ckpt.latest_complete(ckpt_dir)) if ckpt.latest_complete(ckpt_dir) else "none"
    losses: list[float] = []
    micro_step = step * grad_accum
    done = step >= budget
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def check_finite(upto_step: int) -> None:
        if n_loss and bool(flags[:n_loss].any()):
            first = int(flags[:n_loss].nonzero()[0, 0])
            bad_step = upto_step - (n_loss - 1 - first) // grad_accum
            raise NonFiniteLossError(
                f"non-finite loss at step {bad_step} (rank {dist.rank}); last good checkpoint: {last_good}. "
                f"Lower optim.base_lr, set optim.clip_grad, or train.on_nonfinite=skip to drop such batches"
            )

    while not done:
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                imgs, _ = next(it)
            except StopIteration:
                break
            data_wait += time.perf_counter() - t0
            # one seed per global micro batch: micro_step x ranks + rank is the same stream with 1 rank x accum 2
            # as with 2 ranks x accum 1, so runs of any shape mask the same samples the same way
            seed = mask_seed(t_cfg.seed, micro_step * dist.world_size + dist.rank)
            loss, _, _ = engine(imgs, mask_seed=seed)
            skip = False
            if t_cfg.on_nonfinite == "skip":
                skip = not bool(torch.isfinite(loss))  # one host sync per micro step: the price of skipping
                if skip:
                    log0(dist, f"skipping a micro batch with non-finite loss at step {step + 1}")
            else:
                flags[n_loss] = ~torch.isfinite(loss.detach())
            if not skip:
                engine.backward(loss)
                loss_sum += loss.detach().float()
            engine.step()
            n_loss += 1
            micro_step += 1
            imgs_seen += imgs.shape[0]
            if micro_step % grad_accum:
                continue
            step += 1
            if bar is not None:
                bar.update(1)
            at_log = step % t_cfg.log_interval == 0 or step == budget
            at_ckpt = (t_cfg.checkpoint_interval and step % t_cfg.checkpoint_interval == 0) or step == budget
            if at_log or at_ckpt:
                check_finite(step)
                elapsed = time.perf_counter() - t_last
                if dist.world_size > 1:  # the loss of the whole batch, not rank 0's share
                    torch.distributed.all_reduce(loss_sum)
                mean_loss = float(loss_sum) / max(1, n_loss * dist.world_size)
                img_s = imgs_seen / elapsed
                gn = engine.get_global_grad_norm()
                rec = {
                    "step": step,
                    "epoch": micro_step / micro_per_epoch,
                    "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(gn) if gn is not None else None,
                    "img_per_s": img_s * dist.world_size,
                    "img_per_s_per_rank": img_s,
                    "tflops": flops_per_img * img_s / 1e12,
                    "mfu": (flops_per_img * img_s / 1e12) / peak if peak else None,
                    "data_wait": data_wait / elapsed,
                    "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
                }
                losses.append(mean_loss)
                line = format_line(rec)
                if bar is not None:
                    bar.write(line)
                logger.log(rec, None if bar is not None else line)
                flags.zero_()
                loss_sum.zero_()
                n_loss = imgs_seen = 0
                data_wait = 0.0
                t_last = time.perf_counter()
            if at_ckpt:
                state = {"step": step, "epoch": loader.epoch, "data": loader.state_dict(),
                         "world_size": dist.world_size, "seed": t_cfg.seed, "micro_step": micro_step,
                         "config": cfg.to_dict()}
                tag = ckpt.save(engine, ckpt_dir, step, state, t_cfg.keep_last, dist.is_main)
                last_good = str(ckpt_dir / tag)
                log0(dist, f"saved checkpoint {last_good}")
            if step >= budget:
                done = True
                break
        if not done:
            loader.set_epoch(loader.epoch if loader.batch_in_epoch == 0 else loader.epoch + 1)
    if bar is not None:
        bar.close()
    logger.close()
    log0(dist, f"done: {step} steps, last loss {losses[-1] if losses else float('nan'):.4f}")
    return {"step": step, "losses": losses, "output_dir": str(out_dir)}


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse_args(argv)
    except ConfigError as e:
        print(f"fastmae: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    try:
        train(cfg, args.ds_config)
    except (ConfigError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"fastmae: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
