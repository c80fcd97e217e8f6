"""Process-level set-up shared by the programs: distributed init, device, seeds, DeepSpeed config."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError

BUNDLED_DS_CONFIGS = ("zero0.json", "zero1.json", "zero2.json", "zero3.json")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    launcher: str = "single process"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def set_default_timeouts(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the default of every process group created from now on, gloo and NCCL alike
    (torch reads separate module defaults per backend; DeepSpeed's groups are made without a timeout)."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout


def group_timeouts() -> list[float]:
    """Timeout in seconds of every process group of this process (for the start-up log and the tests)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

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
    import deepspeed
    import torch.distributed as dist

    from .launch_env import discover, export

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
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout,
                                   auto_mpi_discovery=False, verbose=False)
    if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
        raise RuntimeError(f"torch.distributed started as rank {dist.get_rank()} of {dist.get_world_size()} but "
                           f"the launcher ({env.source}) said rank {env.rank} of {env.world_size}")
    if not cuda and os.environ.get("LOCAL_SIZE") == str(env.world_size):  # the op's own test: all ranks local
        _unlink_cpu_comm_segment(env.rank)
    if cuda and env.world_size > 1:
        _refuse_shared_gpus(gpu)
    device = torch.device("cuda", gpu) if cuda else torch.device("cpu")
    return DistInfo(env.rank, env.local_rank, env.world_size, device, env.source)


def shared_gpus(placements: list[tuple[str, str]]) -> list[list[int]]:
    """Groups of ranks that would share one GPU, from each rank's (host, GPU UUID)."""
    seen: dict[tuple[str, str], list[int]] = {}
    for rank, place in enumerate(placements):
        seen.setdefault(place, []).append(rank)
    return [ranks for ranks in seen.values() if len(ranks) > 1]


def _refuse_shared_gpus(gpu: int) -> None:
    """Every rank on its own GPU: two processes of a node that each see one device (a scheduler's per-task GPU,
    or a one-GPU machine started with two processes) must not both be on the same card."""
    import socket

    import torch.distributed as dist

    placements: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(placements, (socket.gethostname(), str(torch.cuda.get_device_properties(gpu).uuid)))
    shared = shared_gpus([tuple(p) for p in placements])
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
    import torch.distributed as dist

    dist.barrier()
    try:
        os.unlink(cpu_comm_segment(rank))
    except OSError:  # not created (the op did not build) or already gone
        pass


def shutdown_distributed() -> None:
    """Barrier and destroy the process group (gloo can abort at interpreter exit otherwise). Only on the
    success path: after an error, :meth:`FailFast.fail` tears the groups down without waiting for anyone."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def abort_process_groups(wait_s: float = 5.0) -> None:
    """Tear the process groups down without a collective (NCCL: abort; gloo: destroy), giving up after
    ``wait_s``: the error path must never wait for peers that may be stuck or gone."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return

    def tear() -> None:
        try:
            if dist.get_backend() == "nccl":
                from torch.distributed.distributed_c10d import _abort_process_group

                _abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception:
            pass

    t = threading.Thread(target=tear, name="fastmae-teardown", daemon=True)
    t.start()
    t.join(wait_s)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- one rank's failure ends the job


class FailFast:
    """Ends every rank of the job within seconds when one rank fails, whatever the others are blocked in.

    A rank that fails writes its error into the job's rendezvous store (the c10d store every rank already
    shares); a watcher thread on every rank polls the store and, on seeing it, prints which rank failed first
    and ends its process at once (``os._exit``: a collective waiting for the dead rank cannot be interrupted
    otherwise). The failing rank waits a few seconds for the others to acknowledge, tears its process groups
    down without a barrier and exits with status 1. A store that stops answering means its host (rank 0 or
    the launcher) is gone: the watcher ends its rank too.
    """

    def __init__(self, rank: int, world_size: int, poll_s: float = 1.0, ack_wait_s: float = 5.0) -> None:
        self.rank, self.world_size = rank, world_size
        self.poll_s, self.ack_wait_s = poll_s, ack_wait_s
        self._store: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FailFast:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            from torch.distributed.distributed_c10d import PrefixStore, _get_default_store

            self._store = PrefixStore("fastmae_failfast/", _get_default_store())
            self._thread = threading.Thread(target=self._watch, name="fastmae-failfast", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the process groups are torn down on the success path)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                failed = self._store.check(["failed"])
            except Exception as e:  # the store's host is gone
                if self._stop.is_set():
                    return
                _say(f"rank {self.rank}: lost the job's rendezvous store ({type(e).__name__}); rank 0 or the "
                     "launcher has died: stopping")
                os._exit(1)
            if failed and not self._stop.is_set():
                try:
                    first = self._store.get("message").decode()
                    self._store.add("acked", 1)
                except Exception:
                    first = "(its message is unavailable)"
                _say(f"rank {self.rank}: stopping because {first}")
                os._exit(1)

    def fail(self, err: BaseException, detail: str) -> None:
        """Report ``err`` (``detail``: what to print), make every other rank stop, tear down. Returns only in a
        world of one (the caller then exits with status 1); otherwise ends the process with status 1."""
        self._stop.set()
        first = True
        if self._store is not None:
            try:
                first = int(self._store.add("count", 1)) == 1
                if first:
                    self._store.set("message", f"rank {self.rank} failed first: {type(err).__name__}: "
                                               f"{str(err).splitlines()[0] if str(err) else ''}"[:2000])
                    self._store.set("failed", "1")
            except Exception:  # the store is gone too: still report and exit
                pass
        if first:
            _say(f"rank {self.rank}: {detail}", stream=sys.stderr)
        else:
            _say(f"rank {self.rank}: stopping after another rank's failure (here: {type(err).__name__}: "
                 f"{str(err).splitlines()[0] if str(err) else ''})", stream=sys.stderr)
        if self._store is not None and first:
            deadline = time.monotonic() + self.ack_wait_s
            while time.monotonic() < deadline:
                try:
                    if int(self._store.add("acked", 0)) >= self.world_size - 1:
                        break
                except Exception:
                    break
                time.sleep(0.1)
        abort_process_groups()
        if self.world_size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


