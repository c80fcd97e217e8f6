"""Random access into WebDataset tar shards through DALI index files (``wds2idx`` format v1.2).

A shard ``x.tar`` has its index ``x.idx`` next to it: a header line ``v1.2 <samples>`` and one line per
sample, ``<ext> <data offset> <size> <member name>`` repeated for each component. With it, one sample
is two ``pread`` calls (``.jpg`` and ``.cls``), which is what lets both loaders shuffle globally,
split an epoch exactly between ranks and resume mid-epoch.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from pathlib import Path

import numpy as np

INDEX_VERSION = "v1.2"
IMAGE_EXTS = ("jpg", "jpeg")


class ShardError(RuntimeError):
    """Shards are missing, empty or malformed; the message names the path."""


def _expand_braces(pattern: str) -> list[str]:
    """Expand ``{000000..000127}`` numeric ranges and ``{a,b}`` lists (like webdataset / bash)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    out: list[str] = []
    for it in items:
        out.extend(_expand_braces(pattern[: m.start()] + it + pattern[m.end():]))
    return out


def expand_shards(spec: str | os.PathLike[str]) -> list[Path]:
    """Shard paths of ``spec``: a directory (every ``*.tar`` in it, sorted), a brace pattern, a glob,
    or a single file. Raises :class:`ShardError` naming ``spec`` when nothing is found."""
    text = os.fspath(spec)
    if not text:
        raise ShardError("empty shard path")
    p = Path(text).expanduser()
    if p.is_dir():
        paths = sorted(p.glob("*.tar"))
        if not paths:
            raise ShardError(f"no *.tar shards in directory {p}")
        return paths
    if "{" in text:
        paths = [Path(s).expanduser() for s in _expand_braces(text)]
        missing = [s for s in paths if not s.is_file()]
        if missing:
            raise ShardError(
                f"{len(missing)} of {len(paths)} shards of {text!r} do not exist, e.g. {missing[0]}"
            )
        return paths
    if any(c in text for c in "*?["):
        paths = sorted(Path(s) for s in glob.glob(os.path.expanduser(text)))
        if not paths:
            raise ShardError(f"no shards match {text!r}")
        return paths
    if p.is_file():
        return [p]
    raise ShardError(f"shard path {text!r} does not exist")


def index_path(shard: Path) -> Path:
    """Where the DALI index of ``shard`` lives (``x.tar`` -> ``x.idx``)."""
    return shard.with_suffix(".idx")


def split_member(name: str) -> tuple[str, str]:
    """``dir/key.a.b`` -> (``dir/key``, ``a.b``): the WebDataset rule (extension after the first dot
    of the basename), the same rule ``wds2idx`` uses."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def scan_tar(shard: Path) -> list[dict[str, tuple[int, int, str]]]:
    """Read a tar with :mod:`tarfile` and group its regular files into samples:
    one ``{ext: (data offset, size, member name)}`` per sample, in archive order."""
    samples: list[dict[str, tuple[int, int, str]]] = []
    last = None
    with tarfile.open(shard, "r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, ext = split_member(m.name)
            if not key or key.endswith("/"):
                continue
            if key != last:
                samples.append({})
                last = key
            samples[-1][ext] = (m.offset_data, m.size, m.name)
    return samples


def write_index(samples: list[dict[str, tuple[int, int, str]]], out: Path) -> None:
    """Write a ``wds2idx``-compatible index for ``samples`` (from :func:`scan_tar`)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for s in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, (off, size, name) in s.items()))
    out.write_text("\n".join(lines) + "\n")


def make_index(shard: Path, out: Path | None = None) -> Path:
    """Index ``shard`` with DALI's ``wds2idx`` when DALI is installed, else with the same format in Python."""
    out = out or index_path(shard)
    try:
        from wds2idx import IndexCreator  # installed with nvidia-dali as a top-level module
    except ImportError:
        write_index(scan_tar(shard), out)
        return out
    creator = IndexCreator(str(shard), str(out), verbose=False)
    try:
        creator.create_index()
    finally:
        creator.close()
    return out


