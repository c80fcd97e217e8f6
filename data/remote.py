"""Shards in object storage or behind HTTP(S) (``s3://``, ``gs://``, ``http(s)://``, through fsspec): each
shard is fetched once per node, as one sequential read, into ``data.cache_dir`` and then read exactly like a
local shard (``data.read=global``). See data/README.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .index import ShardError, _expand_braces, make_index

SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
CHUNK = 8 << 20


def is_remote(spec: str) -> bool:
    """Whether ``spec`` names shards behind a URL scheme fastmae fetches (s3, gs, http, https)."""
    head, sep, _ = str(spec).partition("://")
    return bool(sep) and head.lower() in SCHEMES


def default_cache_dir() -> Path:
    """``$FASTMAE_CACHE_DIR``, else ``~/.cache/fastmae/shards``."""
    env = os.environ.get("FASTMAE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastmae" / "shards"


def _filesystem(url: str) -> Any:
    scheme = url.partition("://")[0].lower()
    try:
        import fsspec
    except ImportError as e:
        raise ImportError(f"reading {url} needs fsspec and {SCHEMES[scheme]}: pip install 'fastmae[remote]'") from e
    try:
        # a fresh instance: the environment (credentials, endpoint) is read now, not when a cached one was made
        return fsspec.filesystem(scheme, skip_instance_cache=True)
    except (ImportError, ValueError) as e:
        raise ImportError(f"reading {scheme}:// shards needs {SCHEMES[scheme]}: pip install {SCHEMES[scheme]} "
                          f"({type(e).__name__}: {e})") from e


def _join(scheme: str, path: str) -> str:
    """A path fsspec listed -> a full URL (object stores list without the scheme)."""
    return path if "://" in path else f"{scheme}://{path}"


def expand_remote(spec: str, fs: Any | None = None) -> list[str]:
    """Shard URLs of ``spec``: a brace pattern, a glob (object stores only), a folder ending in ``/`` (its
    ``*.tar``, sorted; object stores only) or one URL. Existence is checked when the shards are fetched."""
    if "{" in spec:
        return _expand_braces(spec)
    fs = fs or _filesystem(spec)
    scheme = spec.partition("://")[0].lower()
    listable = scheme not in ("http", "https")
    if listable and spec.endswith("/"):
        urls = sorted(_join(scheme, p) for p in fs.glob(spec.rstrip("/") + "/*.tar"))
        if not urls:
            raise ShardError(f"no *.tar shards under {spec}")
        return urls
    if listable and any(c in spec.partition("://")[2] for c in "*?["):
        urls = sorted(_join(scheme, p) for p in fs.glob(spec))
        if not urls:
            raise ShardError(f"no shards match {spec!r}")
        return urls
    return [spec]


def cache_path(url: str, cache_dir: Path) -> Path:
    """Where ``url`` is kept: ``cache_dir/<hash of its folder URL>/<file name>`` (shards of different
    datasets with the same names never collide)."""
    folder, _, name = url.rpartition("/")
    if not name:
        raise ShardError(f"shard URL {url!r} names no file")
    return cache_dir / hashlib.sha1(folder.encode()).hexdigest()[:16] / name


def _remote_size(fs: Any, url: str) -> int | None:
    """The object's size (None when the store does not say); -1 when it does not exist."""
    try:
        info = fs.info(url)
    except FileNotFoundError:
        return -1
    except PermissionError as e:
        raise ShardError(f"shard {url}: access denied ({e}); set the store's credentials in the environment "
                         "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL)") from None
    except Exception as e:  # noqa: BLE001 - the store's own errors (no connection, bad endpoint, throttling)
        raise store_error(url, e) from e
    size = info.get("size")
    return int(size) if size is not None else None


def require_present(spec: str, urls: list[str], sizes: list[int | None]) -> None:
    """Every shard must exist (``sizes`` from :func:`_remote_size`, -1 = missing), checked before any is read."""
    missing = [u for u, n in zip(urls, sizes, strict=True) if n == -1]
    if missing:
        raise ShardError(f"{len(missing)} of {len(urls)} shards of {spec!r} do not exist (or are not readable with "
                         f"the credentials in the environment), e.g. {missing[0]}")


def store_error(url: str, e: BaseException) -> ShardError:
    """A store's failure on ``url`` as an error naming it and what to check."""
    return ShardError(f"shard {url}: the store failed ({type(e).__name__}: {e}); check the endpoint "
                      "(AWS_ENDPOINT_URL), the credentials and the network")


def _fetch_one(fs: Any, url: str, dest: Path, size: int | None) -> bool:
    """Fetch ``url`` to ``dest`` unless a copy of ``size`` bytes is there; True when it was fetched."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank of this node may be fetching it
        if dest.is_file() and (size is None or dest.stat().st_size == size):
            return False
        tmp = dest.parent / f".{dest.name}.part.{os.getpid()}"
        got = 0
        try:
            with fs.open(url, "rb", block_size=CHUNK) as src, open(tmp, "wb") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    got += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size is not None and got != size:
                raise ShardError(f"shard {url}: fetched {got} bytes, the store reports {size}: the transfer "
                                 "was cut short")
            os.replace(tmp, dest)
            idx = dest.with_suffix(".idx")
            if idx.exists():
                idx.unlink()  # an index of an older copy
        except FileNotFoundError as e:
            raise ShardError(f"shard {url} could not be read: it is no longer in the store ({type(e).__name__})") \
                from None
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001 - the store's own errors (a connection cut mid-transfer)
            raise store_error(url, e) from e
        finally:
            if tmp.exists():
                tmp.unlink()
    return True


def fetch_shards(spec: str, cache_dir: str | os.PathLike[str] | None = None, *, workers: int = 8,
                 progress: bool = False, log: Callable[[str], None] | None = None) -> list[Path]:
    """Local copies of the shards of ``spec`` (see :func:`expand_remote`), fetching the missing ones with
    ``workers`` threads; each copy gets its index (made locally from the tar: one sequential read)."""
    fs = _filesystem(spec)
    urls = expand_remote(spec, fs)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dests = [cache_path(u, cache) for u in urls]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(urls), unit="shard", desc="shards", file=sys.stderr, disable=not sys.stderr.isatty())
    done = threading.Lock()
    fetched = [0]

    def one(i: int) -> None:
        if _fetch_one(fs, urls[i], dests[i], sizes[i]):
            with done:
                fetched[0] += 1
        idx = dests[i].with_suffix(".idx")
        with open(dests[i].parent / f".{dests[i].name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not idx.exists():
                part = idx.parent / f".{idx.name}.part.{os.getpid()}"
                make_index(dests[i], part)
                os.replace(part, idx)
        if bar is not None:
            bar.update(1)

    try:
        with ThreadPoolExecutor(max(1, min(workers, len(urls)))) as pool:
            sizes = list(pool.map(lambda u: _remote_size(fs, u), urls))  # every shard is checked before any fetch
            require_present(spec, urls, sizes)
            list(pool.map(one, range(len(urls))))
    finally:
        if bar is not None:
            bar.close()
    if log is not None:
        log(f"shards: {len(urls)} from {spec} in {cache} ({fetched[0]} fetched, {len(urls) - fetched[0]} cached)")
    return dests
