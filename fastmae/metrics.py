"""Metrics from one place: throughput, TFLOP/s and MFU from the analytic FLOPs, peak memory, data wait.

Every log interval the training program hands the accumulated numbers to :class:`MetricsLogger`, which
prints one line, appends one JSONL record and feeds the experiment trackers of ``train.trackers``
(TensorBoard, CSV, Weights & Biases, MLflow; see :mod:`fastmae.trackers`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

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