def read_index(path: Path) -> list[dict[str, tuple[int, int, str]]]:
    """Parse a DALI index file into ``{ext: (offset, size, name)}`` per sample."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ShardError(f"cannot read index {path}: {e}") from e
    return parse_index(text, path)


def parse_index(text: str, path: Path | str) -> list[dict[str, tuple[int, int, str]]]:
    """Parse the text of a DALI index file (``path`` names it in errors)."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ShardError(f"index {path}: expected header '{INDEX_VERSION} <count>', got {lines[:1]}")
    out: list[dict[str, tuple[int, int, str]]] = []
    for ln in lines[1:]:
        parts = ln.split()
        if not parts:
            continue
        if len(parts) % 4:
            raise ShardError(f"index {path}: malformed line {ln!r}")
        out.append(
            {parts[i]: (int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)}
        )
    if len(out) != int(head[1]):
        raise ShardError(f"index {path}: header says {head[1]} samples, found {len(out)}")
    return out


# a tar ends with two 512-byte zero blocks, padded to a whole record (tarfile and GNU tar: 20 blocks)
_TAR_TAIL_MAX = 512 + 2 * 512 + 20 * 512


def check_index_matches(shard: Path | str, idx: Path | str, samples: list[dict[str, tuple[int, int, str]]],
                        size: int) -> None:
    """A stale index (the shard rewritten or truncated after indexing) would make reads return the wrong
    bytes or fewer bytes; caught at start: the last member the index names must end where the tar (of
    ``size`` bytes) ends."""
    end = max((off + n for s in samples for off, n, _ in s.values()), default=0)
    if end > size or size - end > _TAR_TAIL_MAX:
        how = "truncated" if end > size else "rewritten"
        raise ShardError(f"index {idx} does not match {shard}: it addresses bytes up to {end}, the shard has "
                         f"{size} (the shard was {how} after indexing, or the index belongs to another shard); "
                         f"rebuild it with `python -m fastmae.data.shards index {shard}`")


_FD_BUDGET: int | None = None
# most bytes between a sample's label and image that one read still covers (their tar headers, padding)
_ADJACENT = 4096


