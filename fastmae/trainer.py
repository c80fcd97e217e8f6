"""The one training loop of pre-training, fine-tuning and linear probing.

A program supplies a :class:`Task` (its loaders, model, optimizer, the loss of a batch, an end-of-epoch hook);
:class:`Trainer` runs it: distributed start-up (any launcher), the step plan (any world size), DeepSpeed, the
loop and the non-finite policy (agreed across ranks), signals and exit statuses (:mod:`fastmae.errors`). Resume
and saves are :mod:`fastmae.checkpoint_manager`'s, metrics and the progress bar :mod:`fastmae.metrics`'.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint_manager import CheckpointManager, Resume
from .config import Config
from .distributed import DistInfo, group_timeouts, hosts_summary, init_distributed, shutdown_distributed
from .engine import fill_ds_config, load_ds_config, make_engine, set_grad_norm_needed, zero3_bucket_elements
from .errors import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PREEMPTED,
    AgreedError,
    NonFiniteLossError,
    Preempted,
    ResumeError,
    StopSignals,
    expected,
)
from .failfast import FailFast, StepAgreement
from .memory import ZERO3_BUCKET, MemoryEstimate, decide_activation_checkpointing
from .metrics import MetricsLogger, MetricsProcessor
from .nonfinite import NonFinitePolicy
from .optim import StepPlan, build_scheduler, peak_lr, plan_steps
from .parallelize import apply_performance_toggles, resolve_compile
from .precision import Precision
from .seeding import seed_everything, seed_micro_batch
from .task import Task

__all__ = ["EXIT_CONFIG", "EXIT_ERROR", "EXIT_OK", "EXIT_PREEMPTED", "AgreedError", "NonFiniteLossError",
           "ResumeError", "Task", "Trainer", "describe_loader", "seed_micro_batch"]


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
        self.checkpoints: CheckpointManager | None = None
        self.metrics: MetricsProcessor | None = None
        self.nonfinite: NonFinitePolicy | None = None
        self.zero_stage = 0
        self.compile_mode = "off"
        self.reduce_bucket_size = ZERO3_BUCKET
        self.step = self.micro_step = 0
        self.signals = StopSignals()
        self._agree: StepAgreement | None = None
        self.precision = Precision(cfg.train.precision)

    # ------------------------------------------------------------------ program entry
    def run(self) -> int:
        """Train and return the process exit status (:mod:`fastmae.errors`). On a failure of any rank, every
        rank stops within seconds."""
        try:
            self.dist = init_distributed(self.cfg.train.dist_timeout_s)
        except Exception as e:
            print(f"[fastmae] cannot start: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        guard = FailFast(self.dist.rank, self.dist.world_size, hosts=self.dist.hosts).start()
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
            detail = f"{type(e).__name__}: {e}" if expected(e) else traceback.format_exc().rstrip()
            guard.fail(e, detail)
            return EXIT_ERROR
        guard.stop()
        shutdown_distributed()
        return EXIT_OK

    def log0(self, *msg: Any) -> None:
        """A start-up or status line, on rank 0 only."""
        if self.dist is None or self.dist.is_main:
            line = " ".join(["[fastmae]", *map(str, msg)])
            if self.metrics is not None:
                self.metrics.write(line)
            else:
                print(line, flush=True)

    @property
    def logger(self) -> MetricsLogger | None:
        """Where tasks log records of their own (e.g. validation); None before the loop and on other ranks'
        disabled loggers' place."""
        return self.metrics.logger if self.metrics is not None else None

    def _close(self) -> None:
        self.signals.restore()
        for loader in (self.loader, self.val_loader):
            close = getattr(loader, "close", None)
            if close is not None:
                try:
                    close()  # worker processes, DALI threads, the spool of streamed shards
                except Exception:
                    pass
        if self.metrics is not None:
            self.metrics.close()

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        """Train (the process group must exist, see :meth:`run`); returns a summary for tests and scripts."""
        self._start()
        self._loop()
        return self._finish()

    def _start(self) -> None:
        """Process group, loaders, the step plan, the checkpoint to resume from, the engine, the start-up log."""
        cfg, t = self.cfg, self.cfg.train
        if self.dist is None:
            self.dist = init_distributed(t.dist_timeout_s)
        dist = self.dist
        self.signals.install(dist.rank)
        self._agree = StepAgreement(dist.world_size)
        self.nonfinite = NonFinitePolicy(t.on_nonfinite, dist.rank, dist.world_size, self._agree, self.log0)
        seed_everything(t.seed, dist.rank)
        out_dir = Path(t.output_dir)
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(cfg.to_json())
        self.loader, self.val_loader = self.task.build_loaders(self)
        self.plan = plan_steps(t, cfg.optim, cfg.data.batch_size, dist.world_size, len(self.loader))
        # rank 0 chooses the checkpoint, every rank checks it can use it
        self.checkpoints = CheckpointManager(cfg, dist, self.log0)
        found = self.checkpoints.find(self.plan, peak_lr(cfg.optim, self.plan))
        toggles, estimate = self._build_engine(found)
        flops_per_img = self.task.flops_per_image(self)
        self._log_start(toggles, estimate, flops_per_img)
        if found is not None:
            self.step = self.checkpoints.load(found, self.engine, self.scheduler, self.loader, self.task)
        else:
            self.loader.set_epoch(0)
        self.micro_step = self.step * self.plan.grad_accum
        self.metrics = MetricsProcessor(cfg, dist, self.plan, flops_per_img, self.step)

    def _build_engine(self, found: Resume | None) -> tuple[list[str], MemoryEstimate | None]:
        """Model, performance toggles, optimizer, schedule and the DeepSpeed engine (ready to load ``found``)."""
        cfg, t, o = self.cfg, self.cfg.train, self.cfg.optim
        lr = peak_lr(o, self.plan)
        total_steps, warmup_steps = CheckpointManager.schedule(found, self.plan)
        ds_cfg = load_ds_config(self.ds_config_name)
        self.zero_stage = stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        self.reduce_bucket_size = zero3_bucket_elements(ds_cfg)
        model = self.task.build_model(self)
        use_ac, estimate = decide_activation_checkpointing(
            t.activation_checkpointing, self.dist.device, lambda use: self.task.memory_estimate(self, stage, use),
            loader_bytes=int(getattr(self.loader, "gpu_memory_bytes", lambda: 0)()))  # DALI's buffers on the GPU
        self.compile_mode = resolve_compile(t.compile, self.dist.device)
        toggles = apply_performance_toggles(model, use_ac, self.compile_mode, stage, t.compile_backend)
        self.optimizer = self.task.build_optimizer(self, model, lr)
        self.scheduler = build_scheduler(self.optimizer, total_steps, warmup_steps, o.min_lr / lr)
        ds_config = fill_ds_config(ds_cfg, micro_batch=cfg.data.batch_size, grad_accum=self.plan.grad_accum,
                                   world_size=self.dist.world_size, precision=t.precision, clip_grad=o.clip_grad)
        if found is not None:
            ds_config = self.checkpoints.prepare(found, ds_config, stage)
        self.engine = make_engine(model, self.optimizer, ds_config, self.scheduler)
        return toggles, estimate

    def _log_start(self, toggles: list[str], estimate: MemoryEstimate | None, flops_per_img: float) -> None:
        cfg, t, dist, plan = self.cfg, self.cfg.train, self.dist, self.plan
        micro = cfg.data.batch_size
        total_steps, warmup_steps = self.scheduler.fastmae_schedule
        timeouts = sorted(set(group_timeouts()))
        self.log0(f"{self.task.name} | preset {cfg.preset} | {dist.world_size} rank(s) on {dist.device.type} "
                  f"(launcher: {dist.launcher}) | ZeRO stage {self.zero_stage} | precision {t.precision}: "
                  f"{self.precision.describe()}")
        for line in self.task.describe(self):
            self.log0(line)
        self.log0(f"toggles: {', '.join(toggles) or 'none'} | memory estimate per rank: "
                  f"{estimate.describe() if estimate else 'n/a'}")
        if plan.adjusted:
            self.log0(plan.describe_adjustment(micro, dist.world_size))
        self.log0(f"batch: micro {micro} x accum {plan.grad_accum} x ranks {dist.world_size} = "
                  f"{plan.effective_batch} | lr {peak_lr(cfg.optim, plan):.3e} | warmup {warmup_steps} of "
                  f"{total_steps} steps | this run: {plan.budget} steps | {flops_per_img / 1e9:.2f} GFLOP/img (train)")
        self.log0(f"process groups: {len(group_timeouts())}, timeout "
                  f"{'/'.join(f'{x:g}' for x in timeouts) or 'n/a'} s | on_nonfinite={t.on_nonfinite} | "
                  f"trackers: {t.trackers or 'none'}{hosts_summary(dist.hosts)}")

    def _loop(self) -> None:
        """Epochs of micro batches until the run's step budget is spent."""
        self.engine.train()
        done = self.step >= self.plan.budget
        while not done:
            epoch = self.loader.epoch
            it = iter(self.loader)
            while True:
                t0 = time.perf_counter()
                try:
                    imgs, labels = next(it)
                except StopIteration:
                    break
                self.metrics.data_wait += time.perf_counter() - t0
                self._micro_batch(imgs, labels)
                if self.micro_step % self.plan.grad_accum == 0 and self._after_step():
                    done = True
                    break
            if not done:  # a whole epoch ran
                if self.loader.batch_in_epoch != 0:
                    self.loader.set_epoch(epoch + 1)
                if self.task.on_epoch_end(self, epoch + 1, final=False):
                    self.save()

    def _micro_batch(self, imgs: torch.Tensor, labels: torch.Tensor) -> None:
        """Forward, backward and engine step of one micro batch; no host sync (but for the skip policy's)."""
        dist, t, engine = self.dist, self.cfg.train, self.engine
        for hook in self.batch_hooks:
            out = hook(self, imgs, labels)
            if out is not None:
                imgs, labels = out
        # one id per global micro batch: micro_step x ranks + rank is the same stream with 1 rank x
        # accumulation 2 as with 2 ranks x accumulation 1, so runs of any shape draw the same randomness
        micro_id = self.micro_step * dist.world_size + dist.rank
        seed_micro_batch(t.seed, micro_id)
        if self.compile_mode == "cudagraphs":  # the last replay's outputs are consumed: new graph step
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast():
            loss = self.task.loss(self, imgs, labels, micro_id)
        skipped = None
        if self.nonfinite.skips:
            def blank_loss() -> torch.Tensor:
                seed_micro_batch(t.seed, micro_id)
                with self.autocast():
                    return self.task.loss(self, torch.zeros_like(imgs), labels, micro_id)

            loss, skipped = self.nonfinite.skip_if_nonfinite(loss, self.step + 1, blank_loss)
        engine.backward(loss)
        if (self.micro_step + 1) % self.plan.grad_accum == 0:  # this engine.step() updates the weights
            step = self.step + 1  # is its gradient norm logged?
            set_grad_norm_needed(engine, step % t.log_interval == 0 or step == self.plan.budget)
        engine.step()
        self.metrics.add(loss, imgs.shape[0], skipped)
        self.micro_step += 1

    def _after_step(self) -> bool:
        """Log, checkpoint and signals after an optimizer step; True when the run's budget is spent."""
        t, plan = self.cfg.train, self.plan
        self.step += 1
        step = self.step
        self.metrics.step_done()
        at_log = step % t.log_interval == 0 or step == plan.budget
        at_ckpt = bool(t.checkpoint_interval and step % t.checkpoint_interval == 0) or step == plan.budget
        if at_log or at_ckpt:
            self.nonfinite.check(self.metrics.nonfinite, self.metrics.n_loss, plan.grad_accum, step,
                                 self.checkpoints.last_good)
            lr = self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0].get("lr_scale", 1.0)
            self.metrics.flush(step, self.micro_step, self.engine, lr, self.loader, t.on_nonfinite)
        if step >= plan.budget:
            return True
        if at_ckpt:
            self.save()
        if self._agree.post(int(self.signals.received)):
            self._preempt()
        return False

    def _finish(self) -> dict[str, Any]:
        self._agree.drain()
        epoch_done = self.loader.epoch + (1 if self.loader.batch_in_epoch else 0)
        self.task.on_epoch_end(self, epoch_done, final=True)
        if self.cfg.train.checkpoint_at_end:
            self.save()
        losses = self.metrics.losses
        self._close()
        out_dir = self.cfg.train.output_dir
        self.log0(f"done: {self.step} steps, last loss {losses[-1] if losses else float('nan'):.4f} | {out_dir}")
        return {"step": self.step, "losses": losses, "output_dir": str(out_dir), **self.task.summary()}

    # ------------------------------------------------------------------ pieces of the loop
    def autocast(self) -> Any:
        """The forward pass's precision context (:mod:`fastmae.precision`): tasks evaluate under it too."""
        return self.precision.autocast(self.dist.device)

    def save(self) -> None:
        """A checkpoint of this step (collective), unless one was just saved."""
        d = self.dist
        state = {"step": self.step, "epoch": self.loader.epoch, "data": self.loader.state_dict(),
                 "world_size": d.world_size, "zero_stage": self.zero_stage, "seed": self.cfg.train.seed,
                 "micro_step": self.micro_step,
                 "effective_batch": self.plan.effective_batch, "config": self.cfg.to_dict(),
                 "schedule": {"total_steps": self.scheduler.fastmae_schedule[0],
                              "warmup_steps": self.scheduler.fastmae_schedule[1],
                              "lr": peak_lr(self.cfg.optim, self.plan)},
                 "task": self.task.state_dict()}
        self.checkpoints.save(self.engine, self.step, state)

    def _preempt(self) -> None:
        self.save()
        self._agree.drain()
        raise Preempted(f"stopped by a signal at step {self.step}: checkpoint {self.checkpoints.last_good}; "
                        f"train.resume=auto continues from it (exit status {EXIT_PREEMPTED})")


def describe_loader(loader: Any) -> str:
    """A loader's line for the start-up log: its backend and how it reads (``describe()`` where it has one)."""
    describe = getattr(loader, "describe", None)
    return describe() if callable(describe) else str(getattr(loader, "backend", "?"))
