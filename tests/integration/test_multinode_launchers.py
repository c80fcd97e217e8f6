"""Open MPI's ``mpirun`` and Slurm's ``srun`` starting the training program across two real hosts (network
namespaces with their own interfaces, addresses, host names and sshd; a shared filesystem: tests/helpers/nodes.py),
one rank per host, each run logging the same losses as the same 2 ranks on one host (torchrun):

* ``mpirun -H node1,node2 -np 2`` from node1: Open MPI starts its daemon on node2 over ssh, traffic restricted to
  ``eth0``, ``MASTER_ADDR=node1`` exported to the ranks (Open MPI names no rendezvous host); without it each rank
  stops at start-up with a message saying what to pass;
* ``srun -N 2 -n 2`` on a two-node Slurm cluster (slurmctld on node1, a slurmd in each namespace:
  tests/helpers/slurmutil.py): fastmae takes the rendezvous host from the step's node list, nothing exported.

deepspeed over pdsh, torchrun's rendezvous, losing a node and elastic restarts: tests/integration/test_multinode.py;
the cluster and the one-host reference run are fixtures of tests/conftest.py. The launchers'
variables read from plain dicts: tests/unit/test_launch_env.py.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nodes
import pytest
from dsutil import REPO, deepspeed_env
from jobs import HOSTS_ARGS, losses
from slurmutil import SlurmCluster, SlurmUnavailable, this_host, with_host_cgroups, write_conf

pytestmark = [pytest.mark.multinode, pytest.mark.xdist_group("nodes")]

PROGRAM = "fastmae/train.py"
JOB_TIMEOUT_S = 300
# fixed ports: every namespace has ports of its own, so nothing else on the machine holds them
SLURMCTLD_PORT, SLURMD_PORT, MPI_MASTER_PORT = 6817, 6818, 29500
# what Open MPI passes from mpirun's environment to the ranks (those on node2 get the ssh session's otherwise)
MPI_EXPORTS = ("PATH", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS",
               "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "PYTHONUNBUFFERED")


@pytest.fixture(scope="module")
def env(hosts_env: dict[str, str]) -> dict[str, str]:
    return hosts_env


def _on_node(c: nodes.Cluster, node: nodes.Node, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a launcher on ``node`` from the repository folder; (exit status, output). A job that overruns, or whose
    test is interrupted, is killed whole (the launcher's session; what it left on the nodes goes with the
    cluster)."""
    proc = c.popen(node, argv, env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(argv[:8])} ... did not end within {JOB_TIMEOUT_S} s:\n{out[-4000:]}")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, out


def _check_run(out: str, launcher: str, got: dict[int, float], want: dict[int, float]) -> None:
    assert f"2 rank(s) on cpu (launcher: {launcher})" in out, out[-4000:]
    assert "micro 8 x accum 1 x ranks 2 = 16" in out, out[-4000:]
    # every rank's host name, gathered by the ranks themselves at start-up: one rank ran on each host
    assert "hosts: node1 (rank 0), node2 (rank 1)" in out, out[-4000:]
    assert got == want, f"losses across hosts {got} != on one host {want}"


def _mpirun(env: dict[str, str], out_dir: Path) -> list[str]:
    """One rank on each host, Open MPI's own traffic on eth0, the variables of :data:`MPI_EXPORTS` that ``env``
    has passed to every rank. By name, not /usr/bin/mpirun: an absolute path becomes Open MPI's --prefix and puts
    /usr/bin first on the ranks' PATH."""
    return ["mpirun", "-H", "node1,node2", "-np", "2", "--mca", "oob_tcp_if_include", "eth0",
            "--mca", "btl_tcp_if_include", "eth0", *(a for name in MPI_EXPORTS if name in env for a in ("-x", name)),
            sys.executable, "-u", PROGRAM, *HOSTS_ARGS, f"train.output_dir={out_dir}"]


def test_mpirun_across_two_hosts(cluster: nodes.Cluster, env: dict[str, str], one_host: dict[int, float],
                                 tmp_path: Path) -> None:
    start = time.monotonic()
    c = cluster
    run_env = c.env(env, MASTER_ADDR="node1", MASTER_PORT=str(MPI_MASTER_PORT), OMPI_ALLOW_RUN_AS_ROOT="1",
                    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    code, out = _on_node(c, c.node("node1"), _mpirun(run_env, tmp_path), run_env)
    print(f"mpirun on 2 hosts: {time.monotonic() - start:.1f} s")
    assert code == 0, f"mpirun exited {code}:\n{out[-4000:]}"
    _check_run(out, "openmpi", losses(tmp_path), one_host)


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is not None,
                    reason="mpi4py is installed: the ranks get rank 0's address from it instead")
def test_mpirun_across_hosts_without_master_addr_says_what_to_pass(cluster: nodes.Cluster, env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """Open MPI exports no rendezvous host: each rank stops at start-up naming MASTER_ADDR, not a hang on
    127.0.0.1 or a guess."""
    start = time.monotonic()
    c = cluster
    run_env = c.env(env, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    code, out = _on_node(c, c.node("node1"), _mpirun(run_env, tmp_path), run_env)
    print(f"mpirun on 2 hosts without MASTER_ADDR: {time.monotonic() - start:.1f} s")
    assert code != 0, out[-4000:]
    said = [line for line in out.splitlines() if line.startswith("[fastmae] cannot start: LaunchError")]
    assert len(said) == 2, out[-4000:]  # both ranks, each on its own host
    assert all("ranks on several hosts (1 of 2 here) and MASTER_ADDR is not set" in line
               and "mpirun -x MASTER_ADDR=<host of rank 0>" in line for line in said), out[-4000:]
    assert not list(tmp_path.glob("metrics.jsonl")), out[-4000:]


@pytest.fixture(scope="module")
def slurm(cluster: nodes.Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """slurmctld on node1 and a slurmd in each node's namespace; stopped (jobs cancelled) however the tests end."""
    c, start = cluster, time.monotonic()
    try:
        bins, _, hardware = this_host()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("slurm_nodes")
    conf = write_conf(root, [(n.name, n.addr) for n in c.nodes], hardware, SLURMCTLD_PORT, SLURMD_PORT,
                      cluster_name="fastmaenodes")
    node1 = c.node("node1")
    sl = SlurmCluster(
        root, conf, bins, c.env(deepspeed_env()),
        spawn=lambda name, argv, env, out: c.popen(c.node(name), argv, env, cwd=root, stdout=out,
                                                   stderr=subprocess.STDOUT),
        client=lambda argv, env: c.run(node1, argv, env, timeout=30))
    try:
        try:
            sl.start([n.name for n in c.nodes], wrap=with_host_cgroups)
        except SlurmUnavailable as e:
            pytest.skip(str(e))
        print(f"Slurm on 2 hosts up: {time.monotonic() - start:.1f} s")
        yield sl
    finally:
        sl.stop()


def test_srun_across_two_hosts(cluster: nodes.Cluster, slurm: SlurmCluster, one_host: dict[int, float],
                               tmp_path: Path) -> None:
    start = time.monotonic()
    c = cluster
    cmd = [slurm.bins["srun"], "-N", "2", "-n", "2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
           f"--time={JOB_TIMEOUT_S // 60}", sys.executable, "-u", PROGRAM, *HOSTS_ARGS, f"train.output_dir={tmp_path}"]
    code, out = _on_node(c, c.node("node1"), cmd, slurm.env())
    print(f"srun on 2 hosts: {time.monotonic() - start:.1f} s")
    assert code == 0, f"srun exited {code}:\n{out[-4000:]}"
    _check_run(out, "slurm", losses(tmp_path), one_host)