def _fd_budget() -> int:
    """How many shard files one process keeps open: a quarter of the descriptor limit, raised to the hard
    limit first (a DataLoader worker and DALI need descriptors of their own)."""
    global _FD_BUDGET
    if _FD_BUDGET is None:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = hard if hard != resource.RLIM_INFINITY else 65536
            if soft != resource.RLIM_INFINITY and soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))
                soft = min(want, 65536)
            _FD_BUDGET = max(16, min(4096, (soft if soft != resource.RLIM_INFINITY else 65536) // 4))
        except (ImportError, ValueError, OSError):
            _FD_BUDGET = 64
    return _FD_BUDGET


class ShardIndex:
    """All samples of a list of shards, addressable by a global index ``0..len-1`` (shard order, then
    archive order). File handles open lazily per process, so the object can be sent to DataLoader workers."""

    def __init__(self, shards: list[Path] | list[str], *,
                 samples: list[list[dict[str, tuple[int, int, str]]]] | None = None) -> None:
        # shards: local files, or (with ``samples``, their indexes already read) the names errors give them,
        # e.g. URLs of streamed shards (see fastmae.data.stream)
        self.shards: list[Path | str] = [s if isinstance(s, str) and "://" in s else Path(s) for s in shards]
        if not self.shards:
            raise ShardError("no shards given")
        cols: list[list[int]] = [[], [], [], [], []]
        keys: list[str] = []
        for sid, shard in enumerate(self.shards):
            if samples is not None:
                per_shard = samples[sid]
            elif not Path(shard).is_file():
                raise ShardError(f"shard {shard} does not exist")
            elif (idx := index_path(Path(shard))).is_file():
                per_shard = read_index(idx)
                check_index_matches(shard, idx, per_shard, Path(shard).stat().st_size)
            else:
                per_shard = scan_tar(Path(shard))
            for s in per_shard:
                img = next((s[e] for e in IMAGE_EXTS if e in s), None)
                if img is None:
                    name = next(iter(s.values()))[2]
                    raise ShardError(f"shard {shard}: sample {name} has no .jpg component")
                cls = s.get("cls", (0, 0, ""))
                cols[0].append(sid)
                cols[1].append(img[0])
                cols[2].append(img[1])
                cols[3].append(cls[0])
                cols[4].append(cls[1])
                keys.append(split_member(img[2])[0])
        if not keys:
            raise ShardError(f"shards {self.shards[0]} ... hold no samples")
        self.shard_of, self.img_off, self.img_len, self.cls_off, self.cls_len = (
            np.asarray(c, dtype=np.int64) for c in cols
        )
        # one compact byte array, not a list of str: ~40 MB instead of ~100 MB for ImageNet, and no
        # per-object refcounts for forked DataLoader workers to copy
        self._keys = np.array([k.encode() for k in keys], dtype=bytes)
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self._keys)

    def require_labels(self) -> None:
        """For the classification programs: a sample without a ``.cls`` label is an error naming the shard
        and key (pre-training reads such samples as label 0: unlabelled shards are fine there)."""
        missing = np.flatnonzero(self.cls_len == 0)
        if len(missing):
            i = int(missing[0])
            raise ShardError(f"{self.shard(i)}: {self.key(i)} has no .cls label "
                             f"({len(missing)} of {len(self)} samples have none); classification needs a label "
                             "per sample")

    def shard(self, i: int) -> Path | str:
        """The shard file holding sample ``i``."""
        return self.shards[int(self.shard_of[i])]

    def key(self, i: int) -> str:
        """The WebDataset key of sample ``i`` (its member name without extension)."""
        return self._keys[i].decode()

    def name(self, i: int) -> str:
        """``shard:key`` of sample ``i``, as error messages and the bad-sample count name it."""
        return f"{self.shard(i)}:{self.key(i)}"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"], state["_pid"] = {}, -1
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked into a worker: never share file offsets or descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _fd_budget():  # ImageNet has ~1000 shards: keep descriptors bounded
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.local_path(shard), os.O_RDONLY)
            self._fds[shard] = fd
        return fd

    def local_path(self, shard: int) -> Path:
        """The file to read shard number ``shard`` from."""
        return Path(self.shards[shard])

    def successor(self, i: int) -> int:
        """The sample data.on_error=skip tries after ``i``: the next one of the dataset (wrapping around)."""
        return (i + 1) % len(self)

    def _read(self, i: int, offset: int, n: int, ext: str) -> bytes:
        """``n`` bytes at ``offset`` of sample ``i``'s shard; a short read (the shard truncated while in use) is
        an error naming the shard and key."""
        raw = os.pread(self._fd(int(self.shard_of[i])), n, offset)
        if len(raw) != n:
            raise ShardError(f"{self.shard(i)}: {self.key(i)}.{ext}: short read, {len(raw)} of {n} bytes at offset "
                             f"{offset} (the shard is truncated or its index is stale)")
        return raw

    def read_image(self, i: int) -> bytes:
        """The encoded image bytes of sample ``i``."""
        return self._read(i, int(self.img_off[i]), int(self.img_len[i]), "jpg")

    def read_sample(self, i: int) -> tuple[bytes, int]:
        """(encoded image, label) of sample ``i``: one read when the two lie together in the tar (as the
        writer puts them, a member header apart), else one read each."""
        img_off, img_len = int(self.img_off[i]), int(self.img_len[i])
        cls_off, cls_len = int(self.cls_off[i]), int(self.cls_len[i])
        lo, hi = min(img_off, cls_off), max(img_off + img_len, cls_off + cls_len)
        if cls_len and hi - lo <= img_len + cls_len + _ADJACENT:
            raw = os.pread(self._fd(int(self.shard_of[i])), hi - lo, lo)
            if len(raw) == hi - lo:
                a, b = img_off - lo, cls_off - lo
                return raw[a:a + img_len], self._label(i, raw[b:b + cls_len])
        return self.read_image(i), self.read_label(i)  # (a short read is reported by the member it cuts)

    def read_label(self, i: int) -> int:
        """The integer label of sample ``i`` (ASCII ``.cls`` of any digit count; 0 when absent)."""
        n = int(self.cls_len[i])
        if n == 0:
            return 0
        return self._label(i, self._read(i, int(self.cls_off[i]), n, "cls"))

    def _label(self, i: int, raw: bytes) -> int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ShardError(f"{self.shard(i)}: {self.key(i)}.cls is not an integer: {raw!r}") from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
