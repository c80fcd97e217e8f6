"""Benchmark of the fused Triton masking kernel (CUDA only): checks it against the torch reference, then times
both kernel schedules and the reference, eager and as CUDA graphs, against the card's copy bandwidth:
``python benchmarks/masking_kernel.py [--out DIR] [--shapes vit_l,vit_b,vit_h] [--batch 256]``. See
benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is run as a script, which puts benchmarks/ first on sys.path; its name must not shadow the
# `kernels` package (Hugging Face) for anything imported below.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# ViT-L first: the target shape gets the torch.compile baseline before --budget-s runs out
SHAPES: dict[str, tuple[int, int]] = {"vit_l": (196, 1024), "vit_b": (196, 768), "vit_h": (256, 1280)}
SMOKE_SHAPES: dict[str, tuple[int, int]] = {"vit_l": (16, 32), "vit_b": (16, 24), "vit_h": (20, 40)}
DEVICE = torch.device("cuda")  # --cpu-smoke switches to cpu + the Triton interpreter
MASK_RATIO = 0.75
TARGET_SPEEDUP, TARGET_COPY_FRACTION = 3.0, 0.8  # the kernel's goals, at the ViT-L shape


def import_kernels() -> tuple[ModuleType, ModuleType]:
    """(fastmae.kernels.masking, fastmae.kernels.masking_ref); maps kernels/ by hand if not installed."""
    try:
        from fastmae.kernels import masking, masking_ref

        return masking, masking_ref
    except ImportError:
        pass
    folder = REPO / "kernels"
    spec = importlib.util.spec_from_file_location(
        "fastmae.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastmae.kernels"] = module
    spec.loader.exec_module(module)
    from fastmae.kernels import masking, masking_ref

    return masking, masking_ref


# ----------------------------------------------------------------------------- timing


def _median_ms(events: list[tuple[torch.cuda.Event, torch.cuda.Event]], per: int) -> float:
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events) / per


def time_eager(fn: Callable[[], Any], warmup: int, repeats: int, inner: int) -> float:
    """Median ms per call of ``inner`` back-to-back Python launches (includes launch overhead)."""
    for _ in range(warmup):
        fn()
    if DEVICE.type != "cuda":  # --cpu-smoke: wall clock
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        events.append((a, b))
    return _median_ms(events, inner)


def time_graph(fn: Callable[[], Any], warmup: int, repeats: int, inner: int) -> float | None:
    """Median ms per call of ``inner`` calls captured in one CUDA graph (GPU time); None if capture fails."""
    if DEVICE.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        events = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            events.append((a, b))
        ms = _median_ms(events, inner)
        del graph
        return ms
    except Exception as exc:  # capture is best effort: eager timing remains
        print(f"  (CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:120]})")
        torch.cuda.synchronize()
        return None


def copy_bandwidth_gbps(repeats: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) of a 1 GiB tensor, GB/s."""
    n = 1 << 29 if DEVICE.type == "cuda" else 1 << 22  # bf16 elements: 1 GiB (8 MiB in --cpu-smoke)
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = time_eager(lambda: dst.copy_(src), warmup=3, repeats=repeats, inner=1)
    return 2 * n * 2 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- bytes


def bytes_moved(B: int, N: int, D: int, K: int, es: int, backward: bool) -> int:
    """Bytes a perfect kernel must move (bf16 ``es`` bytes per element, Philox keys: no noise read).

    fwd: read K kept rows + write x_vis (2*B*K*D), read pos_embed once (N*D), write mask (B*N*es)
    and ids_restore (B*N*8). bwd adds: read grad_x_vis (B*K*D), write the whole grad_x (B*N*D) and
    read ids_restore (B*N*8).
    """
    fwd = 2 * B * K * D * es + N * D * es + B * N * (es + 8)
    if not backward:
        return fwd
    return fwd + B * K * D * es + B * N * D * es + B * N * 8


# ----------------------------------------------------------------------------- correctness


