"""Metrics from one place: :class:`MetricsProcessor` gathers a log window's numbers on the device (loss, images,
data wait) and every log interval turns them into one record (throughput, TFLOP/s and MFU from the analytic
FLOPs, peak memory), which :class:`MetricsLogger` prints, appends to ``metrics.jsonl`` and hands to the trackers of
``train.trackers`` (:mod:`fastmae.trackers`); the progress bar lives here too."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from .trackers import Tracker, open_trackers, validate_trackers

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name()
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("L40S", 362.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),  # fp16 tensor cores; V100 has no bf16
]


def peak_tflops(device_name: str | None = None, override: float = 0.0) -> float | None:
    """Peak dense bf16 TFLOP/s of a CUDA card (``override`` wins); None when unknown or on CPU."""
    if override > 0:
        return override
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


class MetricsLogger:
    """One console line + one JSONL record per log interval, plus the trackers of ``train.trackers`` (rank 0 only).

    ``metrics.jsonl`` is always written; ``trackers`` (comma-separated: tensorboard, csv, wandb, mlflow) adds
    experiment trackers, each failing at start with the package to install when its library is missing. The
    default (None) keeps the behaviour of callers that predate tracker selection: TensorBoard when installed,
    JSONL only otherwise. A disabled logger (every rank but 0) validates the names and writes nothing.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, trackers: str | None = None,
                 config: dict[str, Any] | None = None, run_name: str | None = None) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.trackers: list[Tracker] = []
        self._failed: set[str] = set()
        names = validate_trackers("tensorboard" if trackers is None else trackers)
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if trackers is None:
            try:
                self.trackers = open_trackers(names, self.out_dir, config, run_name)
            except Exception:  # tensorboard not installed: JSONL only, as before tracker selection existed
                self.trackers = []
        else:
            self.trackers = open_trackers(names, self.out_dir, config, run_name)

    @property
    def tracker_names(self) -> list[str]:
        """Names of the trackers this logger writes to (empty when disabled)."""
        return [t.name for t in self.trackers]

    def log(self, record: dict[str, Any], line: str | None = None) -> None:
        """Append one record (flat: "step" plus numeric or None values) everywhere; print ``line`` if given.

        A tracker that fails while logging is reported once and skipped for that record, so a dashboard outage
        never stops training; metrics.jsonl still has every record.
        """
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            try:
                tracker.log(record)
            except Exception as e:
                if tracker.name not in self._failed:
                    self._failed.add(tracker.name)
                    print(f"fastmae: tracker {tracker.name} failed to log step {record.get('step')} ({e!r}); "
                          "training continues, metrics.jsonl has every record", file=sys.stderr, flush=True)
        if line is not None:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        """Finish every tracker (W&B run, MLflow run status, TensorBoard files); safe to call twice."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as e:
                print(f"fastmae: tracker {tracker.name} failed to close ({e!r})", file=sys.stderr, flush=True)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_line(rec: dict[str, Any]) -> str:
    """The console line of one log record."""
    parts = [f"step {rec['step']}", f"epoch {rec['epoch']:.2f}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.3e}"]
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.3f}")
    parts.append(f"{rec['img_per_s']:.1f} img/s")
    parts.append(f"{rec['tflops']:.2f} TFLOP/s")
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    parts.append(f"data {100 * rec['data_wait']:.0f}%")
    if rec.get("data_bad_samples"):
        parts.append(f"bad samples {rec['data_bad_samples']}")
    if rec.get("peak_mem_gb") is not None:
        parts.append(f"mem {rec['peak_mem_gb']:.1f} GB")
    return " | ".join(parts)


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 0


class MetricsProcessor:
    """One log window of a training run: :meth:`add` after each micro batch (no host sync), :meth:`flush` at a
    log step (one sync: the window's loss, reduced over the ranks), :meth:`write` for lines above the progress
    bar. Owns the :class:`MetricsLogger` and the bar (rank 0, ``train.progress`` on a terminal)."""

    def __init__(self, cfg: Any, dist: Any, plan: Any, flops_per_img: float, start_step: int) -> None:
        t = cfg.train
        self.dist, self.plan, self.flops_per_img = dist, plan, flops_per_img
        self.peak = peak_tflops(override=t.peak_tflops) if dist.device.type == "cuda" else None
        out_dir = Path(t.output_dir)
        self.logger: MetricsLogger | None = MetricsLogger(out_dir, enabled=dist.is_main, trackers=t.trackers,
                                                          config=cfg.to_dict(), run_name=out_dir.name)
        self.bar = None
        if dist.is_main and t.progress and sys.stdout.isatty():
            from tqdm import tqdm

            sized = _terminal_columns() > 0  # a pty may report a 0 x 0 window (e.g. `script`): assume 100 x 24
            self.bar = tqdm(total=plan.budget, initial=start_step, unit="step", dynamic_ncols=sized,
                            ncols=None if sized else 100, nrows=None if sized else 24)
        dev = dist.device
        self.nonfinite = torch.zeros(t.log_interval * plan.grad_accum, dtype=torch.bool, device=dev)  # per micro
        self.loss_sum = torch.zeros((), device=dev)
        self.losses: list[float] = []  # the mean loss of every window so far
        self._reset()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

    def _reset(self) -> None:
        self.nonfinite.zero_()
        self.loss_sum.zero_()
        self.n_loss = self.imgs_seen = self.skipped = 0
        self.data_wait = 0.0
        self.t_last = time.perf_counter()

    def write(self, line: str) -> None:
        """A line on the console, above the progress bar rather than through it."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def add(self, loss: torch.Tensor, images: int, skipped: int | None = None) -> None:
        """One micro batch's loss (``skipped``: whether train.on_nonfinite=skip replaced it; None: record whether
        it is finite for the stop policy's check)."""
        if skipped is None:
            self.nonfinite[self.n_loss] = ~torch.isfinite(loss.detach())
        else:
            self.skipped += skipped
        self.loss_sum += loss.detach().float()
        self.n_loss += 1
        self.imgs_seen += images

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, micro_step: int, engine: Any, lr: float, loader: Any, on_nonfinite: str) -> None:
        """The window's record: logged, printed, handed to the trackers; the window starts again."""
        d, dev = self.dist, self.dist.device
        elapsed = time.perf_counter() - self.t_last
        if d.world_size > 1:  # the loss of the whole batch, not this rank's share
            tdist.all_reduce(self.loss_sum)
        mean_loss = float(self.loss_sum) / max(1, (self.n_loss - self.skipped) * d.world_size)
        img_s = self.imgs_seen / elapsed
        gn = engine.get_global_grad_norm()
        rec = {
            "step": step, "epoch": micro_step / self.plan.micro_per_epoch, "loss": mean_loss, "lr": lr,
            "grad_norm": float(gn) if gn is not None else None,
            "img_per_s": img_s * d.world_size, "img_per_s_per_rank": img_s,
            "tflops": self.flops_per_img * img_s / 1e12,
            "mfu": (self.flops_per_img * img_s / 1e12) / self.peak if self.peak else None,
            "data_wait": self.data_wait / elapsed,
            "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        }
        if on_nonfinite == "skip":
            rec["skipped"] = self.skipped
        if getattr(loader, "on_error", "stop") == "skip":  # all ranks', since the run began
            bad = torch.tensor(float(len(loader.bad_samples)), device=dev)
            if d.world_size > 1:
                tdist.all_reduce(bad)
            rec["data_bad_samples"] = int(bad)
        self.losses.append(mean_loss)
        line = format_line(rec)
        if self.bar is not None:
            self.bar.write(line)
        if self.logger is not None:
            self.logger.log(rec, None if self.bar is not None else line)
        self._reset()

    def close(self) -> None:
        """The bar and the trackers; safe to call twice."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.logger is not None:
            logger, self.logger = self.logger, None
            try:
                logger.close()
            except Exception:
                pass
