"""Slurm ``srun`` job steps on a real, private, single-node Slurm cluster.

The fixture starts its own ``slurmctld`` and ``slurmd`` from the Slurm packages installed on this machine, with a
minimal configuration in a temporary folder (no munge, no cgroups, no accounting, free ports), so it never
touches a cluster the machine may belong to (tests/helpers/slurmutil.py, which the two-host Slurm test of
tests/integration/test_multinode_launchers.py shares). The tests then start two processes with ``srun -n 2`` and check
that fastmae gives each the rank, world size and local rank Slurm assigned it, without RANK/WORLD_SIZE set:

* a small probe joins torch.distributed and all-reduces across both tasks;
* ``fastmae/train.py`` trains two steps with ZeRO stage 2 on two Slurm tasks and saves a checkpoint;
* ``WORLD_SIZE=1`` left exported under ``srun -n 2`` is refused, instead of two lone trainers.

Starting the daemons needs root (``slurmd`` runs job steps as their user) and the Slurm binaries
(Debian/Ubuntu: ``apt-get install slurmd slurmctld slurm-client``); without them, or when the daemons do not
come up, the tests are skipped with the reason (and the daemon's log).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dsutil import REPO, deepspeed_env, free_port
from slurmutil import SlurmCluster, SlurmUnavailable, this_host, write_conf

pytestmark = pytest.mark.xdist_group("slurm_cluster")  # one cluster per module: its tests share a worker

STEP_TIMEOUT_S = 180

PROBE = """\
import torch, torch.distributed as dist
from fastmae.distributed import init_distributed, shutdown_distributed
info = init_distributed(60)
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(f"probe rank {info.rank} of {info.world_size} local {info.local_rank} via {info.launcher}: sum {t.item():g}")
shutdown_distributed()
"""


def srun(cluster: SlurmCluster, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``srun -n 2`` on one node (two tasks even where the node has one CPU); a failing task ends the step."""
    cmd = [cluster.bins["srun"], "-n", "2", "-N", "1", "--overcommit", "--kill-on-bad-exit=1",
           f"--time={STEP_TIMEOUT_S // 60 + 1}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    if not sys.platform.startswith("linux"):
        pytest.skip("the private Slurm cluster needs Linux")
    try:
        bins, node, hardware = this_host()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("slurm")
    # the node and the controller are this host, reached on the loopback address: its name need not resolve
    conf = write_conf(root, [(node, "127.0.0.1")], hardware, ctld_port=free_port(), slurmd_port=free_port())
    cl = SlurmCluster(root, conf, bins, deepspeed_env())
    try:
        try:
            cl.start([node])
        except SlurmUnavailable as e:
            pytest.skip(str(e))
        yield cl
    finally:
        cl.stop()


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def test_srun_tasks_get_their_rank_and_world_size(cluster: SlurmCluster) -> None:
    proc = srun(cluster, [sys.executable, "-c", PROBE], cluster.env())
    out = _output(proc)
    assert proc.returncode == 0, f"srun exited {proc.returncode}:\n{out[-4000:]}"
    for rank in range(2):
        assert f"probe rank {rank} of 2 local {rank} via slurm: sum 3" in out, out[-4000:]


def test_train_on_two_srun_tasks(cluster: SlurmCluster, tmp_path: Path) -> None:
    args = [sys.executable, "fastmae/train.py", "--ds_config", "zero2.json", "data.backend=synthetic",
            "data.synthetic_size=64", "data.batch_size=8", "train.batch_size=16", "train.steps=2",
            "train.log_interval=1", "train.progress=false", "train.trackers=", f"train.output_dir={tmp_path}"]
    proc = srun(cluster, args, cluster.env())
    out = _output(proc)
    assert proc.returncode == 0, f"srun exited {proc.returncode}:\n{out[-4000:]}"
    assert "2 rank(s) on cpu (launcher: slurm)" in out, out[-4000:]
    assert "micro 8 x accum 1 x ranks 2 = 16" in out, out[-4000:]
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir(), out[-4000:]


def test_world_size_left_exported_under_srun_is_refused(cluster: SlurmCluster) -> None:
    # srun passes its whole environment to the tasks: each sees WORLD_SIZE=1 RANK=0 beside Slurm's two tasks
    proc = srun(cluster, [sys.executable, "-c", PROBE], cluster.env(WORLD_SIZE="1", RANK="0"))
    out = _output(proc)
    assert proc.returncode != 0, out[-4000:]
    assert "disagree on the world size" in out, out[-4000:]
    assert "probe rank" not in out, out[-4000:]
