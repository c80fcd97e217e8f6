"""The one training loop of pre-training, fine-tuning and linear probing.

A program supplies a :class:`Task` (its model, optimizer, the loss of a batch, an end-of-epoch hook);
:class:`Trainer` owns everything else: distributed start-up (any launcher), the step plan (any world size),
DeepSpeed, resume (rank 0 decides; another number of ranks through DeepSpeed's universal checkpoint), the
loop, the non-finite policy (agreed across ranks), metrics and trackers, checkpoints and signals.

Exit status of a training process (``Trainer.run``):

* 0  finished;
* 1  failed: the first error is printed with its rank; every other rank stops within seconds;
* 2  the command line or config is wrong (nothing started);
* 75 stopped by SIGTERM or SIGUSR1 after saving a checkpoint at the next step boundary (all ranks
  together); ``train.resume=auto`` continues from it.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .config import SCHEDULE_KEYS, Config, ConfigError
from .memory import ZERO3_BUCKET, MemoryEstimate
from .metrics import MetricsLogger, format_line, peak_tflops
from .optim import StepPlan, build_scheduler, peak_lr, plan_steps
from .parallelize import apply_performance_toggles, resolve_compile
from .precision import Precision
from .runtime import (
    DistInfo,
    FailFast,
    StepAgreement,
    fill_ds_config,
    group_timeouts,
    init_distributed,
    load_ds_config,
    make_engine,
    seed_everything,
    set_grad_norm_needed,
    shutdown_distributed,
    zero3_bucket_elements,
)

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_PREEMPTED = 0, 1, 2, 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class AgreedError(RuntimeError):
    """An error every rank raises at the same point with the same message (so no rank has to be stopped)."""


class NonFiniteLossError(AgreedError):
    """The loss became NaN or inf on some rank (train.on_nonfinite=stop)."""


class ResumeError(AgreedError):
    """The checkpoint to resume from is unusable here, or resuming would silently change the schedule."""


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was saved at the step boundary that followed."""


# user-facing errors are printed as one line; anything else with its traceback
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ConfigError, AgreedError, FileNotFoundError, ImportError)


def _expected(err: BaseException) -> bool:
    from .data import ShardError

    return isinstance(err, (*EXPECTED_ERRORS, ShardError))


