"""Process groups: start-up under any launcher (rank, world size and device from :mod:`fastmae.launch_env`),
every group's timeout, one GPU per rank, the CPU comm op's shared memory, and shutdown (a barrier on success, an
abort without one after an error)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from .launch_env import LaunchEnv, discover, export

# where rank 0 posts the store of this attempt of a torchrun job (in the store torchrun shares across attempts)
ATTEMPT_STORE_KEY = "fastmae/attempt_store"
# how long a rank gives a posted store to answer before it reads the post again
ATTEMPT_PROBE_S = 5.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    launcher: str = "single process"
    # every rank's host name (index = rank), gathered once at start-up: failure reports name the lost ranks' hosts
    hosts: tuple[str, ...] = ()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def set_default_timeouts(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the default of every process group created from now on, gloo and NCCL alike
    (torch reads separate module defaults per backend; DeepSpeed's groups are made without a timeout)."""
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout


def group_timeouts() -> list[float]:
    """Timeout in seconds of every process group of this process (for the start-up log and the tests)."""
    if not dist.is_initialized():
        return []
    out = []
    for pg in list(distributed_c10d._world.pg_map):
        for dev in (torch.device("cpu"), torch.device("cuda")):
            try:
                backend = pg._get_backend(dev)
            except Exception:  # no backend for this device type in this group
                continue
            timeout = getattr(getattr(backend, "options", None), "_timeout", None)
            if timeout is not None:
                out.append(timeout.total_seconds())
    return out


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Start torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU) and pick this rank's device.

    The rank and world size come from whichever launcher started the process (deepspeed, torchrun, srun,
    mpirun: :mod:`fastmae.launch_env`); an inconsistent environment is an error, a process started by hand is
    a world of one. Every process group gets ``timeout_s``: ZeRO's collectives ignore the timeout given to
    ``init_distributed`` and NCCL groups read their own default, so both module defaults are set first.
    """
    deepspeed = import_deepspeed()  # seconds to import: only when a process group starts
    env = discover()
    if env.world_size == 1 and "MASTER_PORT" not in os.environ:  # alone: any free port will do
        env = dataclasses.replace(env, master_port=_free_port())
    export(env)
    timeout = datetime.timedelta(seconds=timeout_s)
    set_default_timeouts(timeout)
    cuda = torch.cuda.is_available()
    gpu = 0
    if cuda:
        gpu = cuda_device_index(env.local_rank, torch.cuda.device_count(), env.source)
        torch.cuda.set_device(gpu)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        store = attempt_store(env, timeout)
        if store is not None:  # torch's group on it; DeepSpeed then adopts the group
            bind = {"device_id": torch.device("cuda", gpu)} if cuda and env.world_size > 1 else {}
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                    **bind)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False, verbose=False)
    if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
        raise RuntimeError(f"torch.distributed started as rank {dist.get_rank()} of {dist.get_world_size()} but "
                           f"the launcher ({env.source}) said rank {env.rank} of {env.world_size}")
    if not cuda and os.environ.get("LOCAL_SIZE") == str(env.world_size):  # the op's own test: all ranks local
        _unlink_cpu_comm_segment(env.rank)
    placements = _placements(gpu if cuda else None)
    if cuda and env.world_size > 1:
        _refuse_shared_gpus([tuple(p) for p in placements])
    device = torch.device("cuda", gpu) if cuda else torch.device("cpu")
    return DistInfo(env.rank, env.local_rank, env.world_size, device, env.source, tuple(h for h, _ in placements))


def import_deepspeed() -> ModuleType:
    """``import deepspeed``, without the ~1.4 s its autotuner spends importing mlflow where mlflow is installed.

    DeepSpeed imports its autotuner with the package, and the autotuner imports mlflow (and FastAPI with it) at
    import time, more than half of DeepSpeed's own import. fastmae never autotunes: mlflow is hidden while DeepSpeed
    imports and importable again afterwards (the mlflow tracker imports it when asked for), so every rank, and every
    restart of a job, starts that much sooner.
    """
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def attempt_store(env: LaunchEnv, timeout: datetime.timedelta) -> dist.Store | None:
    """A store for this attempt of a torchrun job alone; None under any other launcher.

    torchrun's c10d rendezvous hands every attempt of a job the same store, hosted by its agent on rank 0's node.
    After a restart (``--max-restarts``, a node lost or joining) the keys of the attempt before are still there:
    gloo's and NCCL's addresses of processes that are gone, the flag of a rank that failed. New ranks would read
    them as their own and connect to dead ports or stop at once. So rank 0 starts a store of its own and posts its
    port with a random token in the shared store; every other rank takes the posted store once it answers with
    that token (a post left by an earlier attempt names a store that ended with that attempt's rank 0).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.world_size == 1:
        return None
    shared = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout)
    if env.rank == 0:
        own = dist.TCPStore(env.master_addr, 0, is_master=True, wait_for_workers=False, timeout=timeout)
        token = uuid.uuid4().hex
        own.set("token", token)
        shared.set(ATTEMPT_STORE_KEY, f"{own.port} {token}")
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, token = shared.get(ATTEMPT_STORE_KEY).decode().split()
        try:
            store = dist.TCPStore(env.master_addr, int(port), is_master=False,
                                  timeout=datetime.timedelta(seconds=ATTEMPT_PROBE_S))
            if store.get("token").decode() == token:
                store.set_timeout(timeout)
                return store
        except RuntimeError:  # nothing listens there any more, or not this attempt's store
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 of this attempt posted no store within {timeout.total_seconds():.0f} s "
                               f"(torchrun's store at {env.master_addr}:{env.master_port})")
        time.sleep(0.2)


