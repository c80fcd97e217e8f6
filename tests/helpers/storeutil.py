"""Real servers for the remote-shard tests: an S3-compatible server (moto's server mode, a separate process)
and a plain HTTP server, each on a free port; :func:`stop` ends them (and any other server a test starts). Also
the loader settings those tests read remote shards with."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastmae.config import DataConfig

# what boto3 / s3fs read from the environment; the endpoint comes only from AWS_ENDPOINT_URL
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "fastmae-test", "AWS_SECRET_ACCESS_KEY": "fastmae-test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def remote_loader_cfg(backend: str, shards: str, cache: Path, batch: int = 4, read: str = "global",
                      **kw: object) -> DataConfig:
    fields: dict[str, object] = dict(backend=backend, shards=shards, batch_size=batch, drop_last=False,
                                     num_workers=1 if backend == "dali" else 0, cache_dir=str(cache), read=read)
    return dataclasses.replace(DataConfig(), **{**fields, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def start_s3_server(log: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server on a free port: (process, endpoint URL)."""
    port = free_port()
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_listening(port, proc, "moto S3 server")
    return proc, f"http://127.0.0.1:{port}"


def start_http_server(folder: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Python's HTTP file server on ``folder``: (process, base URL)."""
    port = free_port()
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(folder)], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    _wait_listening(port, proc, "HTTP server")
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def s3_env(endpoint: str) -> dict[str, str]:
    """This process's environment plus the test store's credentials and endpoint."""
    return {**os.environ, **S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


def upload(endpoint: str, bucket: str, prefix: str, files: list[Path]) -> None:
    """Create ``bucket`` (unless it exists) and put ``files`` under ``prefix`` with boto3."""
    with _client(endpoint) as s3:
        if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=bucket)
        for f in files:
            s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def delete(endpoint: str, bucket: str, key: str) -> None:
    """Remove one object from the store (a shard that disappears while a run reads the dataset)."""
    with _client(endpoint) as s3:
        s3.delete_object(Bucket=bucket, Key=key)


@contextlib.contextmanager
def _client(endpoint: str) -> Iterator[Any]:
    """A boto3 S3 client made from the environment (the endpoint only through AWS_ENDPOINT_URL)."""
    import boto3

    old = {k: os.environ.get(k) for k in (*S3_CREDENTIALS, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        yield boto3.client("s3")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
