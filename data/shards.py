"""Write and verify WebDataset shards for fastmae (``<key>.jpg`` + ``<key>.cls``, a DALI ``.idx`` next to each
shard, ``classes.json``) from an ImageNet-layout folder, a flat image folder or a file list:
``python -m fastmae.data.shards write SRC OUT [--samples-per-shard N] [--resize 256]``, then ``verify OUT``.
See data/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import multiprocessing.pool
import os
import re
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .index import (
    IMAGE_EXTS,
    ShardError,
    expand_shards,
    index_path,
    make_index,
    read_index,
    scan_tar,
    split_member,
)

SOURCE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CLASSES_JSON = "classes.json"
REPORT_JSON = "report.json"


# ----------------------------------------------------------------------------- source listing


@dataclass
class Source:
    """Images to shard, with labels and the class map (empty when unlabelled)."""

    items: list[tuple[str, int]]
    classes: dict[str, int] = field(default_factory=dict)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in SOURCE_EXTS and not p.name.startswith(".")


def list_source(src: Path, classes: dict[str, int] | None = None) -> Source:
    """List ``src`` (ImageNet-layout folder, flat folder or file list) as (path, label) pairs."""
    if src.is_file():
        items: list[tuple[str, int]] = []
        for ln in src.read_text().splitlines():
            parts = ln.strip().rsplit(maxsplit=1)
            if not parts:
                continue
            if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
                items.append((parts[0], int(parts[1])))
            else:
                items.append((ln.strip(), 0))
        return Source(items, classes or {})
    if not src.is_dir():
        raise ShardError(f"source {src} is neither a folder nor a file list")
    subdirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:
        cmap = dict(classes) if classes else {d.name: i for i, d in enumerate(subdirs)}
        items = []
        for d in subdirs:
            if d.name not in cmap:
                raise ShardError(f"class folder {d} is not in the given class map")
            items.extend((str(p), cmap[d.name]) for p in sorted(d.rglob("*")) if _is_image(p))
        return Source(items, cmap)
    return Source([(str(p), 0) for p in sorted(src.iterdir()) if _is_image(p)], classes or {})


# ----------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    """One source image after decoding: JPEG bytes or the reason it was skipped."""

    path: str
    label: int
    data: bytes | None
    converted: bool = False
    error: str = ""


def encode_image(path: str, label: int, resize: int = 0, quality: int = 90) -> Encoded:
    """Decode ``path`` fully; return its bytes unchanged if it is a plain RGB JPEG within ``resize``, else
    an RGB JPEG re-encoding (EXIF rotation applied, shorter side reduced to ``resize``)."""
    try:
        raw = Path(path).read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            img.load()  # full decode: truncated/corrupt data raises here
            orientation = img.getexif().get(0x0112, 1)
            too_big = resize > 0 and min(img.size) > resize
            if img.format == "JPEG" and img.mode == "RGB" and orientation in (0, 1) and not too_big:
                return Encoded(path, label, raw)
            out = ImageOps.exif_transpose(img)
            if out.mode in ("RGBA", "LA", "PA") or (out.mode == "P" and "transparency" in out.info):
                rgba = out.convert("RGBA")
                bg = Image.new("RGB", rgba.size, (255, 255, 255))
                bg.paste(rgba, mask=rgba.getchannel("A"))
                out = bg
            else:
                out = out.convert("RGB")
            if resize > 0 and min(out.size) > resize:
                w, h = out.size
                s = resize / min(w, h)
                out = out.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            out.save(buf, "JPEG", quality=quality)
            return Encoded(path, label, buf.getvalue(), converted=True)
    except UnidentifiedImageError:
        return Encoded(path, label, None, error="not an image format PIL recognises")
    except Exception as e:  # any failure to read or decode means: skip and report
        return Encoded(path, label, None, error=f"{type(e).__name__}: {e}")


def _encode_task(args: tuple[str, int, int, int]) -> Encoded:
    return encode_image(*args)


def _key(i: int, path: str) -> str:
    """Tar-safe unique sample key: running number + the file's stem (no dots, <= 80 chars)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)[:60]
    return f"{i:09d}_{stem}"


# ----------------------------------------------------------------------------- shard writing


def _pool(workers: int) -> mp.pool.Pool | None:
    """A process pool (fork on Linux: cheap start) or None for a single process."""
    if workers <= 1:
        return None
    return mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read a byte size from {text!r} (e.g. 500M, 1G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


class _ShardSink:
    """Writes samples into consecutive shards, each under a temporary name until complete."""

    def __init__(self, out: Path, prefix: str, max_samples: int, max_bytes: int) -> None:
        self.out, self.prefix = out, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict[str, object]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0
        self._mtime = 1_700_000_000  # fixed: the same input gives byte-identical shards

    def _path(self, n: int) -> Path:
        return self.out / f"{self.prefix}{n:06d}.tar"

    def _open(self) -> None:
        final = self._path(len(self.shards))
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self._count = self._bytes = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(self._mtime)
        info.mode = 0o444
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, jpeg: bytes, label: int) -> None:
        if self._tar is not None and (
            (self.max_samples and self._count >= self.max_samples)
            or (self.max_bytes and self._bytes + len(jpeg) > self.max_bytes and self._count > 0)
        ):
            self.finish_shard()
        if self._tar is None:
            self._open()
        self._add(f"{key}.cls", str(label).encode())
        self._add(f"{key}.jpg", jpeg)
        self._count += 1
        self._bytes += len(jpeg) + 1536

    def finish_shard(self) -> None:
        """Close the current shard, index it, rename index then tar to their final names."""
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        final = self._path(len(self.shards))
        idx_tmp = self._tmp.with_suffix(".idx.tmp")
        make_index(self._tmp, idx_tmp)
        os.replace(idx_tmp, index_path(final))
        os.replace(self._tmp, final)
        self.shards.append({"file": final.name, "samples": self._count})


