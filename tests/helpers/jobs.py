"""Jobs the integration tests start as users do (a launcher and its ranks, in a session of their own) and what
they leave behind (metrics.jsonl records, the test runner's per-micro-batch records)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from dsutil import REPO, free_port, run_job

BIN = Path(sys.executable).parent
RUNNER = "tests/helpers/train_runner.py"
# tiny synthetic runs: 8 images per micro batch, effective batch 16
SMALL = ["data.backend=synthetic", "data.synthetic_size=512", "data.batch_size=8", "train.batch_size=16",
         "train.log_interval=1", "train.progress=false"]
# the run every launch across hosts makes (2 ranks, one per host), and the same 2 ranks on one host log its losses
HOSTS_STEPS = 5
HOSTS_ARGS = ["--ds_config", "zero2.json", *SMALL, f"train.steps={HOSTS_STEPS}", "train.trackers=",
              "train.checkpoint_at_end=false"]
# the launcher variables a test's own environment might carry (a CI job inside Slurm, a shell with RANK set):
# none of them may reach the jobs a test starts, which must learn their place from the test's launcher alone
STRAY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "TORCHELASTIC_RUN_ID", "CROSS_RANK")
STRAY_PREFIXES = ("SLURM_", "SALLOC_", "SBATCH_", "SRUN_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")


def without_launcher_vars(env: dict[str, str]) -> dict[str, str]:
    """``env`` without any launcher's variables (:data:`STRAY`, :data:`STRAY_PREFIXES`)."""
    return {k: v for k, v in env.items() if k not in STRAY and not k.startswith(STRAY_PREFIXES)}


def launch(ranks: int, script: str, args: list[str], launcher: str = "torchrun") -> list[str]:
    """The command of an N-rank job. One rank runs as a single process (a launch mode of its own). Several ranks
    start through torchrun (one launcher interpreter that imports torch, not DeepSpeed: seconds less per job), or
    through the deepspeed launcher where its handling of the ranks' exit is what the test is about (SIGTERM's
    status 75, one rank's failure); the README command's test runs the deepspeed launcher on 1-3 ranks."""
    port = str(free_port())
    if ranks == 1:
        return ["env", f"MASTER_PORT={port}", sys.executable, "-u", script, *args]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", port, script, *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", port, script, *args]


def run(cmd: list[str], env: dict[str, str], timeout: float = 300, expect: int = 0) -> str:
    proc = run_job(cmd, env=env, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect}):\n{out[-4000:]}"
    return out


def records(out_dir: Path, skip_lines: int = 0) -> dict[int, dict]:
    """step -> the training record of a run's metrics.jsonl (the last record per step wins), after the first
    ``skip_lines`` lines (those of an earlier process, e.g. a killed run that went past its last checkpoint)."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()[skip_lines:]
    recs = [json.loads(line) for line in lines]
    return {r["step"]: r for r in recs if "loss" in r}


def losses(out_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl."""
    return {s: r["loss"] for s, r in records(out_dir).items()}


_STARTED: list[subprocess.Popen] = []


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A job in its own process group, output to ``log``; killed with its ranks when the test ends."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    _STARTED.append(proc)
    return proc


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a job whole, as when its node dies: the launcher's process group and every process under it
    (torchrun starts each rank in a session of its own, outside the launcher's group)."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"no {path} within {timeout} s"
        time.sleep(0.05)


def seconds_from_error_to_exit(proc: subprocess.Popen, log: Path, marker: str, timeout: float = 300) -> float:
    """Wait for the job to end; seconds between ``marker`` first appearing in its log and the job's exit."""
    deadline, seen = time.time() + timeout, None
    while proc.poll() is None:
        assert time.time() < deadline, f"the job did not end within {timeout} s"
        if seen is None and marker in log.read_text(errors="replace"):
            seen = time.time()
        time.sleep(0.1)
    assert seen is not None or marker in log.read_text(errors="replace"), f"{marker!r} never appeared"
    return time.time() - seen if seen is not None else 0.0


def rank_processes(proc: subprocess.Popen, n: int, timeout: float = 60) -> list[psutil.Process]:
    """The training processes (ranks) under a launcher."""
    deadline = time.time() + timeout
    while True:
        kids = [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "-m" not in p.cmdline()  # not the per-node launcher, whose arguments name the script too
                and any(a.endswith(RUNNER) or a.endswith("train.py") for a in p.cmdline())]
        if len(kids) >= n:
            return kids
        assert time.time() < deadline, "the ranks did not start"
        time.sleep(0.1)


def recorded(folder: Path) -> list[dict]:
    """The runner's per-micro-batch records of every rank."""
    return [json.loads(line) for f in sorted(folder.glob("rank*.jsonl")) for line in f.read_text().splitlines()]


def end_started() -> None:
    """Kill every job :func:`start` started that is still running (a test's clean-up)."""
    while _STARTED:
        proc = _STARTED.pop()
        kill_job(proc)  # the whole job: ranks can outlive their launcher
        proc.wait()