class Task:
    """What a program supplies to :class:`Trainer`; the defaults suit a model whose forward gives the loss."""

    name = "training"
    # config sections/keys this program does not use -> why (an override of one is refused at start)
    ignored: dict[str, str] = {}

    def setup(self, tr: Trainer) -> None:
        """Build ``tr.loader`` (and ``tr.val_loader``) for this rank."""
        raise NotImplementedError

    def build_model(self, tr: Trainer) -> nn.Module:
        raise NotImplementedError

    def memory_estimate(self, tr: Trainer, zero_stage: int, activation_checkpointing: bool) -> MemoryEstimate | None:
        """Analytic per-rank memory (decides ``train.activation_checkpointing=auto``); None = unknown."""
        return None

    def build_optimizer(self, tr: Trainer, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def loss(self, tr: Trainer, imgs: torch.Tensor, labels: torch.Tensor, micro_id: int) -> torch.Tensor:
        """The scalar loss of one micro batch through ``tr.engine`` (``micro_id``: the global micro batch)."""
        raise NotImplementedError

    def flops_per_image(self, tr: Trainer) -> float:
        """Training FLOPs per image (forward + backward) for TFLOP/s and MFU."""
        return 0.0

    def describe(self, tr: Trainer) -> list[str]:
        """Extra start-up lines."""
        return []

    def on_epoch_end(self, tr: Trainer, epoch_done: int, final: bool) -> bool:
        """After a whole epoch (``final``: after the run's last step). True = save a checkpoint now."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Program state that goes into every checkpoint (e.g. best accuracy)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}


def seed_micro_batch(seed: int, micro_id: int) -> None:
    """Seed python, numpy and torch for one global micro batch: every random choice inside a step (drop path,
    mixup, erasing) is then a function of (seed, micro batch), so a resumed run makes the same ones."""
    s = (seed * 0x9E3779B1 + micro_id * 0x632BE5AB + 0x5851F42D) % 2**63
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class Trainer:
    """Runs a :class:`Task` with the config ``cfg`` under DeepSpeed (``ds_config``: bundled name or path).

    ``batch_hooks`` are called with (trainer, imgs, labels) before each micro batch's step and may return
    replacement (imgs, labels): an extension point for instrumentation.
    """

    def __init__(self, cfg: Config, task: Task, ds_config: str = "zero2.json") -> None:
        self.cfg, self.task, self.ds_config_name = cfg, task, ds_config
        self.batch_hooks: list[Callable[..., Any]] = []
        self.dist: DistInfo | None = None
        self.loader: Any = None
        self.val_loader: Any = None
        self.engine: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.plan: StepPlan | None = None
        self.zero_stage = 0
        self.compile_mode = "off"
        self.reduce_bucket_size = ZERO3_BUCKET
        self.step = 0
        self.logger: MetricsLogger | None = None
        self._signal: int | None = None
        self._agree: StepAgreement | None = None
        self._last_saved = -1
        self.precision = Precision(cfg.train.precision)

    # ------------------------------------------------------------------ program entry
    def run(self) -> int:
        """Train and return the process exit status (see the module docstring). On a failure of any rank,
        every rank stops within seconds."""
        try:
            self.dist = init_distributed(self.cfg.train.dist_timeout_s)
        except Exception as e:
            print(f"[fastmae] cannot start: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        guard = FailFast(self.dist.rank, self.dist.world_size).start()
        try:
            self.fit()
        except Preempted as p:
            guard.stop()
            self._close()
            self.log0(str(p))
            shutdown_distributed()
            return EXIT_PREEMPTED
        except AgreedError as e:
            guard.stop()
            self._close()
            if self.dist.is_main:
                print(f"[fastmae] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            shutdown_distributed()
            return EXIT_ERROR
        except BaseException as e:  # noqa: BLE001 - any failure ends the whole job
            self._close()
            detail = f"{type(e).__name__}: {e}" if _expected(e) else traceback.format_exc().rstrip()
            guard.fail(e, detail)
            return EXIT_ERROR
        guard.stop()
        shutdown_distributed()
        return EXIT_OK

    def log0(self, *msg: Any) -> None:
        if self.dist is None or self.dist.is_main:
            bar = getattr(self, "_bar", None)
            if bar is not None:  # above the progress bar, not through it
                bar.write(" ".join(["[fastmae]", *map(str, msg)]))
            else:
                print("[fastmae]", *msg, flush=True)

    def _close(self) -> None:
        self._restore_signals()
        for loader in (self.loader, self.val_loader):
            close = getattr(loader, "close", None)
            if close is not None:
                try:
                    close()  # worker processes, DALI threads, the spool of streamed shards
                except Exception:
                    pass
        if self.logger is not None:
            try:
                self.logger.close()
            except Exception:
                pass
            self.logger = None

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._signal is None:
            self._signal = signum
            name = signal.Signals(signum).name
            print(f"[fastmae] rank {self.dist.rank if self.dist else 0}: {name}: saving a checkpoint at the next "
                  f"step boundary, then exiting with status {EXIT_PREEMPTED}", file=sys.stderr, flush=True)

    def _install_signals(self) -> None:
        self._saved_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _restore_signals(self) -> None:
        for s, h in getattr(self, "_saved_handlers", {}).items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError):
                pass
        self._saved_handlers = {}

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        """Train (the process group must exist, see :meth:`run`); returns a summary for tests and scripts."""
        import torch.distributed as tdist

        cfg, t, o, task = self.cfg, self.cfg.train, self.cfg.optim, self.task
        if self.dist is None:
            self.dist = init_distributed(t.dist_timeout_s)
        dist = self.dist
        self._install_signals()
        self._agree = StepAgreement(dist.world_size)
        seed_everything(t.seed, dist.rank)
        out_dir = Path(t.output_dir)
        ckpt_dir = out_dir / "checkpoints"
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(cfg.to_json())

        # ---- data and the step plan
        task.setup(self)
        micro = cfg.data.batch_size
        plan = self.plan = plan_steps(t, o, micro, dist.world_size, len(self.loader))
        lr = peak_lr(o, plan)

        # ---- resume: rank 0 chooses, every rank checks it can use it
        found, state = self._choose_resume(ckpt_dir)
        total_steps, warmup_steps = plan.total_steps, plan.warmup_steps
        changed: list[str] = []
        if state is not None:
            changed = self._check_schedule(state, plan, lr)
            sched = state.get("schedule") or {}
            if not changed and sched:  # the schedule continues exactly as it was laid out
                total_steps, warmup_steps = int(sched["total_steps"]), int(sched["warmup_steps"])

        # ---- model, toggles, optimizer, engine
        ds_cfg = load_ds_config(self.ds_config_name)
        self.zero_stage = stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        self.reduce_bucket_size = zero3_bucket_elements(ds_cfg)
        model = task.build_model(self)
        use_ac, estimate = self._decide_activation_checkpointing(stage)
        self.compile_mode = resolve_compile(t.compile, dist.device)
        toggles = apply_performance_toggles(model, use_ac, self.compile_mode, stage, t.compile_backend)
        self.optimizer = task.build_optimizer(self, model, lr)
        self.scheduler = build_scheduler(self.optimizer, total_steps, warmup_steps, o.min_lr / lr)
        ds_config = fill_ds_config(ds_cfg, micro_batch=micro, grad_accum=plan.grad_accum,
                                   world_size=dist.world_size, precision=t.precision, clip_grad=o.clip_grad)
        load_tag = None
        if found is not None:
            load_tag, ds_config = self._prepare_load(found, state, ds_config, stage)
        engine = self.engine = make_engine(model, self.optimizer, ds_config, self.scheduler)

        # ---- start-up log
        flops_per_img = task.flops_per_image(self)
        peak = peak_tflops(override=t.peak_tflops) if dist.device.type == "cuda" else None
        timeouts = sorted(set(group_timeouts()))
        self.log0(f"{task.name} | preset {cfg.preset} | {dist.world_size} rank(s) on {dist.device.type} "
                  f"(launcher: {dist.launcher}) | ZeRO stage {stage} | precision {t.precision}: "
                  f"{self.precision.describe()}")
        for line in task.describe(self):
            self.log0(line)
        self.log0(f"toggles: {', '.join(toggles) or 'none'} | memory estimate per rank: "
                  f"{estimate.describe() if estimate else 'n/a'}")
        if plan.adjusted:
            self.log0(plan.describe_adjustment(micro, dist.world_size))
        self.log0(f"batch: micro {micro} x accum {plan.grad_accum} x ranks {dist.world_size} = "
                  f"{plan.effective_batch} | lr {lr:.3e} | warmup {warmup_steps} of {total_steps} steps | "
                  f"this run: {plan.budget} steps | {flops_per_img / 1e9:.2f} GFLOP/img (train)")
        self.log0(f"process groups: {len(group_timeouts())}, timeout "
                  f"{'/'.join(f'{x:g}' for x in timeouts) or 'n/a'} s | on_nonfinite={t.on_nonfinite} | "
                  f"trackers: {t.trackers or 'none'}")

        # ---- resume
        step = 0
        if found is not None:
            settings = _group_settings(engine.optimizer)
            base_lrs = list(self.scheduler.base_lrs)
            path, _ = engine.load_checkpoint(str(found[0]), tag=load_tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise ResumeError(f"DeepSpeed could not load the checkpoint {found[0] / load_tag}")
            self.scheduler.base_lrs = base_lrs  # the peak lr is the config's (an allowed lr change applies)
            _restore_group_settings(engine.optimizer, settings, self.scheduler)
            step = int(state["step"])
            self.loader.load_state_dict(state["data"])
            task.load_state_dict(state.get("task", {}))
            how = "" if state["world_size"] == dist.world_size else \
                f" (written by {state['world_size']} rank(s), resharded through a universal checkpoint)"
            self.log0(f"resumed from {found[0] / found[1]} at step {step}{how} (epoch {self.loader.epoch}, "
                      f"{getattr(self.loader, 'samples_in_epoch', '?')} samples of it done)")
            if changed:
                self.log0(f"resumed with changed schedule settings: {'; '.join(changed)}")
        else:
            self.loader.set_epoch(0)
        self.step = step
        self._last_saved = step if found is not None else -1

        self.logger = MetricsLogger(out_dir, enabled=dist.is_main, trackers=t.trackers, config=cfg.to_dict(),
                                    run_name=out_dir.name)
        bar = None
        if dist.is_main and t.progress and sys.stdout.isatty():
            from tqdm import tqdm

            sized = _terminal_columns() > 0  # a pty may report a 0 x 0 window (e.g. `script`): assume 100 x 24
            bar = tqdm(total=plan.budget, initial=step, unit="step", dynamic_ncols=sized,
                       ncols=None if sized else 100, nrows=None if sized else 24)
        self._bar = bar

        # ---- the loop
        dev = dist.device
        accum = plan.grad_accum
        flags = torch.zeros(t.log_interval * accum, dtype=torch.bool, device=dev)  # non-finite per micro batch
        loss_sum = torch.zeros((), device=dev)
        n_loss = imgs_seen = skipped = 0
        data_wait = 0.0
        t_last = time.perf_counter()
        tag = ckpt.latest_complete(ckpt_dir) if dist.is_main else None
        self._last_good = str(ckpt_dir / tag) if tag else "none"
        losses: list[float] = []
        micro_step = step * accum
        done = step >= plan.budget
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        engine.train()

        while not done:
            epoch = self.loader.epoch
            it = iter(self.loader)
            while True:
                t0 = time.perf_counter()
                try:
                    imgs, labels = next(it)
                except StopIteration:
                    break
                data_wait += time.perf_counter() - t0
                for hook in self.batch_hooks:
                    out = hook(self, imgs, labels)
                    if out is not None:
                        imgs, labels = out
                # one id per global micro batch: micro_step x ranks + rank is the same stream with 1 rank x
                # accumulation 2 as with 2 ranks x accumulation 1, so runs of any shape draw the same randomness
                micro_id = micro_step * dist.world_size + dist.rank
                seed_micro_batch(t.seed, micro_id)
                if self.compile_mode == "cudagraphs":  # the last replay's outputs are consumed: new graph step
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast():
                    loss = task.loss(self, imgs, labels, micro_id)
                if t.on_nonfinite == "skip":
                    loss, was_skipped = self._skip_if_nonfinite(loss, imgs, labels, micro_id, step + 1)
                    skipped += was_skipped
                else:
                    flags[n_loss] = ~torch.isfinite(loss.detach())
                engine.backward(loss)
                if (micro_step + 1) % accum == 0:  # this engine.step() updates the weights: the norm is logged?
                    set_grad_norm_needed(engine, (step + 1) % t.log_interval == 0 or step + 1 == plan.budget)
                engine.step()
                loss_sum += loss.detach().float()
                n_loss += 1
                micro_step += 1
                imgs_seen += imgs.shape[0]
                if micro_step % accum:
                    continue
                step += 1
                self.step = step
                if bar is not None:
                    bar.update(1)
                at_log = step % t.log_interval == 0 or step == plan.budget
                at_ckpt = bool(t.checkpoint_interval and step % t.checkpoint_interval == 0) or step == plan.budget
                if at_log or at_ckpt:
                    self._check_finite(flags, n_loss, accum, step)
                    elapsed = time.perf_counter() - t_last
                    if dist.world_size > 1:  # the loss of the whole batch, not this rank's share
                        tdist.all_reduce(loss_sum)
                    mean_loss = float(loss_sum) / max(1, (n_loss - skipped) * dist.world_size)
                    img_s = imgs_seen / elapsed
                    gn = engine.get_global_grad_norm()
                    rec = {
                        "step": step, "epoch": micro_step / plan.micro_per_epoch, "loss": mean_loss,
                        "lr": self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0].get("lr_scale", 1.0),
                        "grad_norm": float(gn) if gn is not None else None,
                        "img_per_s": img_s * dist.world_size, "img_per_s_per_rank": img_s,
                        "tflops": flops_per_img * img_s / 1e12,
                        "mfu": (flops_per_img * img_s / 1e12) / peak if peak else None,
                        "data_wait": data_wait / elapsed,
                        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
                    }
                    if t.on_nonfinite == "skip":
                        rec["skipped"] = skipped
                    if getattr(self.loader, "on_error", "stop") == "skip":  # all ranks', since the run began
                        bad = torch.tensor(float(len(self.loader.bad_samples)), device=dev)
                        if dist.world_size > 1:
                            tdist.all_reduce(bad)
                        rec["data_bad_samples"] = int(bad)
                    losses.append(mean_loss)
                    line = format_line(rec)
                    if bar is not None:
                        bar.write(line)
                    self.logger.log(rec, None if bar is not None else line)
                    flags.zero_()
                    loss_sum.zero_()
                    n_loss = imgs_seen = skipped = 0
                    data_wait = 0.0
                    t_last = time.perf_counter()
                if step >= plan.budget:
                    done = True
                    break
                if at_ckpt:
                    self.save(ckpt_dir, micro_step)
                if self._agree.post(1 if self._signal is not None else 0):
                    self._preempt(ckpt_dir, micro_step)
            if not done:  # a whole epoch ran
                if self.loader.batch_in_epoch != 0:
                    self.loader.set_epoch(epoch + 1)
                if task.on_epoch_end(self, epoch + 1, final=False):
                    self.save(ckpt_dir, micro_step)
        self._agree.drain()
        epoch_done = self.loader.epoch + (1 if self.loader.batch_in_epoch else 0)
        task.on_epoch_end(self, epoch_done, final=True)
        if t.checkpoint_at_end:
            self.save(ckpt_dir, micro_step)
        if bar is not None:
            bar.close()
            self._bar = None
        self._close()
        self.log0(f"done: {step} steps, last loss {losses[-1] if losses else float('nan'):.4f} | {out_dir}")
        return {"step": step, "losses": losses, "output_dir": str(out_dir), **task.summary()}

    # ------------------------------------------------------------------ pieces of the loop
    def autocast(self) -> Any:
        """The forward pass's precision context (:mod:`fastmae.precision`): tasks evaluate under it too."""
        return self.precision.autocast(self.dist.device)

    def _skip_if_nonfinite(self, loss: torch.Tensor, imgs: torch.Tensor, labels: torch.Tensor, micro_id: int,
                           step: int) -> tuple[torch.Tensor, int]:
        """train.on_nonfinite=skip: when any rank's loss is not finite, every rank replaces this micro batch by
        one that contributes a zero gradient (the loss of a blank batch times 0), so the engine's accumulation
        and gradient reductions stay the same on all ranks. One host sync per micro batch."""
        bad = 0.0 if bool(torch.isfinite(loss.detach())) else float(self.dist.rank + 1)
        worst = int(self._agree.now([bad])[0])
        if not worst:
            return loss, 0
        self.log0(f"skipping a micro batch with non-finite loss at step {step} (rank {worst - 1})")
        seed_micro_batch(self.cfg.train.seed, micro_id)
        with self.autocast():
            blank = self.task.loss(self, torch.zeros_like(imgs), labels, micro_id) * 0.0
        if not bool(torch.isfinite(blank.detach())):
            raise FloatingPointError(f"step {step}: even a blank batch gives a non-finite loss (the weights are "
                                     "no longer finite); cannot skip")
        return blank, 1

    def _check_finite(self, flags: torch.Tensor, n: int, accum: int, step: int) -> None:
        """train.on_nonfinite=stop: every rank learns the first step (and rank) with a non-finite loss since
        the last check and stops there together."""
        if self.cfg.train.on_nonfinite != "stop":
            return
        first = math.inf
        if n and bool(flags[:n].any()):
            i = int(flags[:n].nonzero()[0, 0])
            first = float((step - (n - 1 - i) // accum) * self.dist.world_size + self.dist.rank)
        agreed = self._agree.now([first], op="min")[0]
        if math.isfinite(agreed):
            bad_step, rank = divmod(int(agreed), self.dist.world_size)
            raise NonFiniteLossError(
                f"non-finite loss at step {bad_step} (rank {rank}); last good checkpoint: {self._last_good}. "
                "Lower optim.base_lr, set optim.clip_grad, or train.on_nonfinite=skip to drop such batches")

    def save(self, ckpt_dir: Path, micro_step: int) -> None:
        """A checkpoint of this step (collective), unless one was just saved."""
        if self._last_saved == self.step:
            return
        d = self.dist
        state = {"step": self.step, "epoch": self.loader.epoch, "data": self.loader.state_dict(),
                 "world_size": d.world_size, "zero_stage": self.zero_stage, "seed": self.cfg.train.seed,
                 "micro_step": micro_step,
                 "effective_batch": self.plan.effective_batch, "config": self.cfg.to_dict(),
                 "schedule": {"total_steps": self.scheduler.fastmae_schedule[0],
                              "warmup_steps": self.scheduler.fastmae_schedule[1],
                              "lr": peak_lr(self.cfg.optim, self.plan)},
                 "task": self.task.state_dict()}
        tag = ckpt.save(self.engine, ckpt_dir, self.step, state, self.cfg.train.keep_last, d.is_main)
        self._last_saved = self.step
        self._last_good = str(ckpt_dir / tag)
        self.log0(f"saved checkpoint {self._last_good}")

    def _preempt(self, ckpt_dir: Path, micro_step: int) -> None:
        self.save(ckpt_dir, micro_step)
        self._agree.drain()
        raise Preempted(f"stopped by a signal at step {self.step}: checkpoint {self._last_good}; "
                        f"train.resume=auto continues from it (exit status {EXIT_PREEMPTED})")

    def _decide_activation_checkpointing(self, zero_stage: int) -> tuple[bool, MemoryEstimate | None]:
        """``train.activation_checkpointing``: on / off, or auto = on only when the task's analytic estimate
        without it exceeds 90% of this GPU's memory."""
        mode, dev = self.cfg.train.activation_checkpointing, self.dist.device
        loader = int(getattr(self.loader, "gpu_memory_bytes", lambda: 0)())  # DALI's buffers on the GPU

        def estimate(use: bool) -> MemoryEstimate | None:
            est = self.task.memory_estimate(self, zero_stage, use)
            return None if est is None else dataclasses.replace(est, loader=loader)

        if mode == "auto":
            use = False
            est = estimate(False)
            if dev.type == "cuda" and est is not None:
                use = est.total > 0.9 * torch.cuda.get_device_properties(dev).total_memory
        else:
            use = mode == "on"
        return use, estimate(use)

    # ------------------------------------------------------------------ resume
    def _choose_resume(self, ckpt_dir: Path) -> tuple[tuple[Path, str] | None, dict[str, Any] | None]:
        """Rank 0 picks the checkpoint (train.resume) and tells the others; every rank must be able to read
        it (checkpoints live on a filesystem all nodes share), else every rank stops with one error."""
        import torch.distributed as tdist

        d = self.dist
        choice: list[Any] = [None, None]
        if d.is_main:
            try:
                choice[0] = ckpt.find_resume(self.cfg.train.resume, ckpt_dir)
            except FileNotFoundError as e:
                choice[1] = str(e)
        if d.world_size > 1:
            tdist.broadcast_object_list(choice, src=0)
        found, err = choice
        if err:
            raise ResumeError(err)
        if found is None:
            return None, None
        found = (Path(found[0]), str(found[1]))
        try:
            state: dict[str, Any] | None = ckpt.read_state(*found)
        except (OSError, ValueError):
            state = None
        self._all_ok(state is not None, f"cannot read {found[0] / found[1] / ckpt.STATE_FILE}: checkpoints need "
                                        "a filesystem that every node shares (train.output_dir)")
        return found, state

    def _all_ok(self, ok: bool, problem: str) -> None:
        """Raise the same :class:`ResumeError` on every rank when ``ok`` is false on any, naming those ranks."""
        import torch.distributed as tdist

        d = self.dist
        oks: list[Any] = [ok]
        if d.world_size > 1:
            oks = [None] * d.world_size
            tdist.all_gather_object(oks, ok)
        bad = [r for r, v in enumerate(oks) if not v]
        if bad:
            raise ResumeError(f"rank(s) {', '.join(map(str, bad))}: {problem}")

    def _check_schedule(self, state: dict[str, Any], plan: StepPlan, lr: float) -> list[str]:
        """The schedule settings that differ from the checkpoint's; refused unless train.resume_allow_changes
        names them. Returns the allowed changes (for the log)."""
        saved = state.get("config") or {}
        now = self.cfg.to_dict()
        diffs: dict[str, tuple[Any, Any]] = {}
        for key in SCHEDULE_KEYS:
            section, name = key.split(".")
            if key == "train.batch_size":  # what matters is the effective batch actually used
                old = state.get("effective_batch", (saved.get("train") or {}).get("batch_size"))
                new = plan.effective_batch
            else:
                old, new = (saved.get(section) or {}).get(name), now[section][name]
            if old is not None and old != new:
                diffs[key] = (old, new)
        allowed = {k.strip() for k in self.cfg.train.resume_allow_changes.split(",") if k.strip()}
        refused = [k for k in diffs if k not in allowed]
        if refused:
            what = "; ".join(f"{k}: checkpoint {diffs[k][0]!r}, now {diffs[k][1]!r}" for k in refused)
            hint = ""
            if "train.batch_size" in refused:
                hint = (" (the effective batch is micro batch x accumulation x ranks: with "
                        f"{self.dist.world_size} rank(s) and data.batch_size={self.cfg.data.batch_size} set "
                        f"train.batch_size={diffs['train.batch_size'][0]} to keep it, if reachable)")
            raise ResumeError(f"resuming would change the schedule: {what}{hint}. Resume with the checkpoint's "
                              f"settings, or allow the change: train.resume_allow_changes={','.join(refused)}")
        return [f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in diffs]

    def _prepare_load(self, found: tuple[Path, str], state: dict[str, Any], ds_config: dict[str, Any],
                      stage: int) -> tuple[str, dict[str, Any]]:
        """The tag DeepSpeed loads and the config it loads with: the checkpoint itself when the number of ranks
        is the same (each rank checks its shard is there), else its universal conversion (made once, by
        rank 0)."""
        import torch.distributed as tdist

        d = self.dist
        ckpt_dir, tag = found
        folder = ckpt_dir / tag
        saved_stage = state.get("zero_stage", stage)
        if 0 in (saved_stage, stage) and saved_stage != stage:
            raise ResumeError(f"{folder} was written with ZeRO stage {saved_stage}, this run uses stage {stage}: "
                              f"resume it with the same stage (--ds_config zero{saved_stage}.json)")
        if saved_stage == 0 and int(state["world_size"]) != d.world_size:
            raise ResumeError(f"{folder} was written with ZeRO stage 0 by {state['world_size']} rank(s); DeepSpeed "
                              "reshards only ZeRO 1-3 checkpoints: resume it on the same number of ranks (runs "
                              "that may move to another number of ranks use zero1/zero2/zero3.json)")
        if int(state["world_size"]) == d.world_size:
            missing = [p for p in _shard_files(folder, d.rank, stage) if not glob.glob(str(folder / p))]
            self._all_ok(not missing, f"missing checkpoint shard(s) in {folder} ({', '.join(missing)}): the "
                                      "checkpoint is incomplete or not on a filesystem shared by all nodes")
            return tag, ds_config
        from .checkpoint_universal import to_universal, universal_config

        self.log0(f"checkpoint {folder} was written by {state['world_size']} rank(s), this run has "
                  f"{d.world_size}: converting it to a universal checkpoint (once)")
        err = None
        uni_tag = None
        if d.is_main:
            try:
                uni_tag = to_universal(ckpt_dir, tag)
            except Exception as e:  # reported on every rank below
                err = f"{type(e).__name__}: {e}"
        box: list[Any] = [uni_tag, err]
        if d.world_size > 1:
            tdist.broadcast_object_list(box, src=0)
        uni_tag, err = box
        if err:
            raise ResumeError(f"cannot reshard {folder} for {d.world_size} rank(s): {err}")
        self._all_ok((ckpt_dir / uni_tag).is_dir(), f"cannot see {ckpt_dir / uni_tag}: checkpoints need a "
                                                    "filesystem that every node shares")
        return uni_tag, universal_config(ds_config)


def _terminal_columns() -> int:
    import os

    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 0


def _group_settings(optimizer: Any) -> list[dict[str, Any]]:
    """Each parameter group's hyper-parameters (weight decay, lr scale, betas, ...) as this run built them."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]


def _restore_group_settings(optimizer: Any, settings: list[dict[str, Any]], scheduler: Any) -> None:
    """Put back the groups' hyper-parameters after a load, and each group's lr from the restored schedule.

    They come from the config, not from training, and a ZeRO-3 universal load copies the first group's
    settings into every group (the weight-decay group would lose its decay, layer-wise lr scales would
    collapse); for the other loads this changes nothing."""
    groups = optimizer.param_groups
    if len(groups) != len(settings):
        raise ResumeError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run {len(settings)}")
    for g, saved in zip(groups, settings, strict=True):
        g.update(saved)
    if scheduler is not None and hasattr(scheduler, "lr_lambdas"):
        for g, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            g["lr"] = base * fn(scheduler.last_epoch)


def _shard_files(folder: Path, rank: int, stage: int) -> list[str]:
    """Glob patterns of the files rank ``rank`` loads from a DeepSpeed checkpoint folder."""
    if stage == 0:
        return ["mp_rank_00_model_states.pt"]
    model = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    return [model, f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]


def describe_loader(loader: Any) -> str:
    """A loader's line for the start-up log: its backend and how it reads (``describe()`` where it has one)."""
    describe = getattr(loader, "describe", None)
    return describe() if callable(describe) else str(getattr(loader, "backend", "?"))