def write_shards(
    src: Path,
    out: Path,
    *,
    samples_per_shard: int = 0,
    bytes_per_shard: int = 0,
    resize: int = 0,
    quality: int = 90,
    workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    prefix: str = "",
    classes: dict[str, int] | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Shard ``src`` into ``out`` (see the module docstring); returns the report also written to
    ``out/report.json``."""
    import random

    from tqdm import tqdm

    if not samples_per_shard and not bytes_per_shard:
        samples_per_shard = 1000
    source = list_source(src, classes)
    if not source.items:
        raise ShardError(f"no images found in {src}")
    items = list(source.items)
    if shuffle:  # mix classes across shards (sorted ImageNet folders would give one class per shard)
        random.Random(seed).shuffle(items)
    out.mkdir(parents=True, exist_ok=True)
    sink = _ShardSink(out, prefix, samples_per_shard, bytes_per_shard)
    skipped: list[dict[str, str]] = []
    converted = 0
    tasks = [(p, lab, resize, quality) for p, lab in items]
    workers = workers or max(1, (os.cpu_count() or 1))
    t0 = time.time()
    bar = tqdm(total=len(tasks), unit="img", desc=f"writing {out}", disable=not progress)
    pool = _pool(workers)
    try:
        results: Iterator[Encoded] = (
            pool.imap(_encode_task, tasks, chunksize=16) if pool else map(_encode_task, tasks)
        )
        n = 0
        for enc in results:
            bar.update(1)
            if enc.data is None:
                skipped.append({"path": enc.path, "reason": enc.error})
                continue
            converted += enc.converted
            sink.write(_key(n, enc.path), enc.data, enc.label)
            n += 1
        sink.finish_shard()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    (out / CLASSES_JSON).write_text(json.dumps(source.classes or {"_unlabelled": 0}, indent=1) + "\n")
    report: dict[str, object] = {
        "source": str(src),
        "samples": sum(int(s["samples"]) for s in sink.shards),  # type: ignore[call-overload]
        "converted": converted,
        "skipped": skipped,
        "shards": sink.shards,
        "pattern": _pattern(out, prefix, len(sink.shards)),
        "seconds": round(time.time() - t0, 2),
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _pattern(out: Path, prefix: str, n: int) -> str:
    if n <= 1:
        return str(out / f"{prefix}000000.tar")
    return str(out / f"{prefix}{{000000..{n - 1:06d}}}.tar")


# ----------------------------------------------------------------------------- verification


def verify_shard(shard: Path) -> tuple[int, list[str], dict[int, int]]:
    """Check one shard: tar integrity, both components per sample, integer labels, every JPEG decodes,
    the index matches. Returns (samples, problems as 'shard: key: what', label histogram)."""
    problems: list[str] = []
    labels: dict[int, int] = {}
    name = str(shard)
    try:
        scanned = scan_tar(shard)
    except (tarfile.TarError, OSError, EOFError) as e:
        return 0, [f"{name}: -: unreadable tar ({type(e).__name__}: {e})"], labels
    try:
        with tarfile.open(shard, "r:") as tf:
            seen: set[str] = set()
            for s in scanned:
                key = split_member(next(iter(s.values()))[2])[0]
                if key in seen:
                    problems.append(f"{name}: {key}: key appears twice (samples must be contiguous)")
                seen.add(key)
                img = next((s[e] for e in IMAGE_EXTS if e in s), None)
                if img is None or "cls" not in s:
                    missing = "jpg" if img is None else "cls"
                    problems.append(f"{name}: {key}: no .{missing} component (has {', '.join(s)})")
                    continue
                raw_cls = _member_bytes(tf, s["cls"][2])
                try:
                    lab = int(raw_cls.strip())
                    labels[lab] = labels.get(lab, 0) + 1
                except ValueError:
                    problems.append(f"{name}: {key}: .cls is not an integer: {raw_cls[:20]!r}")
                try:
                    with Image.open(io.BytesIO(_member_bytes(tf, img[2]))) as im:
                        im.load()
                        if im.format != "JPEG":
                            problems.append(f"{name}: {key}: image is {im.format}, not JPEG")
                except UnidentifiedImageError:
                    problems.append(f"{name}: {key}: image does not decode (not an image format PIL recognises)")
                except Exception as e:
                    problems.append(f"{name}: {key}: image does not decode ({type(e).__name__}: {e})")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: -: unreadable tar ({type(e).__name__}: {e})")
    idx = index_path(shard)
    if not idx.is_file():
        problems.append(f"{name}: -: index {idx.name} is missing (python -m fastmae.data.shards index)")
    else:
        try:
            indexed = read_index(idx)
            want = [{k: v[:2] for k, v in s.items()} for s in scanned]
            got = [{k: v[:2] for k, v in s.items()} for s in indexed]
            if want != got:
                pairs = enumerate(zip(want, got, strict=False))
                bad = next((i for i, (a, b) in pairs if a != b), min(len(want), len(got)))
                key = split_member(next(iter(scanned[bad].values()))[2])[0] if bad < len(scanned) else "-"
                problems.append(f"{name}: {key}: index {idx.name} does not match the tar (sample {bad})")
        except ShardError as e:
            problems.append(f"{name}: -: {e}")
    return len(scanned), problems, labels


def _member_bytes(tf: tarfile.TarFile, member: str) -> bytes:
    f = tf.extractfile(member)
    if f is None:
        raise tarfile.TarError(f"{member} is not a regular file")
    return f.read()


def verify_shards(spec: str, workers: int = 0, progress: bool = True) -> tuple[int, list[str]]:
    """Verify every shard of ``spec`` (directory, brace pattern, glob); returns (samples, problems)."""
    from tqdm import tqdm

    shards = expand_shards(spec)
    workers = workers or max(1, os.cpu_count() or 1)
    total, problems = 0, []
    labels: dict[int, int] = {}
    pool = _pool(workers)
    try:
        results = pool.imap(verify_shard, shards) if pool else map(verify_shard, shards)
        for n, probs, labs in tqdm(results, total=len(shards), unit="shard", disable=not progress):
            total += n
            problems.extend(probs)
            for k, v in labs.items():
                labels[k] = labels.get(k, 0) + v
    finally:
        if pool is not None:
            pool.terminate()
    cmap_file = (Path(spec) if Path(spec).is_dir() else shards[0].parent) / CLASSES_JSON
    if cmap_file.is_file() and labels:
        n_cls = len(json.loads(cmap_file.read_text()))
        bad = sorted(k for k in labels if not 0 <= k < n_cls)
        if bad:
            problems.append(f"{cmap_file}: -: labels {bad[:5]} outside the {n_cls} classes of {CLASSES_JSON}")
    return total, problems


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmae.data.shards", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write shards from an image folder or file list")
    w.add_argument("src", type=Path, help="ImageNet-layout folder, flat image folder, or file list")
    w.add_argument("out", type=Path, help="output folder")
    size = w.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=0, help="samples per shard (default 1000)")
    size.add_argument("--bytes-per-shard", type=_parse_bytes, default=0, help="bytes per shard, e.g. 1G")
    w.add_argument("--resize", type=int, default=0, help="shorter side at most this (0 = keep)")
    w.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    w.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    w.add_argument("--no-shuffle", action="store_true", help="keep the source order in the shards")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--prefix", default="", help="shard file name prefix, e.g. 'train-'")
    w.add_argument("--classes", type=Path, default=None, help="class map JSON to reuse (train's for val)")
    w.add_argument("--quiet", action="store_true")
    v = sub.add_parser("verify", help="verify shards (exit 1 naming the bad shard and key)")
    v.add_argument("shards", help="folder, brace pattern or glob of shards")
    v.add_argument("--workers", type=int, default=0)
    v.add_argument("--quiet", action="store_true")
    ix = sub.add_parser("index", help="(re)write the DALI index files of existing shards")
    ix.add_argument("shards")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "write":
            classes = json.loads(args.classes.read_text()) if args.classes else None
            rep = write_shards(
                args.src, args.out, samples_per_shard=args.samples_per_shard,
                bytes_per_shard=args.bytes_per_shard, resize=args.resize, quality=args.quality,
                workers=args.workers, shuffle=not args.no_shuffle, seed=args.seed,
                prefix=args.prefix, classes=classes, progress=not args.quiet,
            )
            skipped, shards = rep["skipped"], rep["shards"]
            assert isinstance(skipped, list) and isinstance(shards, list)
            print(f"wrote {rep['samples']} samples in {len(shards)} shards ({rep['converted']} re-encoded) "
                  f"to {rep['pattern']} in {rep['seconds']} s")
            if skipped:
                print(f"skipped {len(skipped)} images that do not decode (see {args.out / REPORT_JSON}):")
                for s in skipped[:20]:
                    print(f"  {s['path']}: {s['reason']}")
            return 0
        if args.cmd == "index":
            for shard in expand_shards(args.shards):
                make_index(shard)
            return 0
        total, problems = verify_shards(args.shards, workers=args.workers, progress=not args.quiet)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if problems:
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        print(f"verify: {len(problems)} problems in {args.shards} ({total} samples read)", file=sys.stderr)
        return 1
    print(f"verify: OK, {total} samples in {len(expand_shards(args.shards))} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
