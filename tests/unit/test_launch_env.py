"""Rank and world size from every launcher: the variables each one exports (read from plain dicts), the
inconsistent environments that must be refused, and the GPU a process picks. Real Open MPI jobs (``mpirun -n 2``):
tests/integration/test_mpirun.py."""

from __future__ import annotations

import pytest

from fastmae.launch_env import (
    OPENMPI,
    SINGLE,
    SLURM,
    TORCH,
    LaunchError,
    discover,
    expand_hostlist,
    expand_tasks_per_node,
    export,
    first_host,
    slurm_master_port,
)

# ----------------------------------------------------------------------------- what each launcher exports


def test_plain_process_is_a_world_of_one() -> None:
    env = discover({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (0, 1, 0, 1, SINGLE)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29500)


def test_torchrun_and_deepspeed_launcher() -> None:
    env = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                    "MASTER_ADDR": "node01", "MASTER_PORT": "29600", "TORCHELASTIC_RUN_ID": "x"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.source) == ("node01", 29600, TORCH)
    # the deepspeed per-node launcher names the local world size LOCAL_SIZE
    env = discover({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0"})
    assert (env.local_world_size, env.master_addr) == (2, "127.0.0.1")


def test_openmpi_one_host_and_several() -> None:
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    env = discover({**ompi, "MASTER_ADDR": "10.0.0.7"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (3, 4, 1, 2, OPENMPI)
    assert env.master_addr == "10.0.0.7"
    one_host = {**ompi, "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    assert discover(one_host).master_addr == "127.0.0.1"


def test_openmpi_on_several_hosts_needs_rank_zeros_address() -> None:
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        with pytest.raises(LaunchError, match="several hosts .* MASTER_ADDR is not set.*mpirun -x MASTER_ADDR"):
            discover(ompi)
    else:  # mpi4py present: the test process is not an MPI rank 3 of 4, so the broadcast is refused
        with pytest.raises(LaunchError, match="mpi4py sees rank 0 of 1, the environment rank 3 of 4"):
            discover(ompi)


def test_mpich_and_intel_mpi() -> None:
    env = discover({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
                    "MASTER_ADDR": "h1"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (2, 4, 0, 2)
    env = discover({"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_LOCAL_RANK": "1", "PMI_LOCAL_SIZE": "2"})
    assert (env.rank, env.local_rank, env.master_addr) == (1, 1, "127.0.0.1")


SRUN = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_NUM_NODES": "4",
        "SLURM_STEP_NODELIST": "gpu[07-09,11]", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8"}


def test_slurm_step() -> None:
    env = discover(SRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (5, 8, 1, 2, SLURM)
    assert env.master_addr == "gpu07"
    assert env.master_port == slurm_master_port(4242, 0)
    # every task of the step derives the same port; the next job and the next step do not
    other_task = discover({**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    assert other_task.master_port == env.master_port
    assert slurm_master_port(4243, 0) != env.master_port and slurm_master_port(4242, 1) != env.master_port
    assert all(15000 <= slurm_master_port(j, s) < 30000 for j in (0, 1, 10**9 + 7) for s in (0, 3))
    # uneven nodes: this node's count, from its index in the compressed list
    uneven = discover({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "3,2(x2),1", "SLURM_NODEID": "3", "SLURM_LOCALID": "0",
                       "SLURM_PROCID": "7"})
    assert uneven.local_world_size == 1


def test_slurm_batch_script_is_one_process() -> None:
    """A batch script or salloc shell carries SLURM_PROCID=0 and the allocation's task count but no step id."""
    env = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert (env.rank, env.world_size, env.source) == (0, 1, SINGLE)


def test_mpirun_inside_slurm_follows_mpi() -> None:
    """mpirun's daemons are started by srun; the ranks inherit the daemon step's variables, which describe other
    tasks: Open MPI's own variables win and the Slurm ones are not compared."""
    env = discover({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "SLURM_PROCID": "0", "SLURM_STEP_ID": "1",
                    "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "a[1-2]", "SLURM_JOB_ID": "9",
                    "MASTER_ADDR": "a1"})
    assert (env.rank, env.world_size, env.local_world_size, env.source) == (3, 8, 4, OPENMPI)
    assert (env.master_addr, env.master_port) == ("a1", 29500)  # not the daemon step's derived port


def test_export_writes_what_torch_and_deepspeed_read() -> None:
    out: dict[str, str] = {}
    export(discover(SRUN), out)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "2",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(slurm_master_port(4242, 0))}


# ----------------------------------------------------------------------------- refused environments


@pytest.mark.parametrize("environ,message", [
    ({"RANK": "1"}, "RANK='1' is set but WORLD_SIZE is not; a launcher sets both"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE='2' is set but RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "rank 2 is outside \\[0, 2\\)"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "world size must be at least 1"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
     "local rank 2 is outside \\[0, 2\\)"),
    ({"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, "the local rank is unknown; set LOCAL_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"},
     "number of processes on this node is unknown; set LOCAL_WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "1", **SRUN}, "torchrun/deepspeed and slurm disagree on the world size: RANK=0 "
     "WORLD_SIZE=1 but SLURM_PROCID=5 SLURM_STEP_NUM_TASKS=8.*left exported in the job script"),
    ({"RANK": "4", "WORLD_SIZE": "8", "LOCAL_RANK": "1", **SRUN}, "disagree on this process's rank"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "PMI_RANK": "0", "PMI_SIZE": "2"},
     "openmpi and mpich/intel-mpi disagree on this process's rank"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "LOCAL_RANK": "1"}, "LOCAL_RANK=1 but the launcher \\(openmpi\\) says"),
    ({**SRUN, "SLURM_STEP_NUM_TASKS": "", "SLURM_NTASKS": ""}, "a Slurm job step without its task count"),
    ({**SRUN, "SLURM_STEP_NODELIST": "gpu[07-"}, "SLURM_STEP_NODELIST='gpu\\[07-': Slurm hostlist .* unbalanced"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
])
def test_inconsistent_environment_is_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        discover(environ)


def test_hostlists_and_task_counts() -> None:
    assert expand_hostlist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_hostlist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_hostlist("a[8-10]") == ["a8", "a9", "a10"]
    assert first_host("big[000001-999999]") == "big000001"  # not expanded past the first
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    for bad in ("", "n[1-2", "n]1", "n[]", "n[3-1]", "n[1-x]", "n[[1]]", "a,,b"):
        with pytest.raises(LaunchError):
            expand_hostlist(bad)
    with pytest.raises(LaunchError, match="cannot read Slurm tasks-per-node list"):
        expand_tasks_per_node("2(x)")


def test_gpu_of_a_process_follows_what_it_sees() -> None:
    """All of a node's GPUs visible: the local rank picks one. One GPU per task (Slurm --gpus-per-task=1): each
    task uses the one it sees, whatever its local rank. Ranks that would share a card are named."""
    from fastmae.distributed import cuda_device_index, shared_gpus

    assert [cuda_device_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]
    assert [cuda_device_index(r, 1) for r in (0, 1, 5)] == [0, 0, 0]
    with pytest.raises(RuntimeError, match="local rank 4 .* sees 4"):
        cuda_device_index(4, 4)
    assert shared_gpus([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a")]) == []
    assert shared_gpus([("n1", "GPU-a"), ("n1", "GPU-a"), ("n2", "GPU-b")]) == [[0, 1]]


def test_failure_reports_name_the_lost_ranks_and_their_hosts() -> None:
    """The words a lost-node report is made of: which errors are communication failures, the ranks grouped by
    host, and the start-up line's host table (only for a job on several hosts)."""
    from fastmae.distributed import hosts_summary
    from fastmae.failfast import communication_error, describe_ranks

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [10.213.0.2]:57494: Connection reset by peer")
    assert communication_error(gloo)
    assert communication_error(RuntimeError("Timed out waiting 15000ms for recv operation to complete"))
    assert not communication_error(ValueError("data.crop='x' is not valid"))
    assert not communication_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    hosts = ("node1", "node1", "node2", "node2")
    assert describe_ranks([2, 3], hosts) == "ranks 2, 3 (on node2)"
    assert describe_ranks([1], hosts) == "rank 1 (on node1)"
    assert describe_ranks([1, 2], hosts) == "ranks 1 (on node1), 2 (on node2)"
    assert describe_ranks([1], ()) == "rank 1"
    assert hosts_summary(hosts) == " | hosts: node1 (ranks 0-1), node2 (ranks 2-3)"
    assert hosts_summary(("n1", "n2", "n1")) == " | hosts: n1 (ranks 0, 2), n2 (rank 1)"
    assert hosts_summary(("a", "a")) == ""