def _say(msg: str, stream: Any = None) -> None:
    print(f"[fastmae] {msg}", file=stream or sys.stderr, flush=True)


# ----------------------------------------------------------------------------- agreement across ranks


class StepAgreement:
    """Agree across ranks on a per-step flag without stalling the step: each step's local flags are all-reduced
    (max) asynchronously on a CPU (gloo) group and the agreed value is read one step later, when that
    reduction is long finished. Every rank calls :meth:`post` at the same steps, so all read the same value
    at the same step. In a world of one the value is immediate."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._group: Any = None
        self._pending: tuple[Any, torch.Tensor] | None = None
        if world_size > 1:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # collective: every rank creates it at start

    def post(self, flag: int) -> int:
        """Post this step's flag; returns the agreed (max over ranks) flag of the previous post (0 at first)."""
        if self._group is None:
            return int(flag)
        import torch.distributed as dist

        agreed = self.drain()
        t = torch.tensor([int(flag)], dtype=torch.int64)
        self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group, async_op=True), t)
        return agreed

    def drain(self) -> int:
        """Wait for the outstanding reduction (if any) and return its agreed value."""
        if self._pending is None:
            return 0
        work, t = self._pending
        self._pending = None
        work.wait()
        return int(t.item())

    def now(self, values: list[float], op: str = "max") -> list[float]:
        """A blocking agreement on a few numbers (max or min over ranks), for decisions needed at once."""
        if self._group is None:
            return list(values)
        import torch.distributed as dist

        self.drain_keep()
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=self._group)
        return t.tolist()

    def drain_keep(self) -> None:
        """Let the outstanding per-step reduction finish first, keeping its result for the next :meth:`post`."""
        if self._pending is not None:
            self._pending[0].wait()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; ranks get different streams."""
    s = seed + 1009 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def mask_seed(seed: int, micro_batch_id: int) -> int:
    """The masking seed of one global micro batch: a pure function, so a resumed run masks identically."""
    h = (seed * 0x9E3779B1 + micro_batch_id * 0xC2B2AE3D + 0x85EBCA77) & 0xFFFFFFFFFFFF
    h ^= h >> 17
    return (h * 0x2545F491) & 0x7FFFFFFF


# ----------------------------------------------------------------------------- DeepSpeed config


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """A DeepSpeed JSON config: a bare bundled name (``zero2.json`` or ``zero2``) or a path."""
    path = Path(name_or_path)
    if path.is_file():
        return json.loads(path.read_text())
    name = name_or_path if name_or_path.endswith(".json") else f"{name_or_path}.json"
    if "/" not in name and name in BUNDLED_DS_CONFIGS:
        return json.loads(resources.files("fastmae").joinpath("configs", name).read_text())
    raise ConfigError(
        f"DeepSpeed config {name_or_path!r} is neither a file nor a bundled config; "
        f"bundled: {', '.join(BUNDLED_DS_CONFIGS)}"
    )


def _fill(section: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``key`` to ``value`` unless the user wrote a different explicit value (then refuse)."""
    current = section.get(key, "auto")
    if current == "auto" or current == value:
        section[key] = value
        return
    raise ConfigError(
        f"DeepSpeed config sets {where}{key}={current!r} but the fastmae config implies {value!r}; "
        f"set it to \"auto\" (fastmae fills it) or change the fastmae setting instead"
    )


