"""Shards behind s3:// (a real S3-compatible server, moto's server mode, started here) and http:// (Python's
HTTP server): fetched once into the cache folder, then read exactly like the local copies, on both backends."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastmae.data import ShardError, build_loader, dali_available
from fastmae.data.remote import cache_path, expand_remote, is_remote
from storeutil import S3_CREDENTIALS, start_http_server, start_s3_server, stop, upload

from fastmae.config import DataConfig

pytest.importorskip("s3fs", reason="s3fs (fastmae[remote]) is not installed")
BACKENDS = [
    "torch",
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="nvidia.dali not installed")),
]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, id_shards: Path) -> Iterator[str]:
    """The endpoint of a moto S3 server holding the shards (tars only) under s3://photos/train/."""
    proc, endpoint = start_s3_server(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        upload(endpoint, "photos", "train", sorted(id_shards.glob("*.tar")))
        yield endpoint
    finally:
        stop(proc)


@pytest.fixture
def s3_env(s3: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3}.items():
        monkeypatch.setenv(k, v)
    return s3


def _cfg(backend: str, shards: str, cache: Path, batch: int = 4) -> DataConfig:
    return dataclasses.replace(DataConfig(), backend=backend, shards=shards, batch_size=batch, drop_last=False,
                               num_workers=1 if backend == "dali" else 0, cache_dir=str(cache))


def _epoch(loader: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]  # type: ignore[attr-defined]


def test_urls_and_cache_names() -> None:
    assert is_remote("s3://b/x.tar") and is_remote("HTTPS://h/x.tar") and is_remote("gs://b/{0..3}.tar")
    assert not is_remote("/data/x.tar") and not is_remote("file:///data/x.tar") and not is_remote("")
    assert expand_remote("https://h/d/{000..002}.tar") == [f"https://h/d/{i:03d}.tar" for i in range(3)]
    a, b = cache_path("s3://one/train/0.tar", Path("/c")), cache_path("s3://two/train/0.tar", Path("/c"))
    assert a.name == b.name == "0.tar" and a.parent != b.parent  # datasets with the same names never collide


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
