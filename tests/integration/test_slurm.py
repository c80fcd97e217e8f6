"""Slurm ``srun`` job steps on a real, private, single-node Slurm cluster.

The fixture starts its own ``slurmctld`` and ``slurmd`` from the Slurm packages installed on this machine, with a
minimal configuration in a temporary folder (no munge, no cgroups, no accounting, free ports), so it never
touches a cluster the machine may belong to. The tests then start two processes with ``srun -n 2`` and check
that fastmae gives each the rank, world size and local rank Slurm assigned it, without RANK/WORLD_SIZE set:

* a small probe joins torch.distributed and all-reduces across both tasks;
* ``fastmae/train.py`` trains two steps with ZeRO stage 2 on two Slurm tasks and saves a checkpoint;
* ``WORLD_SIZE=1`` left exported under ``srun -n 2`` is refused, instead of two lone trainers.

Starting the daemons needs root (``slurmd`` runs job steps as their user) and the Slurm binaries
(Debian/Ubuntu: ``apt-get install slurmd slurmctld slurm-client``); without them, or when the daemons do not
come up, the tests are skipped with the reason (and the daemon's log).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dsutil import REPO, deepspeed_env
from storeutil import stop

pytestmark = pytest.mark.xdist_group("slurm_cluster")  # one cluster per module: its tests share a worker

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("srun", "sinfo", "scontrol", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
STEP_TIMEOUT_S = 180
READY_TIMEOUT_S = 30
# the launcher variables a test's own environment might carry (a CI job inside Slurm, a shell with RANK set):
# none of them may reach the tasks, which must learn their place from the private cluster's srun alone
STRAY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "TORCHELASTIC_RUN_ID", "CROSS_RANK")
STRAY_PREFIXES = ("SLURM_", "SALLOC_", "SBATCH_", "SRUN_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")

PROBE = """\
import torch, torch.distributed as dist
from fastmae.distributed import init_distributed, shutdown_distributed
info = init_distributed(60)
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(f"probe rank {info.rank} of {info.world_size} local {info.local_rank} via {info.launcher}: sum {t.item():g}")
shutdown_distributed()
"""


@dataclass(frozen=True)
class Cluster:
    conf: Path
    bins: dict[str, str]

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a client command (srun, sinfo, ...) of this cluster only: launcher variables of the
        surrounding shell removed, SLURM_CONF pointing at the private configuration."""
        env = {k: v for k, v in deepspeed_env().items() if k not in STRAY and not k.startswith(STRAY_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def srun(self, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """``srun -n 2`` on one node (two tasks even where the node has one CPU); a failing task ends the step."""
        cmd = [self.bins["srun"], "-n", "2", "-N", "1", "--overcommit", "--kill-on-bad-exit=1",
               f"--time={STEP_TIMEOUT_S // 60 + 1}", *args]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path.name} not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _node_line(slurmd: str) -> tuple[str, str]:
    """This host's Slurm node name and its hardware (CPUs, sockets, cores, threads) as ``slurmd -C`` sees them."""
    proc = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30)
    first = proc.stdout.splitlines()[0] if proc.stdout.strip() else ""
    fields = dict(item.split("=", 1) for item in first.split() if "=" in item)
    if proc.returncode != 0 or "NodeName" not in fields:
        pytest.skip(f"`slurmd -C` cannot describe this host (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return fields["NodeName"], " ".join(f"{k}={fields[k]}" for k in keep if k in fields)


def _write_conf(root: Path, node: str, hardware: str) -> Path:
    # The node and the controller are this host, reached on the loopback address: its name need not resolve.
    # FirstJobId is random so that the rendezvous port fastmae derives from the job id differs from that of a
    # second such cluster running tests at the same time.
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=fastmaetest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
FirstJobId={random.randrange(1_000, 1_000_000)}
NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _stop(procs: list[subprocess.Popen], cluster: Cluster) -> None:
    """Cancel what is left of the jobs (their slurmstepd would outlive slurmd), then stop the daemons."""
    env = cluster.env()
    if procs and procs[0].poll() is None:
        subprocess.run([cluster.bins["scancel"], "--full", "--user", "root"], env=env, capture_output=True,
                       timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            jobs = subprocess.run([cluster.bins["squeue"], "-h", "-o", "%i"], env=env, capture_output=True,
                                  text=True, timeout=30)
            if jobs.returncode != 0 or not jobs.stdout.strip():
                break
            time.sleep(0.5)
    for proc in reversed(procs):  # slurmd first, then slurmctld
        stop(proc, grace=20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not sys.platform.startswith("linux"):
        pytest.skip("the private Slurm cluster needs Linux")
    bins = {name: _find(name) for name in DAEMONS + CLIENTS}
    missing = [name for name, path in bins.items() if path is None]
    if missing:
        pytest.skip(f"Slurm is not installed: {', '.join(missing)} not found (Debian/Ubuntu: apt-get install slurmd "
                    "slurmctld slurm-client)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root (it runs job steps as their user)")
    found = {name: path for name, path in bins.items() if path is not None}
    root = tmp_path_factory.mktemp("slurm")
    node, hardware = _node_line(found["slurmd"])
    conf = _write_conf(root, node, hardware)
    cl = Cluster(conf, found)
    daemon_env = cl.env()
    procs: list[subprocess.Popen] = []
    try:
        for name, extra in (("slurmctld", []), ("slurmd", ["-N", node])):
            with (root / f"{name}.out").open("w") as out:
                procs.append(subprocess.Popen([found[name], "-D", "-f", str(conf), *extra], cwd=root, env=daemon_env,
                                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + READY_TIMEOUT_S
        state = ""
        while True:
            for name, proc in zip(DAEMONS, procs, strict=True):
                if proc.poll() is not None:
                    log = root / f"{name}.log"
                    pytest.skip(f"{name} exited with status {proc.returncode} on start; "
                                f"{_tail(log if log.exists() else root / f'{name}.out')}")
            info = subprocess.run([found["sinfo"], "-h", "-N", "-o", "%t"], env=daemon_env, capture_output=True,
                                  text=True, timeout=30)
            state = info.stdout.strip() if info.returncode == 0 else info.stderr.strip()
            if state == "idle":
                break
            if time.monotonic() > deadline:
                logs = "\n".join(f"{name}.log:\n{_tail(root / f'{name}.log')}" for name in DAEMONS)
                pytest.skip(f"the Slurm node is not idle after {READY_TIMEOUT_S} s (sinfo: {state!r}); {logs}")
            time.sleep(0.5)
        yield cl
    finally:
        _stop(procs, cl)


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def test_srun_tasks_get_their_rank_and_world_size(cluster: Cluster) -> None:
    proc = cluster.srun([sys.executable, "-c", PROBE], cluster.env())
    out = _output(proc)
    assert proc.returncode == 0, f"srun exited {proc.returncode}:\n{out[-4000:]}"
    for rank in range(2):
        assert f"probe rank {rank} of 2 local {rank} via slurm: sum 3" in out, out[-4000:]


def test_train_on_two_srun_tasks(cluster: Cluster, tmp_path: Path) -> None:
    args = [sys.executable, "fastmae/train.py", "--ds_config", "zero2.json", "data.backend=synthetic",
            "data.synthetic_size=64", "data.batch_size=8", "train.batch_size=16", "train.steps=2",
            "train.log_interval=1", "train.progress=false", "train.trackers=", f"train.output_dir={tmp_path}"]
    proc = cluster.srun(args, cluster.env())
    out = _output(proc)
    assert proc.returncode == 0, f"srun exited {proc.returncode}:\n{out[-4000:]}"
    assert "2 rank(s) on cpu (launcher: slurm)" in out, out[-4000:]
    assert "micro 8 x accum 1 x ranks 2 = 16" in out, out[-4000:]
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir(), out[-4000:]


def test_world_size_left_exported_under_srun_is_refused(cluster: Cluster) -> None:
    # srun passes its whole environment to the tasks: each sees WORLD_SIZE=1 RANK=0 beside Slurm's two tasks
    proc = cluster.srun([sys.executable, "-c", PROBE], cluster.env(WORLD_SIZE="1", RANK="0"))
    out = _output(proc)
    assert proc.returncode != 0, out[-4000:]
    assert "disagree on the world size" in out, out[-4000:]
    assert "probe rank" not in out, out[-4000:]
