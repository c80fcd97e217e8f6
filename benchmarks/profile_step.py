"""Profile of one MAE training step for both encoder variants: where the encoder-skip speedup comes from.
Writes ``report.md`` (time split, top kernels), ``split.png`` / ``split.json`` and Chrome traces to ``--out``:
``python benchmarks/profile_step.py --preset debug --out DIR``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from fastmae.data import SyntheticLoader  # noqa: E402
from throughput import masking_kernel_available  # noqa: E402

import fastmae  # noqa: E402
from fastmae.config import get_preset  # noqa: E402
from fastmae.parallelize import apply_performance_toggles  # noqa: E402

VARIANTS = (("without_m", "w/o [M] (fastmae)", False), ("with_m", "w/ [M] (paper baseline)", True))
# phase -> (start marker, end marker)
PHASES = {
    "data": ("start", "data"),
    "masking": ("mask_start", "mask_end"),
    "encoder_fwd": ("data", "encoder"),  # minus masking, below
    "decoder_fwd": ("encoder", "decoder"),
    "loss_fwd": ("decoder", "loss"),
    "decoder_bwd": ("loss", "latent_grad"),  # loss backward + decoder backward
    "encoder_bwd": ("latent_grad", "backward"),  # incl. the masking gather's backward
    "optimizer": ("backward", "optimizer"),
}
GROUPS = {
    "data wait": ("data",),
    "masking": ("masking",),
    "encoder": ("encoder_fwd", "encoder_bwd"),
    "decoder": ("decoder_fwd", "decoder_bwd"),
    "loss": ("loss_fwd",),
    "optimizer": ("optimizer",),
}


class Markers:
    """Named time stamps within a step: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.stamps[name] = ev
        else:
            self.stamps[name] = time.perf_counter()

    def ms(self, a: str, b: str) -> float:
        if self.device.type == "cuda":
            return float(self.stamps[a].elapsed_time(self.stamps[b]))
        return (self.stamps[b] - self.stamps[a]) * 1e3


def instrument_masking(model: nn.Module, markers: list[Markers]) -> None:
    """Wrap this model instance's ``random_masking`` in a profiler range and two markers."""
    inner = model.random_masking

    def random_masking(*args: Any, **kwargs: Any) -> Any:
        markers[0].mark("mask_start")
        with record_function("fastmae/masking"):
            out = inner(*args, **kwargs)
        markers[0].mark("mask_end")
        return out

    model.random_masking = random_masking  # type: ignore[method-assign]


