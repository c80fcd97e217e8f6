"""Shared helpers of the benchmark scripts: device description, peak-rate lookup, timers, the optimizer
and counted FLOPs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
CPU_MACHINE = "2-core x86_64 CPU, no GPU"

# dense bf16 tensor-core peaks by device name: one table, the package's (fastmae.metrics)
from fastmae.metrics import PEAK_BF16_TFLOPS  # noqa: E402
from fastmae.precision import Precision  # noqa: E402


def leave_sys_path() -> None:
    """Drop benchmarks/ from ``sys.path`` once the scripts' own modules are imported.

    Running ``python benchmarks/x.py`` puts benchmarks/ first on the path, where any module could pass for an
    installed package of the same name (transformers probes for Hugging Face's ``kernels`` by importing it).
    """
    import sys

    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def lookup_peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """Peak dense bf16 TFLOP/s of a card from its name (or ``override``) and where the number came from."""
    if override:
        return float(override), "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value, f"datasheet dense bf16 ({key})"
    return None, "unknown device: pass --peak-tflops for MFU"


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return dev


def device_name(device: torch.device) -> str:
    """Human name of the device: the CUDA card, or the CPU machine description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{CPU_MACHINE} ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def git_commit() -> str:
    """The repository's HEAD commit (with ``-dirty`` when tracked files changed); ``$FASTMAE_COMMIT`` where
    the copy has no git history (the device machine gets a working tree, not the repository)."""
    if os.environ.get("FASTMAE_COMMIT"):
        return os.environ["FASTMAE_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """Provenance of a measurement: card, versions, commit, date."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    transformers_version = package_version("transformers")
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers_version,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gb"] = round(props.total_memory / 1e9, 2)
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
    return env


def package_version(name: str) -> str | None:
    """Installed version of a distribution without importing it (transformers takes seconds to import)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``step`` for ``repeats`` calls after ``warmup`` untimed ones.

    CUDA: one pair of events around each call, read after a single synchronisation at the end (no host
    sync inside the timed loop). CPU: ``perf_counter`` around each call (CPU work is synchronous).
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def time_once(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``step``, synchronised before and after (the first step: it includes compiling)."""
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's context: for bf16 and fp32 the training programs' own (:mod:`fastmae.precision`:
    bf16 autocast over fp32 weights), so a benchmark step is a training step; fp16 autocast for fp16 (the
    programs run DeepSpeed's fp16 mode there instead)."""
    if dtype == torch.float16:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return Precision(dtype_name(dtype)).autocast(device)


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise SystemExit(f"unknown dtype {name!r}; valid: auto, bf16, fp16, fp32")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def resolve_fused(fused: str, device: torch.device) -> bool:
    """``auto`` -> fused AdamW on CUDA (one multi-tensor kernel), the foreach path on CPU."""
    if fused == "auto":
        return device.type == "cuda"
    return fused == "on"


def make_adamw(model: nn.Module, fused: bool, lr: float = 1.5e-4,
               weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW with the paper's betas (0.9, 0.95); no decay on 1-D parameters. Same for every contender."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **kwargs)


def counted_flops(build: Callable[[], nn.Module], step: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                  batch: int, img_size: int) -> float:
    """Training FLOPs per image counted by ``FlopCounterMode`` over one forward + backward.

    Runs on the ``meta`` device (shapes only, no arithmetic), so any model size is counted in seconds.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
        imgs = torch.randn(batch, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = step(model, imgs)
        loss.backward()
    return counter.get_total_flops() / batch


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Yields a dict whose ``peak_gb`` is filled on exit with the CUDA peak allocation (None on CPU)."""
    out: dict[str, float | None] = {"peak_gb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- gpu_check.sh helpers


def measure_ceilings(device: torch.device, small: bool = False) -> dict[str, Any]:
    """The card's two ceilings, measured once: device-to-device copy bandwidth (bytes read + written)
    and a large bf16 matrix product on random data (fp32 on CPU). Medians over repeats."""
    n_copy = (1 << 22) if small else (1 << 30)  # bytes per buffer: 4 MiB / 1 GiB
    m = 512 if small else 8192
    mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.randn(n_copy // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_times = time_steps(lambda: dst.copy_(src), device, warmup=3, repeats=5 if small else 20)
    a = torch.randn(m, m, device=device, dtype=mm_dtype)
    b = torch.randn(m, m, device=device, dtype=mm_dtype)
    mm_times = time_steps(lambda: a @ b, device, warmup=3, repeats=5 if small else 20)
    t_copy, t_mm = median(copy_times), median(mm_times)
    return {
        "device": device_name(device),
        "copy_bytes": 2 * n_copy,
        "copy_gb_per_s": 2 * n_copy / t_copy / 1e9,
        "matmul_size": m,
        "matmul_dtype": dtype_name(mm_dtype),
        "matmul_tflops": 2 * m**3 / t_mm / 1e12,
        "note": "copy counts bytes read + written; matmul on torch.randn data (never zeros)",
    }


def _load(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except Exception:
        return None


def gpu_check_summary(res: Path) -> str:
    """``summary.md`` of a gpu_check.sh run from the files it left in ``res``."""
    lines = [f"# gpu_check: {res.name}", ""]
    stages = (res / "stages.tsv").read_text().splitlines()[1:] if (res / "stages.tsv").exists() else []
    lines += ["| stage | exit | seconds | note |", "|---|---|---|---|"]
    not_run = []
    for s in stages:
        parts = (s.split("\t") + ["", "", "", ""])[:4]
        lines.append("| " + " | ".join(parts) + " |")
        if parts[3] != "ok":
            not_run.append(f"{parts[0]} ({parts[3]})")
    if not_run:
        lines += ["", "Not run or not passed: " + "; ".join(not_run) + "."]
    env = _load(res / "throughput.json")
    if env:
        e = env["environment"]
        lines += ["", f"Card: {e['device']}; torch {e['torch']} (CUDA {e['cuda']}), triton {e['triton']}, "
                      f"transformers {e['transformers']}; commit {e['commit']}; {e['date_utc']}."]
    ceil = _load(res / "ceilings.json")
    if ceil:
        lines += ["", f"Ceilings: copy {ceil['copy_gb_per_s']:.0f} GB/s (read + write), {ceil['matmul_dtype']} "
                      f"matmul {ceil['matmul_size']}^3 {ceil['matmul_tflops']:.1f} TFLOP/s."]
    chk = _load(res / "correctness.json")
    if chk:
        bad = [c for c in chk["checks"] if c["ok"] is False]
        lines += ["", f"Correctness (throughput.py --check): {'PASSED' if chk['passed'] else 'FAILED'} "
                      f"({sum(c['ok'] is True for c in chk['checks'])} passed, {len(bad)} failed, "
                      f"{sum(c['ok'] is None for c in chk['checks'])} skipped)"]
        lines += [f"- FAIL {c['name']}: {c['detail']}" for c in bad]
    for name in ("throughput", "throughput_ablations", "memory_vit_h"):
        md = res / f"{name}.md"
        if md.exists():
            lines += ["", f"## {name}", "", md.read_text()]
    runs = []
    for stage in ("deepspeed", "zero3_compile"):  # fastmae/train.py through the launcher: its own log lines
        log = res / "logs" / f"{stage}.log"
        if log.exists():
            text = log.read_text().splitlines()
            keep = [ln for ln in text if "toggles:" in ln] + [ln for ln in text if ln.startswith("step ")][-1:]
            runs += [f"- {stage}: " + " / ".join(ln.strip() for ln in keep)] if keep else []
    if runs:
        lines += ["", "## Training runs (fastmae/train.py)", "", *runs]
    kern = res / "kernels.json"
    if kern.exists():
        lines += ["", "## masking_kernel.py", "", f"See [kernels.json](kernels.json) ({kern.stat().st_size} bytes)."]
    if (res / "profile" / "report.md").exists():
        lines += ["", "## Step profile", "", "See [profile/report.md](profile/report.md)."]
    return "\n".join(lines) + "\n"


def deepspeed_available() -> bool:
    """True when deepspeed imports (not merely installed: a wheel that fails to import would turn every
    fastmae row into an error instead of the plain torch step)."""
    from fastmae.distributed import import_deepspeed

    try:
        import_deepspeed()  # without its autotuner's mlflow import, as the training programs import it
    except Exception:
        return False
    return True


def deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, zero_stage: int, micro_batch: int,
                     precision: str) -> Any:
    """The training programs' DeepSpeed engine for ``model`` on this one process: the bundled ``zero2.json``
    with ``zero_stage``, filled as ``fastmae/train.py`` fills it (``fastmae.engine``); starts a world of one
    the first time."""
    import torch.distributed as dist

    from fastmae.distributed import init_distributed
    from fastmae.engine import fill_ds_config, load_ds_config, make_engine

    if not dist.is_initialized():
        init_distributed()
    ds = load_ds_config("zero2.json")
    ds.setdefault("zero_optimization", {})["stage"] = zero_stage
    ds = fill_ds_config(ds, micro_batch=micro_batch, grad_accum=1, world_size=dist.get_world_size(),
                        precision=precision, clip_grad=0.0)
    return make_engine(model, optimizer, ds)