def _same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of the outputs (x_vis, mask, ids_restore) that differ in dtype or any bit."""
    names = ("x_vis", "mask", "ids_restore")
    return [n for n, g, w in zip(names, got, want, strict=True) if g.dtype != w.dtype or not torch.equal(g, w)]


def check_correctness(
    masking: ModuleType, masking_ref: ModuleType, N: int, D: int, block_ds: list[int]
) -> list[str]:
    """GPU vs reference: exact forward (noise path), valid and schedule/block-independent Philox masks,
    exact x gradient. Kept to the kernel variants the timings use (each is a Triton compile)."""
    errors: list[str] = []
    ref_fn, fused = masking_ref.random_masking_ref, masking.random_masking
    K = masking_ref.num_kept(N, MASK_RATIO)
    B = 8
    # noise path == reference, bit for bit: bf16 (both schedules) and fp32 (default)
    for dtype, schedules in ((torch.bfloat16, masking.SCHEDULES), (torch.float32, (masking.DEFAULT_SCHEDULE,))):
        x = torch.randn(B, N, D, device=DEVICE).to(dtype)  # (B, N, D)
        pos = torch.randn(1, N, D, device=DEVICE).to(dtype)  # (1, N, D)
        noise = torch.rand(B, N, device=DEVICE)  # (B, N)
        want = ref_fn(x, MASK_RATIO, noise=noise, pos_embed=pos)
        for schedule in schedules:
            bad = _same(fused(x, MASK_RATIO, noise=noise, pos_embed=pos, schedule=schedule), want)
            errors += [f"N={N} D={D} {dtype} {schedule}: {name} differs from the reference" for name in bad]
    # Philox path: a valid masking, identical for every schedule and block_d timed below
    x = torch.randn(B, N, D, device=DEVICE, dtype=torch.bfloat16)
    pos = torch.randn(1, N, D, device=DEVICE, dtype=torch.bfloat16)
    x_vis, mask, ids = first = fused(x, MASK_RATIO, seed=123, pos_embed=pos)
    ids_shuffle = torch.argsort(ids, dim=1)  # (B, N)
    if not torch.equal(torch.sort(ids, dim=1).values, torch.arange(N, device=DEVICE).expand(B, N)):
        errors.append(f"N={N}: Philox ids_restore is not a permutation")
    elif not torch.equal(x_vis, torch.gather(x + pos, 1, ids_shuffle[:, :K, None].expand(-1, -1, D))):
        errors.append(f"N={N}: Philox x_vis are not the kept rows + pos_embed")
    if not torch.equal(mask, (ids >= K).to(mask.dtype)):
        errors.append(f"N={N}: Philox mask inconsistent with ids_restore")
    for schedule in masking.SCHEDULES:
        for bd in [None, *block_ds]:
            bad = _same(fused(x, MASK_RATIO, seed=123, pos_embed=pos, block_d=bd, schedule=schedule), first)
            errors += [f"N={N}: Philox {schedule} block_d={bd}: {name} differs for the same seed" for name in bad]
    # backward: x (exact) and a trainable pos_embed (fp32 sums, close)
    x = torch.randn(B, N, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, N, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    noise = torch.rand(B, N, device=DEVICE)
    g = torch.randn(B, K, D, device=DEVICE, dtype=torch.bfloat16)  # (B, K, D)
    gx, gp = torch.autograd.grad(fused(x, MASK_RATIO, noise=noise, pos_embed=pos)[0], (x, pos), g)
    rx, rp = torch.autograd.grad(ref_fn(x, MASK_RATIO, noise=noise, pos_embed=pos)[0], (x, pos), g)
    if not torch.equal(gx, rx):
        errors.append(f"N={N} D={D}: grad x differs from the reference")
    if not torch.allclose(gp.float(), rp.float(), rtol=2e-2, atol=2e-2):
        errors.append(f"N={N} D={D}: grad pos_embed differs from the reference")
    return errors


# ----------------------------------------------------------------------------- main


def bench_shape(
    name: str,
    B: int,
    fused_fn: Callable[..., Any],
    ref_fn: Callable[..., Any],
    compiled: Callable[..., Any] | None,
    block_ds: list[int],
    copy_gbps: float,
    args: argparse.Namespace,
    t_start: float,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every variant (fwd, fwd+bwd) at one shape; one row per (variant, pass). ``on_row(rows so far)``
    runs after every measurement (the caller rewrites its JSON: a run cut short keeps what it measured)."""
    N, D = SHAPES[name]
    ratio, es = MASK_RATIO, 2
    K = int(N * (1 - ratio))
    x = torch.randn(B, N, D, device=DEVICE, dtype=torch.bfloat16)  # (B, N, D)
    xg = x.detach().clone().requires_grad_()
    pos = torch.randn(1, N, D, device=DEVICE, dtype=torch.bfloat16)  # (1, N, D)
    g = torch.randn(B, K, D, device=DEVICE, dtype=torch.bfloat16)  # (B, K, D) upstream gradient

    def fwd(fn: Callable[..., Any], kw: dict[str, Any]) -> Callable[[], Any]:
        return lambda: fn(x, ratio, pos_embed=pos, **kw)

    def fwd_bwd(fn: Callable[..., Any], kw: dict[str, Any]) -> Callable[[], Any]:
        # autograd.grad, not backward(): no accumulation into x.grad (an extra B*N*D read+write)
        return lambda: torch.autograd.grad(fn(xg, ratio, pos_embed=pos, **kw)[0], xg, g)

    # the kernel with an int seed, as the training program calls it (one seed per step and rank)
    variants: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
        ("fused", fused_fn, {"schedule": "fused", "seed": 1234}),
        ("split", fused_fn, {"schedule": "split", "seed": 1234}),
    ]
    for schedule in ("fused", "split"):
        variants += [(f"{schedule}[block_d={bd}]", fused_fn, {"block_d": bd, "schedule": schedule, "seed": 1234})
                     for bd in block_ds]
    variants += [("reference", ref_fn, {})]
    if compiled is not None:
        variants += [("ref_compiled", compiled, {})]
    rows: list[dict[str, Any]] = []
    for variant, fn, kw in variants:
        passes = ("fwd",) if "[" in variant else ("fwd", "fwd+bwd")
        for pass_ in passes:
            if variant == "ref_compiled" and time.perf_counter() - t_start > args.budget_s:
                print(f"  {name} {variant} {pass_}: skipped (time budget --budget-s spent)")
                rows.append(dict(shape=name, variant=variant, pass_=pass_, skipped="time budget"))
                if on_row is not None:
                    on_row(rows)
                continue
            step = fwd(fn, kw) if pass_ == "fwd" else fwd_bwd(fn, kw)
            eager = time_eager(step, args.warmup, args.repeats, args.inner)
            graph = time_graph(step, args.warmup, args.repeats, args.inner)
            ms = graph if graph is not None else eager
            nbytes = bytes_moved(B, N, D, K, es, backward=pass_ == "fwd+bwd")
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append(dict(shape=name, B=B, N=N, D=D, K=K, variant=variant, pass_=pass_,
                             ms_graph=graph, ms_eager=eager, ms=ms, bytes=nbytes, GBps=gbps,
                             copy_fraction=gbps / copy_gbps))
            if on_row is not None:
                on_row(rows)
    return rows