def make_step(model: nn.Module, opt: torch.optim.Optimizer, batches: Any, device: torch.device,
              dtype: torch.dtype, ratio: float, markers: list[Markers]) -> Callable[[], None]:
    """One training step with a marker after each phase (``markers[0]`` is swapped per step)."""

    def step() -> None:
        m = markers[0]
        m.mark("start")
        with record_function("fastmae/data_wait"):
            imgs, _ = next(batches)
        m.mark("data")
        with common.autocast(device, dtype):
            with record_function("fastmae/encoder"):
                latent, mask, ids_restore = model.encode(imgs, ratio)
            m.mark("encoder")
            with record_function("fastmae/decoder"):
                pred = model.decode(latent, ids_restore)
            m.mark("decoder")
            with record_function("fastmae/loss"):
                loss = model.loss(imgs, pred, mask)
            m.mark("loss")
        latent.register_hook(lambda g: m.mark("latent_grad"))
        with record_function("fastmae/backward"):
            loss.backward()
        m.mark("backward")
        with record_function("fastmae/optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        m.mark("optimizer")

    return step


def endless(loader: SyntheticLoader) -> Any:
    while True:
        yield from loader


def phases_of(m: Markers) -> dict[str, float]:
    """Milliseconds per phase of one step."""
    out = {k: m.ms(a, b) for k, (a, b) in PHASES.items()}
    out["encoder_fwd"] -= out["masking"]
    out["total"] = m.ms("start", "optimizer")
    return out


def fastest_split(markers: list[Markers]) -> dict[str, float]:
    """The phases of the fastest step (steadier than medians on a loaded, shared CPU)."""
    return min((phases_of(m) for m in markers), key=lambda p: p["total"])


def split_of(markers: list[Markers]) -> dict[str, float]:
    """Median milliseconds per phase over the steps' markers."""
    per: dict[str, list[float]] = {k: [] for k in PHASES}
    per["total"] = []
    for m in markers:
        for k, (a, b) in PHASES.items():
            per[k].append(m.ms(a, b))
        per["encoder_fwd"][-1] -= per["masking"][-1]
        per["total"].append(m.ms("start", "optimizer"))
    return {k: common.median(v) for k, v in per.items()}


def top_ops(prof: Any, device: torch.device, n: int = 15) -> list[dict[str, Any]]:
    """Top kernels (CUDA) or aten ops (CPU) by self time over the profiled steps."""
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if e.key.startswith(("fastmae/", "ProfilerStep")):
            continue
        if device.type == "cuda":
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
        else:
            t = e.self_cpu_time_total
        if t > 0:
            rows.append({"name": e.key, "calls": e.count, "self_ms": t / 1e3})
    rows.sort(key=lambda r: -r["self_ms"])
    total = sum(r["self_ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["self_ms"] / total
    return rows[:n]


@dataclasses.dataclass
class Variant:
    """One encoder variant ready to step: model, optimizer, step closure and its markers."""

    tag: str
    model: nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[], None]
    markers: list[Markers]
    masking: str
    done: list[Markers] = dataclasses.field(default_factory=list)

    def run(self, device: torch.device, keep: bool) -> None:
        self.markers[0] = Markers(device)
        self.step()
        if keep:
            self.done.append(self.markers[0])


def build_variant(preset: str, with_m: bool, tag: str, args: argparse.Namespace, device: torch.device,
                  dtype: torch.dtype) -> Variant:
    """fastmae with (``with_m``) or without mask tokens in the encoder, instrumented."""
    cfg = get_preset(preset).model
    masking = args.masking
    if masking == "auto":
        masking = "triton" if device.type == "cuda" and masking_kernel_available() else "torch"
    with torch.device(device):
        model = fastmae.create_model(preset, encoder_mask_tokens=with_m, masking=masking,
                                     attention=args.attention, mask_ratio=args.mask_ratio)
    apply_performance_toggles(model, args.activation_checkpointing, compile=False)
    opt = common.make_adamw(model, common.resolve_fused(args.fused_optimizer, device))
    batches = endless(SyntheticLoader(args.batch_size, cfg.img_size, device=device, size=10**9))
    markers: list[Markers] = [Markers(device)]
    instrument_masking(model, markers)
    step = make_step(model, opt, batches, device, dtype, args.mask_ratio, markers)
    return Variant(tag, model, opt, step, markers, masking)


def profile_trace(v: Variant, args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    """A few steps under torch.profiler: Chrome trace and top ops."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.profile_steps):
            with record_function("ProfilerStep"):
                v.run(device, keep=False)
        common.synchronize(device)
    trace = out / f"trace_{v.tag}.json{'.gz' if args.gzip_traces else ''}"
    prof.export_chrome_trace(str(trace))
    return {"top_ops": top_ops(prof, device), "trace": trace.name}


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: Path,
            interleave: bool) -> dict[str, Any]:
    """Timed split of both variants (interleaved step by step, or one after the other) and their traces."""
    results: dict[str, Any] = {}

    def finish(v: Variant) -> None:
        results[v.tag] = {"split_ms": split_of(v.done), "split_ms_fastest": fastest_split(v.done),
                          "masking": v.masking, "batch": args.batch_size,
                          **profile_trace(v, args, device, out)}
        print(f"   {v.tag}: {results[v.tag]['split_ms']['total']:.2f} ms/step (median)", flush=True)

    if interleave:
        vs = [build_variant(args.preset, with_m, tag, args, device, dtype) for tag, _, with_m in VARIANTS]
        for v in vs:
            for _ in range(args.warmup):
                v.run(device, keep=False)
        for _ in range(args.steps):
            for v in vs:
                v.run(device, keep=True)
        common.synchronize(device)
        for v in vs:
            finish(v)
        del vs
    else:
        for tag, _, with_m in VARIANTS:
            v = build_variant(args.preset, with_m, tag, args, device, dtype)
            for _ in range(args.warmup):
                v.run(device, keep=False)
            for _ in range(args.steps):
                v.run(device, keep=True)
            common.synchronize(device)
            finish(v)
            del v
            common.free_device_memory(device)
    return results


def bar_chart(results: dict[str, Any], path: Path, title: str) -> None:
    """Grouped horizontal bars: milliseconds per phase group, w/o [M] vs w/ [M]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(GROUPS)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    height = 0.38
    for i, (tag, label, _) in enumerate(VARIANTS):
        split = results[tag]["split_ms"]
        vals = [sum(split[k] for k in GROUPS[g]) for g in groups]
        ys = [j + (i - 0.5) * height for j in range(len(groups))]
        bars = ax.barh(ys, vals, height=height, label=f"{label}: {split['total']:.1f} ms/step")
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=8, padding=2)
    ax.set_yticks(range(len(groups)), groups)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per training step (median)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict[str, Any], env: dict[str, Any], args: argparse.Namespace, dtype: torch.dtype) -> str:
    """The markdown summary."""
    a, b = results["without_m"]["split_ms"], results["with_m"]["split_ms"]
    fa, fb = results["without_m"]["split_ms_fastest"], results["with_m"]["split_ms_fastest"]
    order = "variants interleaved step by step" if args.interleave_used else "one variant after the other"
    enc_fast = (fb["encoder_fwd"] + fb["encoder_bwd"]) / max(fa["encoder_fwd"] + fa["encoder_bwd"], 1e-9)
    lines = [
        f"# Step profile: {args.preset}, encoder w/o [M] vs w/ [M]",
        "",
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; "
        f"{env['date_utc']}.",
        f"Batch {args.batch_size}, {common.dtype_name(dtype)}, mask ratio {args.mask_ratio}, masking "
        f"{results['without_m']['masking']}, attention {args.attention}, AdamW "
        f"(fused {common.resolve_fused(args.fused_optimizer, torch.device(env['device_type']))}), "
        f"activation checkpointing {args.activation_checkpointing}. Median of {args.steps} steps after "
        f"{args.warmup} warm-up ({order}); data: synthetic images generated on the device. Medians are per "
        "phase, so "
        "they need not add up to the median total (the rest is shown as unattributed).",
        "",
        f"Step time: w/o [M] {a['total']:.2f} ms, w/ [M] {b['total']:.2f} ms: wall-clock encoder-skip "
        f"speedup **{b['total'] / a['total']:.2f}x** (encoder alone, fwd+bwd: "
        f"{(b['encoder_fwd'] + b['encoder_bwd']) / max(a['encoder_fwd'] + a['encoder_bwd'], 1e-9):.2f}x). "
        f"Fastest steps: {fa['total']:.2f} ms vs {fb['total']:.2f} ms, {fb['total'] / fa['total']:.2f}x "
        f"(encoder {enc_fast:.2f}x).",
        "",
        "![split](split.png)",
        "",
        "| phase | w/o [M] ms | share | w/ [M] ms | share |",
        "|---|---|---|---|---|",
    ]
    for k in PHASES:
        lines.append(f"| {k} | {a[k]:.2f} | {100 * a[k] / a['total']:.1f}% | {b[k]:.2f} | "
                     f"{100 * b[k] / b['total']:.1f}% |")
    rest_a = a["total"] - sum(a[k] for k in PHASES)
    rest_b = b["total"] - sum(b[k] for k in PHASES)
    lines.append(f"| (unattributed) | {rest_a:.2f} | {100 * rest_a / a['total']:.1f}% | {rest_b:.2f} | "
                 f"{100 * rest_b / b['total']:.1f}% |")
    lines.append(f"| **total** | {a['total']:.2f} | 100% | {b['total']:.2f} | 100% |")
    lines += ["", "decoder_bwd includes the loss backward; encoder_bwd includes the masking gather's "
              "backward and the patch embedding's weight gradient.", ""]
    what = "CUDA kernels" if env["device_type"] == "cuda" else "CPU aten ops"
    for tag, label, _ in VARIANTS:
        r = results[tag]
        lines += [f"## Top {what} by self time, {label} ({args.profile_steps} profiled steps)", "",
                  "| # | name | calls | self ms | share |", "|---|---|---|---|---|"]
        for i, o in enumerate(r["top_ops"], 1):
            name = o["name"] if len(o["name"]) <= 90 else o["name"][:87] + "..."
            lines.append(f"| {i} | `{name}` | {o['calls']} | {o['self_ms']:.2f} | {100 * o['share']:.1f}% |")
        lines += ["", f"Chrome trace: [{r['trace']}]({r['trace']})", ""]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--batch-size", type=int, default=0, help="0: 16 on CPU, 64 on CUDA")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--masking", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--attention", default="auto", choices=("auto", "flash", "sdpa", "math"))
    ap.add_argument("--fused-optimizer", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps for the split (median)")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps under torch.profiler (trace size)")
    ap.add_argument("--interleave", default="auto", choices=("auto", "on", "off"),
                    help="alternate the two variants step by step (auto: on for CPU, where other processes "
                         "load the machine; off for CUDA)")
    ap.add_argument("--no-gzip", dest="gzip_traces", action="store_false",
                    help="plain .json traces (default .json.gz: Perfetto and chrome://tracing open it)")
    ap.add_argument("--out", default="benchmarks/results/profile")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    dtype = common.parse_dtype(args.dtype, device)
    get_preset(args.preset)
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = common.environment(device)
    print(f"profiling {args.preset} on {env['device']} (batch {args.batch_size}, {common.dtype_name(dtype)})",
          flush=True)
    interleave = args.interleave == "on" or (args.interleave == "auto" and device.type != "cuda")
    args.interleave_used = interleave
    results = measure(args, device, dtype, out, interleave)
    machine = env["device"].split(" (")[0]
    bar_chart(results, out / "split.png",
              f"{args.preset}, batch {args.batch_size}, {common.dtype_name(dtype)}: {machine}")
    text = report(results, env, args, dtype)
    (out / "report.md").write_text(text)
    payload = {"environment": env, "settings": vars(args), **results}
    (out / "split.json").write_text(json.dumps(payload, indent=2))
    print(text, flush=True)
    print(f"wrote {out}/report.md, split.png, split.json and the Chrome traces", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
