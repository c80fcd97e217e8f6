"""Helpers for tests that start DeepSpeed programs in subprocesses."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# one cache for DeepSpeed's CPU comm op, compiled once per machine (~30-60 s)
EXTENSIONS_DIR = Path(os.environ.get("TORCH_EXTENSIONS_DIR", REPO / ".cache" / "torch_extensions"))
# one torch.compile cache for every compiled run the tests start: the same graphs compile once (~20-60 s on CPU)
INDUCTOR_CACHE = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", REPO / ".cache" / "inductor"))
_BUILD = ("import deepspeed, deepspeed.ops, torch\n"
          "from deepspeed.accelerator import get_accelerator\n"
          "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
          "if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False): b.load()\n"
          "print(torch.__version__, deepspeed.__version__)\n")


def build_comm_op() -> None:
    """Compile DeepSpeed's shared-memory comm op once, before any test starts ranks, so that ranks and
    parallel test workers never race to build it. An exclusive file lock (released by the kernel if its holder
    dies) orders the workers; stray ``lock`` files of a killed build are removed first, since they make the
    next build wait forever; a marker per torch/DeepSpeed version says the op is ready."""
    EXTENSIONS_DIR.mkdir(parents=True, exist_ok=True)
    with open(EXTENSIONS_DIR / ".fastmae-tests.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        import deepspeed
        import torch

        ready = EXTENSIONS_DIR / f".comm-op-ready-torch{torch.__version__}-deepspeed{deepspeed.__version__}"
        if ready.exists():
            return
        for lock in EXTENSIONS_DIR.rglob("lock"):
            lock.unlink()
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(EXTENSIONS_DIR))
        proc = subprocess.run([sys.executable, "-c", _BUILD], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"building DeepSpeed's comm op failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        ready.write_text(proc.stdout)


def deepspeed_env() -> dict[str, str]:
    """Environment for DeepSpeed subprocesses: one thread per rank, the built comm op's cache, a shared
    torch.compile cache, unbuffered output."""
    build_comm_op()
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(EXTENSIONS_DIR), PYTHONUNBUFFERED="1",
               TORCHINDUCTOR_CACHE_DIR=str(INDUCTOR_CACHE))
    env.pop("FASTMAE_TEST_NAN_AT", None)
    return env


def run_job(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a job that starts processes of its own (a launcher and its ranks): it runs in its
    own session, and a timeout kills all of it, not only the launcher (orphaned ranks would spin on and slow
    every later test)."""
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd))} did not end within {timeout} s; its output:\n"
                                 f"{(out + err)[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
    """A free TCP port on the loopback interface (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_dir(tmp_path_factory) -> Path:
    """A folder every parallel test worker of this run sees (pytest-xdist gives each worker its own base temp
    folder, all under one parent); the run's base temp folder when tests run in one process."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_run(tmp_path_factory, name: str, produce) -> Path:
    """Run ``produce(folder)`` once per test run, whichever worker asks first; every worker gets the folder.

    Session fixtures are per worker process, so a costly one (a multi-process reference run, the GPU check's
    rehearsal) would run again on every worker its tests land on. An exclusive file lock orders the workers;
    a ``done`` marker says the folder is complete. A failed ``produce`` leaves no marker, so the next asker
    retries and reports its own error."""
    folder = shared_dir(tmp_path_factory) / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not (folder / ".done").exists():
            produce(folder)
            (folder / ".done").touch()
    return folder
