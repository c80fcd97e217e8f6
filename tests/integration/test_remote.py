"""Shards behind s3:// (a real S3-compatible server, moto's server mode, started here) and http:// (Python's
HTTP server): streamed (data.read=stream: the same batches as the streamed order of the local copies, shards
fetched just ahead of use and deleted after, exact resume) and fetched once into the cache folder
(data.read=global: read exactly like the local copies), on both backends. URLs, cache names and a store that does
not answer: tests/unit/test_remote_urls.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastmae.data import ShardError, build_loader, dali_available
from fastmae.data.remote import cache_path
from fastmae.data.shards import write_shards
from storeutil import S3_CREDENTIALS, delete, start_http_server, start_s3_server, stop, upload
from storeutil import remote_loader_cfg as _cfg

pytest.importorskip("s3fs", reason="s3fs not installed: pip install -e '.[remote]'")
NO_DALI = "nvidia.dali not installed: pip install -e '.[dali]'"
BACKENDS = [
    "torch",
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason=NO_DALI)),
]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory, id_shards: Path) -> Path:
    """The same 48 photos in 12 shards of 4 (label = sample), with their indexes."""
    root = tmp_path_factory.mktemp("small")
    lines = [f"{p} {int(p.stem[3:])}" for p in sorted((id_shards.parent / "src").glob("img*.jpg"))]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    write_shards(root / "list.txt", root / "shards", samples_per_shard=4, workers=1, shuffle=False, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, id_shards: Path, small_shards: Path) -> Iterator[str]:
    """The endpoint of a moto S3 server holding the shards with their indexes under s3://photos/train/ and
    s3://photos/small/, the tars alone under s3://photos/bare/, a shard with another shard's index under
    s3://photos/stale/."""
    proc, endpoint = start_s3_server(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        tars = sorted(id_shards.glob("*.tar"))
        upload(endpoint, "photos", "train", tars + sorted(id_shards.glob("*.idx")))
        upload(endpoint, "photos", "small", sorted(small_shards.glob("*.tar")) + sorted(small_shards.glob("*.idx")))
        upload(endpoint, "photos", "bare", tars)
        stale = tmp_path_factory.mktemp("stale")
        (stale / "000000.tar").write_bytes(tars[0].read_bytes())
        (stale / "000000.idx").write_bytes((small_shards / "000000.idx").read_bytes())
        upload(endpoint, "photos", "stale", [stale / "000000.tar", stale / "000000.idx"])
        yield endpoint
    finally:
        stop(proc)


@pytest.fixture
def s3_env(s3: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3}.items():
        monkeypatch.setenv(k, v)
    return s3


def _epoch(loader: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2])
def test_s3_shards_read_exactly_like_the_local_copies(backend: str, world: int, s3_env: str, id_shards: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = "s3://photos/train/{000000..000002}.tar"
    remote = [build_loader(_cfg(backend, url, tmp_path / "cache"), img_size=32, rank=r, world_size=world, seed=3)
              for r in range(world)]
    assert "3 from s3://photos/train/{000000..000002}.tar" in capsys.readouterr().out
    local = [build_loader(_cfg(backend, str(id_shards), tmp_path / "unused"), img_size=32, rank=r,
                          world_size=world, seed=3) for r in range(world)]
    labels = []
    for r in range(world):
        got, ref = _epoch(remote[r]), _epoch(local[r])
        assert len(got) == len(ref) > 0
        for (xa, ya), (xb, yb) in zip(got, ref, strict=True):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
        labels += [v for _, y in got for v in y.tolist()]
    assert sorted(labels) == list(range(48)), "every sample exactly once per epoch across ranks"
    # a second loader reads the cache: nothing fetched; a folder URL names the same shards
    again = build_loader(_cfg(backend, "s3://photos/train/", tmp_path / "cache"), img_size=32, seed=3)
    assert "(0 fetched, 3 cached)" in capsys.readouterr().out
    assert again.num_samples == 48


def test_s3_errors_name_the_shard(s3_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ShardError, match=r"5 of 8 shards of .* do not exist .* e.g. s3://photos/train/000003.tar"):
        build_loader(_cfg("torch", "s3://photos/train/{000000..000007}.tar", tmp_path), img_size=32)
    with pytest.raises(ShardError, match="no \\*.tar shards under s3://photos/nothing/"):
        build_loader(_cfg("torch", "s3://photos/nothing/", tmp_path), img_size=32)
    # a cached copy cut short (a full disk, an older file) is fetched again, not trusted
    url = "s3://photos/train/000001.tar"
    build_loader(_cfg("torch", url, tmp_path), img_size=32)
    copy = cache_path(url, tmp_path)
    whole = copy.read_bytes()
    copy.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    loader = build_loader(_cfg("torch", url, tmp_path), img_size=32)
    assert "(1 fetched, 0 cached)" in capsys.readouterr().out
    assert copy.read_bytes() == whole and loader.num_samples == 16
    assert not list(copy.parent.glob(".*.part.*")), "no partial files left behind"


def test_http_shards_read_like_local_ones(id_shards: Path, tmp_path: Path) -> None:
    proc, base = start_http_server(id_shards, tmp_path / "http.log")
    try:
        loader = build_loader(_cfg("torch", base + "/{000000..000002}.tar", tmp_path / "cache"), img_size=32)
        ref = build_loader(_cfg("torch", str(id_shards), tmp_path / "unused"), img_size=32)
        assert [y.tolist() for _, y in loader] == [y.tolist() for _, y in ref]
        with pytest.raises(ShardError, match="000009.tar"):
            build_loader(_cfg("torch", base + "/000009.tar", tmp_path / "cache"), img_size=32)
    finally:
        stop(proc)


# ----------------------------------------------------------------------------- streaming (data.read=stream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2])
def test_streamed_s3_shards(backend: str, world: int, s3_env: str, small_shards: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """The streamed order of s3:// shards gives the same batches as the streamed order of the local copies;
    each rank reads one contiguous run of the shuffled shard sequence (every sample once per epoch across
    ranks), holds only the shards in use (each fetched once per epoch) and leaves nothing behind."""
    url = "s3://photos/small/{000000..000011}.tar"
    kw = dict(read="stream", shuffle_buffer=4)
    remote = [build_loader(_cfg(backend, url, tmp_path, stream_fetchers=1, **kw), img_size=32, rank=r,
                           world_size=world, seed=5) for r in range(world)]
    assert "12 streamed from s3://photos/small/" in capsys.readouterr().out  # "auto" picks stream for remote shards
    local = [build_loader(_cfg(backend, str(small_shards), tmp_path, **kw), img_size=32, rank=r, world_size=world,
                          seed=5) for r in range(world)]
    for epoch in range(2):
        labels = []
        for r in range(world):
            spool = remote[r].spool
            got, held = [], []
            for x, y in remote[r]:
                got.append((x.clone(), y.clone()))
                held.append(len(list(spool.folder.glob("*.tar"))))
            ref = _epoch(local[r])
            assert len(got) == len(ref) > 0
            for (xa, ya), (xb, yb) in zip(got, ref, strict=True):
                assert torch.equal(ya, yb) and torch.equal(xa, xb)
            mine = [v for _, y in got for v in y.tolist()]
            shards = sorted({v // 4 for v in mine})
            assert len(shards) == 12 // world, shards  # a run of whole shards of the shuffled sequence
            assert max(held) <= 7, held  # the shards in use and the next one, never the whole dataset
            assert sorted(spool.fetched[-len(shards):]) == shards, "each shard of the run fetched once"
            labels += mine
        assert sorted(labels) == list(range(48)), f"epoch {epoch}: every sample exactly once across ranks"
    for loader in remote:
        folder = loader.spool.folder
        loader.close()
        assert not folder.exists(), "the spool folder goes with the loader"
        with pytest.raises(RuntimeError, match="was closed"):  # not a wait for shards nobody fetches
            next(iter(loader))


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_resume_fetches_only_what_is_left(backend: str, s3_env: str, tmp_path: Path) -> None:
    """A loader restored from a mid-epoch state yields exactly the uninterrupted run's remaining batches and
    fetches only the shards that still have samples to give."""
    cfg = _cfg(backend, "s3://photos/small/{000000..000011}.tar", tmp_path, read="stream", shuffle_buffer=4)
    full = build_loader(cfg, img_size=32, seed=9)
    ref = _epoch(full)
    full.close()
    first = build_loader(cfg, img_size=32, seed=9)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    first.close()
    again = build_loader(cfg, img_size=32, seed=9)
    again.load_state_dict(state)
    rest = _epoch(again)
    assert len(head) + len(rest) == len(ref)
    for (xa, ya), (xb, yb) in zip(rest, ref[7:], strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    left = {v // 4 for _, y in rest for v in y.tolist()}
    assert set(again.spool.fetched) == left and len(left) < 12, (again.spool.fetched, left)
    again.close()
    # another order mid-epoch would lose or repeat samples: refused
    other = build_loader(dataclasses.replace(cfg, shuffle_buffer=8), img_size=32, seed=9)
    with pytest.raises(ValueError, match="data.shuffle_buffer=4.*resume with the old settings"):
        other.load_state_dict(state)
    other.close()


def test_streamed_errors_name_the_shard(s3_env: str, small_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"3 of 3 shards .* have no index next to them, e.g. "
                                         r"s3://photos/bare/000000.idx.*data.read=global"):
        build_loader(_cfg("torch", "s3://photos/bare/{000000..000002}.tar", tmp_path, read="stream"), img_size=32)
    with pytest.raises(ShardError, match="index s3://photos/stale/000000.idx does not match s3://photos/stale/000000"):
        build_loader(_cfg("torch", "s3://photos/stale/000000.tar", tmp_path, read="stream"), img_size=32)
    with pytest.raises(ShardError, match=r"1 of 13 shards .* do not exist .* e.g. s3://photos/small/000012.tar"):
        build_loader(_cfg("torch", "s3://photos/small/{000000..000012}.tar", tmp_path, read="stream"), img_size=32)
    # a shard that disappears from the store while the run reads the dataset: the read names it
    upload(s3_env, "photos", "going", sorted(small_shards.glob("*")))
    loader = build_loader(_cfg("torch", "s3://photos/going/{000000..000011}.tar", tmp_path, read="stream",
                               shuffle_buffer=4), img_size=32)
    delete(s3_env, "photos", "going/000005.tar")
    with pytest.raises(ShardError, match="s3://photos/going/000005.tar"):
        _epoch(loader)
    loader.close()


def test_streamed_http_shards(id_shards: Path, tmp_path: Path) -> None:
    proc, base = start_http_server(id_shards, tmp_path / "http.log")
    try:
        url = base + "/{000000..000002}.tar"
        loader = build_loader(_cfg("torch", url, tmp_path, read="auto"), img_size=32, seed=1)
        ref = build_loader(_cfg("torch", str(id_shards), tmp_path, read="stream"), img_size=32, seed=1)
        got = [y.tolist() for _, y in loader]
        assert got == [y.tolist() for _, y in ref] and sorted(v for y in got for v in y) == list(range(48))
        loader.close()
    finally:
        stop(proc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_shards_through_worker_processes(backend: str, s3_env: str, small_shards: Path,
                                                  tmp_path: Path) -> None:
    """Worker processes (DALI's feed processes, the GPU default; DataLoader workers) read streamed shards from
    the spool: the batches are those of the in-process readers on the local files. A spool folder left by a
    killed process of this host is removed at start; another host's is not touched."""
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / "stream" / f"{socket.gethostname()}-{gone.pid}-rank0-0"
    other = tmp_path / "stream" / f"another-host-{gone.pid}-rank0-0"
    for d in (stale, other):
        d.mkdir(parents=True)
        (d / "000001.tar").write_bytes(b"left behind")
    kw = dict(read="stream", shuffle_buffer=4)
    workers = dict(feed_workers=2) if backend == "dali" else dict(num_workers=2)
    in_process = dict(feed_workers=0) if backend == "dali" else dict(num_workers=0)
    remote = build_loader(_cfg(backend, "s3://photos/small/{000000..000011}.tar", tmp_path, **workers, **kw),
                          img_size=32, seed=2)
    assert not stale.exists() and other.exists()
    local = build_loader(_cfg(backend, str(small_shards), tmp_path, **in_process, **kw), img_size=32, seed=2)
    got, ref = _epoch(remote), _epoch(local)
    assert len(got) == len(ref) == 12
    for (xa, ya), (xb, yb) in zip(got, ref, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    remote.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_damaged_image_names_the_url_and_key(backend: str, s3_env: str, small_shards: Path,
                                                      tmp_path: Path) -> None:
    from fastmae.data import ShardIndex

    index = ShardIndex([small_shards / "000000.tar"])
    raw = bytearray((small_shards / "000000.tar").read_bytes())
    off = int(index.img_off[1])
    raw[off:off + 4] = b"XXXX"  # no JPEG (or any image) header any more
    (tmp_path / "000000.tar").write_bytes(bytes(raw))
    (tmp_path / "000000.idx").write_bytes((small_shards / "000000.idx").read_bytes())
    upload(s3_env, "photos", "damaged", [tmp_path / "000000.tar", tmp_path / "000000.idx"])
    loader = build_loader(_cfg(backend, "s3://photos/damaged/000000.tar", tmp_path / "cache", read="stream"),
                          img_size=32)
    with pytest.raises(ShardError, match=f"s3://photos/damaged/000000.tar: {index.key(1)}: image"):
        _epoch(loader)
    loader.close()


def test_two_streamed_loaders_of_one_process(s3_env: str, tmp_path: Path) -> None:
    """Training and validation shards streamed by one process (fine-tuning): each loader has its own spool, and
    reading them in turn gives each its whole epoch."""
    url = "s3://photos/small/{000000..000011}.tar"
    train = build_loader(_cfg("torch", url, tmp_path, read="stream", shuffle_buffer=4), img_size=32, seed=1)
    val = build_loader(_cfg("torch", url, tmp_path, read="stream"), img_size=32, mode="eval")
    assert train.spool.folder != val.spool.folder
    for _ in range(2):
        got_train = [v for _, y in train for v in y.tolist()]
        got_val = [v for _, y in val for v in y.tolist()]
        assert sorted(got_train) == sorted(got_val) == list(range(48)) and got_val == list(range(48))
    train.close()
    val.close()