def _placements(gpu: int | None) -> list[tuple[str, str]]:
    """Every rank's (host name, GPU UUID or ""), one all-gather at start-up."""
    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(gpu).uuid) if gpu is not None else "")
    if dist.get_world_size() == 1:
        return [mine]
    placements: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(placements, mine)
    return [tuple(p) for p in placements]


def hosts_summary(hosts: tuple[str, ...]) -> str:
    """`` | hosts: node1 (ranks 0-1), node2 (ranks 2-3)`` for a job on several hosts; "" on one."""
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    if len(by_host) < 2:
        return ""
    ranks = {h: f"rank {r[0]}" if len(r) == 1 else f"ranks {r[0]}-{r[-1]}" if r == list(range(r[0], r[-1] + 1))
             else f"ranks {', '.join(map(str, r))}" for h, r in by_host.items()}
    return " | hosts: " + ", ".join(f"{h} ({ranks[h]})" for h in by_host)


def shared_gpus(placements: list[tuple[str, str]]) -> list[list[int]]:
    """Groups of ranks that would share one GPU, from each rank's (host, GPU UUID)."""
    seen: dict[tuple[str, str], list[int]] = {}
    for rank, place in enumerate(placements):
        seen.setdefault(place, []).append(rank)
    return [ranks for ranks in seen.values() if len(ranks) > 1]


def _refuse_shared_gpus(placements: list[tuple[str, str]]) -> None:
    """Every rank on its own GPU: two processes of a node that each see one device (a scheduler's per-task GPU,
    or a one-GPU machine started with two processes) must not both be on the same card."""
    shared = shared_gpus(placements)
    if shared:
        raise RuntimeError(f"ranks {shared[0]} would share one GPU: start one process per GPU (this node shows "
                           f"{torch.cuda.device_count()} to each process)")


def cuda_device_index(local_rank: int, visible: int, source: str = "the launcher") -> int:
    """The CUDA device of this process among the ``visible`` ones: its local rank when the node's GPUs are all
    visible to every process, device 0 when the scheduler gave the process a GPU of its own (Slurm
    ``--gpus-per-task=1`` or ``--gpu-bind=single:1``: every task sees one device, whatever its local rank)."""
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} ({source}) has no GPU: this process sees {visible}; start at "
                       "most that many processes per node, or give each process its own GPU")


SHM_DIR = "/dev/shm"


def cpu_comm_segment(rank: int) -> str:
    """The shared-memory segment DeepSpeed's CPU comm op maps for ``rank`` of the job at MASTER_ADDR:PORT."""
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                                 f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_cpu_comm_segment(rank: int) -> None:
    """On CPU, DeepSpeed's start-up loads its shared-memory comm op (used only for inference all-reduce), which
    creates one ~66 MB segment per rank when all ranks share a host and never removes it: every CPU run would
    leave world size x 66 MB of memory behind in /dev/shm. After a barrier every rank has mapped every peer's
    segment (the op's start-up waits for each), so each rank unlinks its own name; the mappings stay valid."""
    dist.barrier()
    try:
        os.unlink(cpu_comm_segment(rank))
    except OSError:  # not created (the op did not build) or already gone
        pass


def shutdown_distributed() -> None:
    """Barrier and destroy the process group (gloo can abort at interpreter exit otherwise). Only on the
    success path: after an error, :meth:`FailFast.fail` tears the groups down without waiting for anyone."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def abort_process_groups(wait_s: float = 5.0) -> None:
    """Tear the process groups down without a collective (NCCL: abort; gloo: destroy), giving up after
    ``wait_s``: the error path must never wait for peers that may be stuck or gone."""
    if not dist.is_initialized():
        return

    def tear() -> None:
        try:
            if dist.get_backend() == "nccl":
                distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception:
            pass

    t = threading.Thread(target=tear, name="fastmae-teardown", daemon=True)
    t.start()
    t.join(wait_s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
