"""Images per second of each fastmae data loader on the same shards with the same transforms: idle, with a
busy main thread and (``--train PRESET``) with a training step per batch, on local and HTTP-streamed shards:
``python benchmarks/data_throughput.py [--shards PATTERN] [--backends dali,torch] [--out DIR]``. See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastmae.data import build_loader, dali_available

from fastmae.config import DataConfig


def make_shards(out: Path, count: int, seed: int = 0) -> Path:
    """``count`` ImageNet-sized JPEGs cut from scikit-image photographs (else from the bundled sample),
    sharded into ``out`` (cached)."""
    if (out / "report.json").is_file() and json.loads((out / "report.json").read_text())["samples"] == count:
        return out
    from fastmae.data.shards import write_shards
    from PIL import Image

    try:
        import skimage.data

        photos = [np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("RGB"))
                  for n in ("astronaut", "chelsea", "coffee", "hubble_deep_field", "retina", "rocket", "camera")]
    except ImportError:  # e.g. a GPU machine without scikit-image: upscale the bundled sample's photos
        from fastmae.data import ShardIndex, bundled_sample_dir, expand_shards

        index = ShardIndex(expand_shards(bundled_sample_dir()))
        photos = [np.asarray(Image.open(io.BytesIO(index.read_image(i))).convert("RGB").resize((500, 375)))
                  for i in range(len(index))]
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            img = photos[i % len(photos)]
            h, w = img.shape[:2]
            ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            size = (500, 375) if rng.random() < 0.75 else (375, 500)
            crop = Image.fromarray(np.ascontiguousarray(img[y:y + ch, x:x + cw])).resize(size, Image.BICUBIC)
            crop.save(Path(tmp) / f"img{i:06d}.jpg", quality=90)
        write_shards(Path(tmp), out, samples_per_shard=256, workers=os.cpu_count() or 1, progress=False)
    return out


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Time one backend in this process."""
    device = torch.device(args.device)
    cfg = DataConfig(
        backend=args.only, interpolation=args.interpolation, shards=args.shards, batch_size=args.batch_size,
        num_workers=args.workers, dtype=args.dtype, synthetic_size=10**9, read=args.read,
        cache_dir=str(args.cache / "spool"), feed_workers=args.feed,
    )
    t0 = time.perf_counter()
    loader = build_loader(cfg, img_size=args.img_size, device=device, seed=0)
    stream = _forever(loader)
    for _ in range(args.warmup):
        next(stream)
    _sync(device)
    first = time.perf_counter() - t0
    rates = _windows(stream, args, device, busy_s=0.0)
    idle = statistics.median(rates)
    busy_ms = args.busy_ms if args.busy_ms > 0 else 1000.0 * args.batch_size / idle
    busy = _windows(stream, args, device, busy_s=busy_ms / 1000.0) if args.busy_ms >= 0 else []
    train = _windows(stream, args, device, busy_s=0.0, step=_train_step(args.train, device)) if args.train else []
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    return {
        "backend": loader.backend, "source": args.source, "read": args.read, "device": str(device),
        "feed_workers": getattr(loader, "feed_workers", None),
        "img_per_s": idle,
        "min": min(rates), "max": max(rates), "repeats": rates, "startup_and_warmup_s": first,
        "num_samples": loader.num_samples, "busy_ms_per_batch": busy_ms if busy else None,
        "busy_img_per_s": statistics.median(busy) if busy else None, "busy_repeats": busy,
        "busy_over_idle": statistics.median(busy) / idle if busy else None,
        "train_preset": args.train or None, "train_img_per_s": statistics.median(train) if train else None,
        "train_repeats": train,
    }