def fill_ds_config(
    ds: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int, precision: str,
    clip_grad: float,
) -> dict[str, Any]:
    """Fill the values fastmae owns (batch sizes, precision, clipping) so the two configs never disagree."""
    ds = json.loads(json.dumps(ds))  # deep copy
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, "")
    _fill(ds, "gradient_accumulation_steps", grad_accum, "")
    _fill(ds, "train_batch_size", micro_batch * grad_accum * world_size, "")
    _fill(ds, "gradient_clipping", float(clip_grad), "")
    from .precision import Precision

    want = Precision(precision).deepspeed
    for mode in ("bf16", "fp16"):
        section = ds.setdefault(mode, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = want[mode]
    if bool(ds["bf16"]["enabled"]) and precision == "bf16":
        raise ConfigError(
            "the DeepSpeed config enables its bf16 mode, which casts the weights to bf16 and accumulates and "
            "reduces gradients in bf16; fastmae's train.precision=bf16 is bf16 autocast over fp32 weights with "
            "fp32 gradients (the official MAE recipe's mixed precision): set \"bf16\": {\"enabled\": \"auto\"}")
    if bool(ds["bf16"]["enabled"]) != want["bf16"] or bool(ds["fp16"]["enabled"]) != want["fp16"]:
        raise ConfigError(
            f"DeepSpeed config enables bf16={ds['bf16']['enabled']} fp16={ds['fp16']['enabled']} but "
            f"train.precision={precision!r}; make them agree"
        )
    if ds.get("optimizer") or ds.get("scheduler"):
        raise ConfigError("remove 'optimizer'/'scheduler' from the DeepSpeed config: fastmae builds both "
                          "from its optim section (the paper's recipe)")
    _fill_zero_sync_settings(ds, world_size, precision, clip_grad)
    return ds


def _fill_zero_sync_settings(ds: dict[str, Any], world_size: int, precision: str, clip_grad: float) -> None:
    """The ``"auto"`` ZeRO settings that decide host syncs in the step (the bundled configs use them):

    * ``overlap_comm``: on only with more than one rank. Overlapping the gradient reduction with the backward
      pass makes DeepSpeed synchronise the device with the host before each bucket; on one rank there is no
      reduction to overlap.
    * ``compute_grad_norm`` (ZeRO-1/2): off when nothing needs the norm every step (no clipping, no fp16 loss
      scaling). The fp32 engine otherwise computes it and reads ``bool(norm is finite)`` on the host every step;
      the trainer asks for it only on the steps it logs (:func:`set_grad_norm_needed`).
    """
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    stage = int(zero.get("stage", 0))
    if zero.get("overlap_comm") == "auto":
        zero["overlap_comm"] = world_size > 1
    if zero.get("compute_grad_norm") == "auto":
        on_demand = stage in (1, 2) and not clip_grad and precision != "fp16"
        if on_demand:
            zero["compute_grad_norm"] = False
        else:
            del zero["compute_grad_norm"]  # DeepSpeed's default (ZeRO-0/3 accept no other value)


def zero3_bucket_elements(ds_config: dict[str, Any]) -> int:
    """Elements of ZeRO-3's contiguous gradient bucket (allocated once, fp32) under ``ds_config``; 0 if none."""
    zero = ds_config.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) < 3 or not zero.get("contiguous_gradients", True):
        return 0
    return int(float(zero.get("reduce_bucket_size", 5e8)))  # DeepSpeed's default: 5e8


def grad_norm_on_demand(ds_config: dict[str, Any]) -> bool:
    """True when the filled config computes the gradient norm only when asked (see :func:`set_grad_norm_needed`)."""
    return (ds_config.get("zero_optimization") or {}).get("compute_grad_norm") is False


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
                scheduler: Any = None) -> Any:
    """The DeepSpeed engine every training program steps (and ``benchmarks/throughput.py`` times): ``model``'s
    trainable parameters, fastmae's own optimizer and schedule, ``ds_config`` filled by :func:`fill_ds_config`.
    Step it as the programs do: the loss under :meth:`fastmae.precision.Precision.autocast`, then
    ``engine.backward(loss)`` and ``engine.step()``."""
    import deepspeed

    ds_config = dict(ds_config, zero_allow_untested_optimizer=True)  # LARS and other plain torch optimizers
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        model_parameters=[p for p in model.parameters() if p.requires_grad])
    engine.fastmae_grad_norm_on_demand = grad_norm_on_demand(ds_config)
    return engine


def set_grad_norm_needed(engine: Any, needed: bool) -> None:
    """Whether the next optimizer step computes the gradient norm (``engine.get_global_grad_norm()``), for an
    engine whose config computes it on demand (ZeRO-1/2 without clipping); a no-op otherwise. Only the steps
    that report the norm pay for it and for the host read that comes with it."""
    if getattr(engine, "fastmae_grad_norm_on_demand", False):
        engine.optimizer.compute_grad_norm = bool(needed)
