"""Streaming remote shards (``data.read=stream``): no copy of the dataset; each rank fetches the shards of its
run of the epoch's shuffled shard sequence whole, a little ahead of use, into a spool under
``data.cache_dir``, and deletes each one once its last batch has gone to the trainer. See data/README.md.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .index import ShardError, ShardIndex, check_index_matches, parse_index
from .remote import (
    _fetch_one,
    _filesystem,
    _remote_size,
    default_cache_dir,
    expand_remote,
    require_present,
    store_error,
)

# how long a reader waits for a shard that is being fetched before it gives up (a stalled store)
WAIT_S = float(os.environ.get("FASTMAE_STREAM_WAIT_S", "600"))
# fetcher threads per rank (data.stream_fetchers): also how many shards are fetched beyond those the
# prefetched batches need, so each fetcher has one to work on
FETCHERS = 4


def _index_url(url: str) -> str:
    return (url[:-4] if url.endswith(".tar") else url) + ".idx"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StreamIndex(ShardIndex):
    """A :class:`ShardIndex` of remote shards (named by URL in errors) read from a spool folder: opening a
    shard waits until the spool has it (or says why it cannot)."""

    def __init__(self, urls: list[str], samples: list[list[dict[str, tuple[int, int, str]]]], folder: Path) -> None:
        super().__init__(urls, samples=samples)
        self.folder = folder

    def local_path(self, shard: int) -> Path:
        path = spool_file(self.folder, shard)
        failed = path.with_suffix(".failed")
        waited, nap = 0.0, 0.002
        while not path.is_file():
            if failed.is_file():
                raise ShardError(failed.read_text())
            if waited > WAIT_S:
                raise ShardError(f"shard {self.shards[shard]} did not arrive within {WAIT_S:.0f} s (the store is "
                                 "stalled or unreachable; FASTMAE_STREAM_WAIT_S sets the wait)")
            time.sleep(nap)
            waited += nap
            nap = min(0.05, nap * 2)
        return path

    def _fd(self, shard: int) -> int:
        if self._pid == os.getpid():
            fd = self._fds.get(shard)
            if fd is not None and os.fstat(fd).st_nlink == 0:  # deleted by the spool: wait for its next copy
                os.close(self._fds.pop(shard))
            if shard not in self._fds:  # let go of other deleted shards too (their space is freed on close)
                for sid, fd in list(self._fds.items()):
                    if os.fstat(fd).st_nlink == 0:
                        os.close(self._fds.pop(sid))
        return super()._fd(shard)

    def successor(self, i: int) -> int:
        """The next sample of the same shard (wrapping around inside it): one the spool holds."""
        sid = self.shard_of[i]
        j = i + 1
        if j >= len(self) or self.shard_of[j] != sid:
            j = int(np.searchsorted(self.shard_of, sid))  # the shard's first sample
        return j


def spool_file(folder: Path, shard: int) -> Path:
    return folder / f"{shard:06d}.tar"


class ShardSpool:
    """Fetches one rank's shards just ahead of use and deletes them after (see the module docstring).

    :meth:`schedule` gives it an epoch's shard uses, ``(shard, first batch, last batch)`` in order of first
    use; :meth:`advance` tells it how many batches were handed out. ``fetched`` lists every shard fetched.
    """

    def __init__(self, fs: Any, urls: list[str], sizes: list[int | None], folder: Path,
                 fetchers: int = FETCHERS) -> None:
        self.fs, self.urls, self.sizes, self.folder = fs, urls, sizes, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.fetched: list[int] = []
        self.error: str | None = None
        self._cv = threading.Condition()
        self._uses: list[tuple[int, int, int]] = []
        self._firsts = np.empty(0, dtype=np.int64)
        self._next = 0  # next entry of _uses to fetch
        self._handed = 0
        self._ahead = 1
        self._live: set[int] = set()  # shards on disk or being fetched
        self._extra = max(1, fetchers)
        self._closed = False
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"fastmae-spool-{i}")
                         for i in range(max(1, fetchers))]
        for t in self._threads:
            t.start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ driven by the loader
    def schedule(self, uses: list[tuple[int, int, int]], ahead: int) -> None:
        """A new epoch (or a resumed one): fetch ``uses`` in order; ``ahead`` batches may be read before they
        are handed out."""
        with self._cv:
            self._uses = uses
            self._firsts = np.asarray([u[1] for u in uses], dtype=np.int64)
            self._next, self._handed, self._ahead = 0, 0, max(1, ahead)
            keep = {u[0] for u in uses}
            for sid in list(self._live):
                if sid not in keep:
                    self._drop(sid)
            self._cv.notify_all()

    def advance(self, handed: int) -> None:
        """``handed`` batches of the schedule have been handed out: shards no later batch needs go."""
        with self._cv:
            self._handed = handed
            for sid, _, last in self._uses[: self._next]:
                if last < handed and sid in self._live:
                    self._drop(sid)
            self._cv.notify_all()
        if self.error is not None:
            raise ShardError(self.error)

    def close(self) -> None:
        """Stop fetching and remove the spool folder (also at exit)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------ fetching
    def _drop(self, sid: int) -> None:
        self._live.discard(sid)
        path = spool_file(self.folder, sid)
        path.unlink(missing_ok=True)
        (path.parent / f".{path.name}.lock").unlink(missing_ok=True)

    def _wanted(self) -> bool:
        """Whether the next shard of the schedule is due: first needed by a batch that may already be read,
        or one of the next ``fetchers`` after those."""
        if self._next >= len(self._uses):
            return False
        due = int(np.searchsorted(self._firsts, self._handed + self._ahead, side="left"))
        return self._next < due + self._extra

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._wanted():
                    self._cv.wait()
                if self._closed:
                    return
                sid = self._uses[self._next][0]
                self._next += 1
                if sid in self._live:
                    continue
                self._live.add(sid)
            dest = spool_file(self.folder, sid)
            try:
                _fetch_one(self.fs, self.urls[sid], dest, self.sizes[sid])
            except Exception as e:  # the readers waiting for it must hear why
                msg = e.args[0] if isinstance(e, ShardError) else f"shard {self.urls[sid]}: {type(e).__name__}: {e}"
                dest.with_suffix(".failed").write_text(msg)
                self.error = msg
                continue
            with self._cv:
                self.fetched.append(sid)
                if sid not in self._live:  # dropped (rescheduled) while it was on its way
                    dest.unlink(missing_ok=True)