def _spin(seconds: float) -> None:
    """Pure-Python work on this thread for ``seconds`` (holds the interpreter like a training step's Python)."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        for i in range(200):
            x += i


def _train_step(preset: str, device: torch.device) -> Any:
    """One MAE training step (forward, backward, AdamW) of ``preset`` on a batch, in fp32 (bf16 autocast on
    CUDA): the end-to-end rate with this loader, against the synthetic loader's."""
    from fastmae.config import get_preset
    from fastmae.model import MaskedAutoencoderViT

    cfg = get_preset(preset)
    model = MaskedAutoencoderViT(cfg.model, cfg.mask).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    seed = iter(range(10**9))

    def step(imgs: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, _ = model(imgs.float(), mask_seed=next(seed))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _windows(stream: Any, args: argparse.Namespace, device: torch.device, busy_s: float,
             step: Any = None) -> list[float]:
    """Images per second over ``--repeats`` windows of ``--batches`` batches, the main thread spinning in
    Python for ``busy_s`` after each batch, or training on it with ``step``."""
    rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        n = 0
        for _ in range(args.batches):
            imgs, _labels = next(stream)
            n += imgs.shape[0]
            if busy_s:
                _spin(busy_s)
            if step is not None:
                step(imgs)
        _sync(device)
        rates.append(n / (time.perf_counter() - t))
    return rates


def _forever(loader: Any) -> Any:
    while True:
        yield from loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """Python's HTTP server on ``folder`` (a free port on 127.0.0.1): (process, URL of its shards)."""
    import socket

    if not folder.is_dir():
        raise SystemExit(f"--sources http needs --shards to be a folder of shards, not {folder}")
    names = sorted(p.stem for p in folder.glob("*.tar"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    pattern = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
    return proc, f"http://127.0.0.1:{port}/{pattern}.tar"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} + {os.cpu_count()} CPU cores"
    model = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, no GPU"


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="", help="shards to read (default: ImageNet-like shards made once)")
    ap.add_argument("--make", type=int, default=1024, help="images to make when --shards is not given")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fastmae_bench_shards")
    ap.add_argument("--backends", default="", help="comma list of dali,torch,synthetic (default: all here)")
    ap.add_argument("--sources", default="local,http",
                    help="comma list of local (the files, global shuffle) and http (streamed from a local HTTP "
                         "server); the synthetic backend reads nothing")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DALI threads / DataLoader workers")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear"))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batches", type=int, default=10, help="batches per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--busy-ms", type=float, default=0.0,
                    help="Python work on the main thread after each batch in the busy timing (0: one idle batch's "
                         "time; -1: no busy timing)")
    ap.add_argument("--train", default="", metavar="PRESET",
                    help="also time training: one MAE step of PRESET per batch (its image size replaces "
                         "--img-size), reported beside the synthetic loader's rate")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="folder for data_throughput.json")
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)
    ap.add_argument("--feed-workers", default="0,2",
                    help="comma list of DALI data.feed_workers values to time (0: the feed is a thread of the "
                         "training process; N: N worker processes; -1: the default for the device)")
    ap.add_argument("--feed", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--source", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--read", default="global", help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def _runs(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(backend, source, DALI feed workers) of every row to time."""
    backends = args.backends.split(",") if args.backends else (
        ["dali"] if dali_available() else []) + ["torch", "synthetic"]
    sources = args.sources.split(",")
    bad = set(sources) - {"local", "http"}
    if bad:
        ap.error(f"--sources: unknown {', '.join(sorted(bad))} (local, http)")
    feeds = [int(f) for f in args.feed_workers.split(",")]
    runs = [(b, "local", f) for b in backends for f in (feeds if b == "dali" else [-1])
            if b == "synthetic" or "local" in sources]
    runs += [(b, "http", f) for b in backends for f in (feeds if b == "dali" else [-1])
             if b != "synthetic" and "http" in sources]
    return runs


def _time_runs(args: argparse.Namespace, runs: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """Each row in a process of its own (one backend, one JSON line), saved as soon as it is timed."""
    rows = []
    server = None
    try:
        for b, source, feed in runs:
            shards, read = args.shards, "global"
            if source == "http":
                if server is None:
                    server, url = _serve(Path(args.shards))
                shards, read = url, "stream"
            cmd = [sys.executable, __file__, "--only", b, "--source", source, "--read", read, "--feed", str(feed)] + [
                a for k, v in vars(args).items()
                if k not in ("only", "out", "backends", "make", "sources", "source", "read", "feed", "feed_workers")
                for a in (f"--{k.replace('_', '-')}", str(shards if k == "shards" else v))
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{b} ({source}, feed {feed}): failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            _save(args, rows)  # each row as soon as it is timed: a run cut short keeps what it measured
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return rows


def _print_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    base = next((r["img_per_s"] for r in rows if r["backend"] == "torch" and r["source"] == "local"), None)
    title = (f"data loaders on {machine()}: batch {args.batch_size}, {args.img_size} px {args.interpolation}, "
             f"{args.workers} workers/threads, shards {args.shards}")
    print(title)
    synth = next((r["train_img_per_s"] for r in rows if r["backend"] == "synthetic"), None)
    print(f"{'backend':<10} {'source':<7} {'feed':>4} {'device':<7} {'img/s (median)':>15} {'min':>8} {'max':>8} "
          f"{'vs torch':>9} {'start s':>8} {'busy img/s':>11} {'busy/idle':>9}"
          + (f" {'train img/s':>12} {'vs synth':>9}" if args.train else ""))
    for r in rows:
        rel = f"{r['img_per_s'] / base:.2f}x" if base else "-"
        busy = "-" if r.get("busy_img_per_s") is None else f"{r['busy_img_per_s']:.1f}"
        ratio = "-" if r.get("busy_over_idle") is None else f"{r['busy_over_idle']:.2f}"
        feed = "-" if r.get("feed_workers") is None else r["feed_workers"]
        print(f"{r['backend']:<10} {r['source']:<7} {feed:>4} {r['device']:<7} {r['img_per_s']:>15.1f} "
              f"{r['min']:>8.1f} {r['max']:>8.1f} {rel:>9} {r['startup_and_warmup_s']:>8.1f} {busy:>11} {ratio:>9}"
              + (f" {r['train_img_per_s']:>12.1f} {r['train_img_per_s'] / synth if synth else 0:>8.2f}x"
                 if args.train else ""))


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.train:
        from fastmae.config import get_preset

        args.img_size = get_preset(args.train).model.img_size
    if args.only:  # child process: one backend, one JSON line
        print(json.dumps(run_one(args)))
        return 0
    if not args.shards:
        args.shards = str(make_shards(args.cache, args.make))
    rows = _time_runs(args, _runs(ap, args))
    _print_table(args, rows)
    print(json.dumps(_save(args, rows)))
    return 0 if rows else 1


def _save(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The results so far; written to ``--out``/data_throughput.json when given."""
    result = {"machine": machine(), "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "data_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