def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def output_path(out_dir: str | None, card: str, date: str) -> Path:
    """--out DIR, else $OUT, else benchmarks/results/kernels-<card>-<date>.json."""
    if out_dir:
        return Path(out_dir) / "kernels.json"
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "kernels.json"
    return REPO / "benchmarks" / "results" / f"kernels-{card_slug(card)}-{date}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for kernels.json (else $OUT or benchmarks/results)")
    p.add_argument("--shapes", default="vit_l,vit_b,vit_h", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=15, help="timed repeats (median)")
    p.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    p.add_argument("--block-d", default="64,128,256", help="block_d values swept (fwd, both schedules)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--budget-s", type=float, default=40.0, help="skip torch.compile variants after this")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the script itself on CPU under the Triton interpreter with tiny shapes and no "
                        "torch.compile (checks the script, measures nothing); writes nothing without --out")
    return p.parse_args(argv)


def _select_device(args: argparse.Namespace) -> int:
    """CUDA, or with --cpu-smoke the CPU under the Triton interpreter (tiny shapes, one repeat); 0 = go on,
    else the exit status."""
    global DEVICE, SHAPES
    if args.cpu_smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("--cpu-smoke needs the Triton interpreter, but triton was imported without TRITON_INTERPRET=1",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        DEVICE, SHAPES = torch.device("cpu"), SMOKE_SHAPES
        args.no_compile, args.batch, args.block_d = True, min(args.batch, 2), "8,16"
        args.warmup, args.repeats, args.inner = 1, 1, 1
    elif not torch.cuda.is_available():
        print("benchmarks/masking_kernel.py needs CUDA: the fused masking kernel is timed on a GPU only "
              "(its CPU correctness tests are tests/integration/test_kernels.py under the Triton interpreter).",
              file=sys.stderr)
        return 2
    return 0


def _report(result: dict[str, Any], path: Path | None) -> None:
    if result["fastest_vit_l_fwd"] is not None:
        print(f"fastest kernel variant at ViT-L fwd: {result['fastest_vit_l_fwd']}")
    verdict = result["vit_l_target"]
    if verdict is not None:
        print(f"\nViT-L fwd target (>= {TARGET_SPEEDUP}x reference, >= {TARGET_COPY_FRACTION:.0%} of copy): "
              f"{verdict['speedup']:.2f}x, {verdict['copy_fraction']:.0%} -> "
              f"{'met' if verdict['meets_speedup'] and verdict['meets_bandwidth'] else 'NOT met'}")
    if path is None:
        print("\n--cpu-smoke: nothing written (pass --out)")
    else:
        print(f"\nwrote {path} ({result['wall_s']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = _select_device(args)
    if status:
        return status
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"unknown shape(s) {unknown}; valid: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    block_ds = [int(v) for v in args.block_d.split(",") if v.strip()]
    t_start = time.perf_counter()
    masking, masking_ref = import_kernels()
    import triton

    card = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu-smoke (Triton interpreter)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    print(f"device: {card}; torch {torch.__version__}, triton {triton.__version__}")

    # 1. correctness on the GPU first
    errors: list[str] = []
    for name in shapes:
        errors += check_correctness(masking, masking_ref, *SHAPES[name], block_ds)
    if errors:
        print("CORRECTNESS FAILED:\n  " + "\n  ".join(errors), file=sys.stderr)
    else:
        print(f"correctness: fused == reference on {', '.join(shapes)} (fwd exact, grads) [OK]")

    # 2. copy bandwidth of this card
    copy_gbps = copy_bandwidth_gbps()
    print(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s")

    # 3. timings; the JSON is rewritten after every measurement, so a run cut short still leaves its numbers
    B = args.batch
    ref_fn, fused_fn = masking_ref.random_masking_ref, masking.random_masking
    compiled = None if args.no_compile else torch.compile(ref_fn, dynamic=False)
    path = None if args.cpu_smoke and not args.out else output_path(args.out, card, date)
    head = dict(
        benchmark="fused random masking kernel (benchmarks/masking_kernel.py)",
        device=card, date=date, torch=torch.__version__, triton=triton.__version__,
        batch=B, mask_ratio=MASK_RATIO, dtype="bfloat16", pos_embed_dtype="bfloat16",
        keys="philox in the kernel, int seed (the training path)", default_schedule=masking.DEFAULT_SCHEDULE,
        copy_bandwidth_GBps=copy_gbps, correctness_errors=errors,
    )
    rows: list[dict[str, Any]] = []

    def write(current: list[dict[str, Any]]) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summarize(head, rows + current, t_start), indent=2) + "\n")

    result = summarize(head, rows, t_start)
    for name in shapes:
        rows += bench_shape(name, B, fused_fn, ref_fn, compiled, block_ds, copy_gbps, args, t_start, on_row=write)
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        result = summarize(head, rows, t_start)
        write([])
    print_table(rows, B, copy_gbps)
    _report(result, path)
    return 1 if errors else 0


def summarize(head: dict[str, Any], rows: list[dict[str, Any]], t_start: float) -> dict[str, Any]:
    """The JSON document: speedups against the reference of the same shape and pass, the ViT-L verdict."""
    base = {(r["shape"], r["pass_"]): r["ms"] for r in rows if r["variant"] == "reference" and "ms" in r}
    for r in rows:
        if "ms" in r and (r["shape"], r["pass_"]) in base:
            r["speedup_vs_reference"] = base[(r["shape"], r["pass_"])] / r["ms"]
    target = next((r for r in rows if (r["shape"], r["variant"], r["pass_"]) == ("vit_l", "fused", "fwd")), None)
    kernels = [r for r in rows if r["shape"] == "vit_l" and r["pass_"] == "fwd" and "ms" in r
               and r["variant"].startswith(("fused", "split"))]
    best = min(kernels, key=lambda r: r["ms"], default=None)
    verdict = None
    if target is not None and "speedup_vs_reference" in target:
        verdict = dict(speedup=target["speedup_vs_reference"], copy_fraction=target["copy_fraction"],
                       meets_speedup=target["speedup_vs_reference"] >= TARGET_SPEEDUP,
                       meets_bandwidth=target["copy_fraction"] >= TARGET_COPY_FRACTION)
    return dict(
        head, vit_l_target=verdict, fastest_vit_l_fwd=None if best is None else best["variant"],
        wall_s=time.perf_counter() - t_start,
        rows=[{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows],
    )


def print_table(rows: list[dict[str, Any]], B: int, copy_gbps: float) -> None:
    """One line per (shape, variant, pass)."""
    print(f"\nB={B}, mask ratio {MASK_RATIO}, bf16 tokens + bf16 pos_embed; GB/s against bytes that must move; "
          f"copy = {copy_gbps:.0f} GB/s")
    header = (f"{'shape':6} {'variant':22} {'pass':8} {'graph ms':>9} {'eager ms':>9} {'GB/s':>7} "
              f"{'% copy':>7} {'x ref':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "ms" not in r:
            print(f"{r['shape']:6} {r['variant']:22} {r['pass_']:8} {'skipped':>9}")
            continue
        graph = f"{r['ms_graph']:.4f}" if r["ms_graph"] is not None else "n/a"
        speedup = f"{r['speedup_vs_reference']:6.2f}" if "speedup_vs_reference" in r else "   n/a"
        print(f"{r['shape']:6} {r['variant']:22} {r['pass_']:8} {graph:>9} {r['ms_eager']:9.4f} "
              f"{r['GBps']:7.0f} {100 * r['copy_fraction']:6.1f}% {speedup}")


if __name__ == "__main__":
    sys.exit(main())
