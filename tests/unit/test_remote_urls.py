"""Remote shard URLs without a store: which paths are remote, brace expansion, cache names, and a store that does
not answer. Shards read from real S3 and HTTP servers: tests/integration/test_remote.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastmae.data import ShardError, build_loader
from fastmae.data.remote import cache_path, expand_remote, is_remote
from storeutil import S3_CREDENTIALS
from storeutil import remote_loader_cfg as _cfg

pytest.importorskip("s3fs", reason="s3fs (fastmae[remote]) is not installed")


def test_urls_and_cache_names() -> None:
    assert is_remote("s3://b/x.tar") and is_remote("HTTPS://h/x.tar") and is_remote("gs://b/{0..3}.tar")
    assert not is_remote("/data/x.tar") and not is_remote("file:///data/x.tar") and not is_remote("")
    assert expand_remote("https://h/d/{000..002}.tar") == [f"https://h/d/{i:03d}.tar" for i in range(3)]
    a, b = cache_path("s3://one/train/0.tar", Path("/c")), cache_path("s3://two/train/0.tar", Path("/c"))
    assert a.name == b.name == "0.tar" and a.parent != b.parent  # datasets with the same names never collide


def test_an_unreachable_store_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No S3 server at the endpoint: a ShardError naming the shard and what to check, for both ways of reading."""
    from storeutil import free_port

    for k, v in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                 "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    for read in ("stream", "global"):
        with pytest.raises(ShardError, match=r"shard s3://nowhere/000000.tar: the store failed .*AWS_ENDPOINT_URL"):
            build_loader(_cfg("torch", "s3://nowhere/{000000..000001}.tar", tmp_path, read=read), img_size=32)