_SPOOLS = itertools.count()


def _spool_name(rank: int) -> str:
    """``<host>-<pid>-rank<r>-<n>``: the host keeps nodes that share a cache folder (NFS) out of each other's
    way, ``n`` the loaders of one process (fine-tuning streams its training and validation shards)."""
    return f"{socket.gethostname()}-{os.getpid()}-rank{rank}-{next(_SPOOLS)}"


def _clean_stale(root: Path) -> None:
    """Spool folders of this host's processes that are gone (a killed run) are removed."""
    if not root.is_dir():
        return
    host = socket.gethostname() + "-"
    for d in root.iterdir():
        if not d.name.startswith(host):
            continue
        pid = d.name[len(host):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def open_stream(spec: str, cache_dir: str | os.PathLike[str] | None, rank: int, *, fetchers: int = FETCHERS,
                log: Any = None) -> tuple[StreamIndex, ShardSpool]:
    """The index of the remote shards of ``spec`` (each shard's ``.idx`` read from the store, checked against
    the shard's size) and this rank's spool (in ``cache_dir/stream/<host>-<pid>-rank<r>-<n>``)."""
    fs = _filesystem(spec)
    urls = expand_remote(spec, fs)

    def meta(url: str) -> tuple[int | None, list[dict[str, tuple[int, int, str]]] | None]:
        size = _remote_size(fs, url)
        if size == -1:
            return -1, None
        try:
            text = fs.cat_file(_index_url(url)).decode()
        except FileNotFoundError:
            return size, None
        except Exception as e:  # noqa: BLE001 - the store's own errors
            raise store_error(_index_url(url), e) from e
        samples = parse_index(text, _index_url(url))
        if size is not None:
            check_index_matches(url, _index_url(url), samples, size)
        return size, samples

    with ThreadPoolExecutor(max(1, min(16, len(urls)))) as pool:
        found = list(pool.map(meta, urls))
    require_present(spec, urls, [n for n, _ in found])
    unindexed = [u for u, (_, s) in zip(urls, found, strict=True) if s is None]
    if unindexed:
        raise ShardError(f"{len(unindexed)} of {len(urls)} shards of {spec!r} have no index next to them, e.g. "
                         f"{_index_url(unindexed[0])}: streaming reads each shard's .idx first (`python -m "
                         "fastmae.data.shards write` makes them; `... shards index SHARD` for others; upload them "
                         "with the shards), or set data.read=global to fetch whole shards into data.cache_dir")
    root = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "stream"
    _clean_stale(root)
    folder = root / _spool_name(rank)
    shutil.rmtree(folder, ignore_errors=True)
    index = StreamIndex(urls, [s for _, s in found], folder)  # type: ignore[misc]
    spool = ShardSpool(fs, urls, [n for n, _ in found], folder, fetchers=fetchers)
    if log is not None:
        log(f"shards: {len(urls)} streamed from {spec} ({len(index)} samples; spool {root})")
    return index, spool
