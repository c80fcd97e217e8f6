"""This process's place in the job (rank, world size, local rank, rendezvous address), read from whichever
launcher started it (torchrun or the deepspeed launcher, Open MPI's mpirun, MPICH / Intel MPI, a Slurm
``srun`` step), checked for contradictions and exported as the torch variables that ``init_process_group`` and
DeepSpeed read. See docs/launching.md.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, replace

TORCH = "torchrun/deepspeed"
OPENMPI = "openmpi"
MPICH = "mpich/intel-mpi"
SLURM = "slurm"
SINGLE = "single process"

DEFAULT_MASTER_PORT = 29500
LOOPBACK = "127.0.0.1"
# Ports derived from a Slurm job id stay in [15000, 30000): below Linux's ephemeral range (32768 and up), so an
# outgoing connection is unlikely to hold one.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000
_STEPS_PER_JOB = 16  # steps of one job that get distinct ports

_MPI_SOURCES = (OPENMPI, MPICH)


class LaunchError(ValueError):
    """The launcher's environment variables are missing, malformed or contradict each other."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, and where rank 0 listens for the rendezvous."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str


@dataclass(frozen=True)
class _Claim:
    """What one launcher's variables say; ``None`` where they say nothing."""

    source: str
    desc: str  # the variables read, "NAME=value ...", for error messages
    rank: int
    world: int
    local_rank: int | None = None
    local_world: int | None = None
    addr: str | None = None
    port: int | None = None
    single_host: bool = False
    nested: bool = False  # torch variables written by a launcher running inside each task


# ----------------------------------------------------------------------------- public API


def discover(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address of this process from the launcher's variables.

    Raises :class:`LaunchError` when they are incomplete or contradict each other (see the module docstring);
    reads nothing but ``environ``, except on MPI across hosts without ``MASTER_ADDR``, where every rank must
    call it (mpi4py broadcasts rank 0's address).
    """
    claims = [c for c in (_torch(environ), _openmpi(environ), _mpich(environ), _slurm(environ)) if c is not None]
    addr_env = _text(environ, "MASTER_ADDR")
    port_env = _port(environ)
    if not claims:
        _check_stray_local_rank(environ, 0, SINGLE)
        return LaunchEnv(0, 1, 0, 1, addr_env or LOOPBACK, port_env or DEFAULT_MASTER_PORT, SINGLE)

    win = claims[0]
    for other in claims[1:]:
        _check_agree(win, other)
    for other in claims[1:]:
        if _may_fill(win, other):
            win = _fill(win, other)
    if win.source != TORCH:
        _check_stray_local_rank(environ, win.local_rank, win.source)
    _check_rank(win)

    if win.local_rank is None:
        if win.world != 1:
            raise LaunchError(f"{win.desc}: the local rank is unknown; set LOCAL_RANK (this process's index on "
                              "its node)")
        win = replace(win, local_rank=0)
    if win.local_world is None:
        if win.world == 1 or win.single_host or _is_loopback(addr_env):
            win = replace(win, local_world=win.world)
        else:
            raise LaunchError(f"{win.desc}: the number of processes on this node is unknown; set "
                              "LOCAL_WORLD_SIZE")
    assert win.local_rank is not None and win.local_world is not None
    _check_ranges(win)

    single_host = win.single_host or win.local_world == win.world
    if addr_env:
        addr = addr_env
    elif single_host:
        addr = LOOPBACK
    elif win.addr:
        addr = win.addr
    elif win.source in _MPI_SOURCES:
        addr = _mpi_rank0_address(win.world, win.rank)
        if addr is None:
            raise LaunchError(
                f"{win.desc}: ranks on several hosts ({win.local_world} of {win.world} here) and MASTER_ADDR is not "
                "set. The MPI launcher does not export rank 0's host: pass it, e.g. `mpirun -x MASTER_ADDR=<host of "
                f"rank 0> -x MASTER_PORT={DEFAULT_MASTER_PORT} ...` (Intel MPI / MPICH: -genv MASTER_ADDR <host>), "
                "or install mpi4py to have it broadcast")
    else:
        raise LaunchError(f"{win.desc}: ranks on several hosts ({win.local_world} of {win.world} here) and "
                          "MASTER_ADDR is not set; set MASTER_ADDR to the host of rank 0")
    port = port_env or win.port or DEFAULT_MASTER_PORT
    return LaunchEnv(win.rank, win.world, win.local_rank, win.local_world, addr, port, win.source)


def export(env: LaunchEnv, environ: MutableMapping[str, str] = os.environ) -> None:
    """Write the variables torch's env:// rendezvous and DeepSpeed's ``init_distributed`` read.

    ``LOCAL_SIZE`` is the deepspeed launcher's name for the local world size (its CPU accelerator counts
    devices with it).
    """
    environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        LOCAL_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def iter_hostlist(expr: str) -> Iterator[str]:
    """Host names of a Slurm hostlist expression, in order, lazily: ``node[01-03,07],gpu5`` gives node01,
    node02, node03, node07, gpu5; zero padding follows the lower bound's digits; several bracket groups in one
    name expand to their product (``r[1-2]n[1-2]``: r1n1, r1n2, r2n1, r2n2). Raises :class:`LaunchError` on a
    malformed expression."""
    text = expr.strip()
    if not text:
        raise LaunchError("empty Slurm hostlist")
    for item in _split_top_level(text):
        if not item:
            raise LaunchError(f"Slurm hostlist {expr!r} has an empty entry")
        parts = _parse_item(item, expr)
        for combo in itertools.product(*parts):
            yield "".join(combo)


def expand_hostlist(expr: str) -> list[str]:
    """Every host name of a Slurm hostlist expression (:func:`iter_hostlist`), as a list."""
    return list(iter_hostlist(expr))


def first_host(expr: str) -> str:
    """First host of a Slurm hostlist expression, without expanding the rest."""
    return next(iter_hostlist(expr))


def expand_tasks_per_node(expr: str) -> list[int]:
    """Tasks on each node from Slurm's compressed count list: ``2(x3),1`` gives [2, 2, 2, 1]."""
    out: list[int] = []
    for item in expr.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise LaunchError(f"cannot read Slurm tasks-per-node list {expr!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def slurm_master_port(job_id: int, step_id: int = 0) -> int:
    """Rendezvous port of a Slurm job step: every task of the step computes the same one, neighbouring job
    ids and the first steps of one job get different ones."""
    return SLURM_PORT_BASE + (job_id * _STEPS_PER_JOB + step_id % _STEPS_PER_JOB) % SLURM_PORT_SPAN


# ----------------------------------------------------------------------------- one reader per launcher


def _torch(environ: Mapping[str, str]) -> _Claim | None:
    pair = _pair(environ, "RANK", "WORLD_SIZE")
    if pair is None:
        return None
    rank, world = pair
    local_rank = _int(environ, "LOCAL_RANK")
    local_world_name = "LOCAL_WORLD_SIZE" if _text(environ, "LOCAL_WORLD_SIZE") else "LOCAL_SIZE"
    local_world = _int(environ, local_world_name)
    nested = bool(_text(environ, "TORCHELASTIC_RUN_ID") or _text(environ, "CROSS_RANK"))
    names = ["RANK", "WORLD_SIZE", "LOCAL_RANK", local_world_name]
    return _Claim(TORCH, _desc(environ, names), rank, world, local_rank, local_world, nested=nested)


def _openmpi(environ: Mapping[str, str]) -> _Claim | None:
    pair = _pair(environ, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
    if pair is None:
        return None
    local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK")
    local_world = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE")
    names = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE"]
    return _Claim(OPENMPI, _desc(environ, names), *pair, local_rank, local_world)


def _mpich(environ: Mapping[str, str]) -> _Claim | None:
    pair = _pair(environ, "PMI_RANK", "PMI_SIZE")
    if pair is None:
        return None
    local_rank_name = _first_set(environ, "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
    local_world_name = _first_set(environ, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
    local_rank = _int(environ, local_rank_name)
    local_world = _int(environ, local_world_name)
    names = ["PMI_RANK", "PMI_SIZE", local_rank_name, local_world_name]
    return _Claim(MPICH, _desc(environ, names), *pair, local_rank, local_world)


def _slurm(environ: Mapping[str, str]) -> _Claim | None:
    """A task started by ``srun``. A batch script or an ``salloc`` shell also carries SLURM_PROCID=0 and the
    allocation's SLURM_NTASKS but no step id: one process, not rank 0 of SLURM_NTASKS."""
    step_name = _first_set(environ, "SLURM_STEP_ID", "SLURM_STEPID")
    if not _text(environ, step_name) or not _text(environ, "SLURM_PROCID"):
        return None
    rank = _int(environ, "SLURM_PROCID")
    world_name = _first_set(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    world = _int(environ, world_name)
    names = ["SLURM_PROCID", world_name, "SLURM_LOCALID", step_name]
    if world is None:
        raise LaunchError(f"{_desc(environ, names)}: a Slurm job step without its task count; expected "
                          "SLURM_STEP_NUM_TASKS or SLURM_NTASKS")
    assert rank is not None
    local_rank = _int(environ, "SLURM_LOCALID")
    local_world = None
    per_node_name = _first_set(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
    per_node_text = _text(environ, per_node_name)
    if per_node_text:
        names.append(per_node_name)
        per_node = expand_tasks_per_node(per_node_text)
        node = _int(environ, "SLURM_NODEID")
        if node is not None and node < len(per_node) and per_node_name != "SLURM_NTASKS_PER_NODE":
            local_world = per_node[node]
        elif len(set(per_node)) == 1:
            local_world = per_node[0]
    nodes = _int(environ, "SLURM_STEP_NUM_NODES")
    nodelist_name = _first_set(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    nodelist = _text(environ, nodelist_name)
    addr = None
    if nodelist:
        names.append(nodelist_name)
        try:
            addr = first_host(nodelist)
        except LaunchError as e:
            raise LaunchError(f"{nodelist_name}={nodelist!r}: {e}") from None
    job_id = _int(environ, _first_set(environ, "SLURM_JOB_ID", "SLURM_JOBID"))
    step_id = _int(environ, step_name)
    port = None
    if job_id is not None:
        port = slurm_master_port(job_id, step_id or 0)
    single_host = nodes == 1 or (local_world is not None and local_world == world)
    return _Claim(SLURM, _desc(environ, names), rank, world, local_rank, local_world, addr, port, single_host)


# ----------------------------------------------------------------------------- consistency


def _check_agree(win: _Claim, other: _Claim) -> None:
    """Raise when two sources describe different processes (see the module docstring for the exemptions)."""
    if win.nested or (win.source in _MPI_SOURCES and other.source == SLURM):
        return
    hint = ""
    if win.source == TORCH:
        hint = ("; RANK/WORLD_SIZE left exported in the job script or shell? Unset them, or make them match the "
                "launcher's")
    if win.world != other.world:
        raise LaunchError(f"{win.source} and {other.source} disagree on the world size: {win.desc} but "
                          f"{other.desc}{hint}")
    if win.rank != other.rank:
        raise LaunchError(f"{win.source} and {other.source} disagree on this process's rank: {win.desc} but "
                          f"{other.desc}{hint}")
    for field, what in (("local_rank", "local rank"), ("local_world", "number of processes on this node")):
        a, b = getattr(win, field), getattr(other, field)
        if a is not None and b is not None and a != b:
            raise LaunchError(f"{win.source} and {other.source} disagree on the {what}: {win.desc} but "
                              f"{other.desc}{hint}")


def _may_fill(win: _Claim, other: _Claim) -> bool:
    """Whether ``other`` describes the same process as ``win``, so its extra values can be used."""
    return win.world == other.world and win.rank == other.rank and all(
        a is None or b is None or a == b
        for a, b in ((win.local_rank, other.local_rank), (win.local_world, other.local_world)))


def _fill(win: _Claim, other: _Claim) -> _Claim:
    """``win`` with the values it lacks taken from ``other``."""
    return replace(
        win,
        local_rank=win.local_rank if win.local_rank is not None else other.local_rank,
        local_world=win.local_world if win.local_world is not None else other.local_world,
        addr=win.addr or other.addr,
        port=win.port or other.port,
        single_host=win.single_host or other.single_host,
    )


def _check_rank(win: _Claim) -> None:
    if win.world < 1:
        raise LaunchError(f"{win.desc}: the world size must be at least 1")
    if not 0 <= win.rank < win.world:
        raise LaunchError(f"{win.desc}: rank {win.rank} is outside [0, {win.world})")


def _check_ranges(win: _Claim) -> None:
    assert win.local_rank is not None and win.local_world is not None
    if not 1 <= win.local_world <= win.world:
        raise LaunchError(f"{win.desc}: {win.local_world} processes on this node but {win.world} in the job")
    if not 0 <= win.local_rank < win.local_world:
        raise LaunchError(f"{win.desc}: local rank {win.local_rank} is outside [0, {win.local_world})")


def _check_stray_local_rank(environ: Mapping[str, str], local_rank: int | None, source: str) -> None:
    """A LOCAL_RANK exported without RANK must match the launcher's: code that read it would pick another GPU."""
    value = _int(environ, "LOCAL_RANK")
    if value is not None and local_rank is not None and value != local_rank:
        raise LaunchError(f"LOCAL_RANK={value} but the launcher ({source}) says local rank {local_rank}; unset "
                          "LOCAL_RANK or set RANK and WORLD_SIZE as well")


# ----------------------------------------------------------------------------- MPI across hosts


def _mpi_rank0_address(world: int, rank: int) -> str | None:
    """Rank 0's address broadcast to every rank through mpi4py (a collective: every rank must get here), or
    None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world or comm.Get_rank() != rank:
        raise LaunchError(f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()}, the environment rank {rank} "
                          f"of {world}")
    return comm.bcast(_own_address() if rank == 0 else None, root=0)


def _own_address() -> str:
    """An address of this host other hosts can reach: the host name's if it is not loopback, else the first
    one ``hostname -I`` lists."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    try:
        listed = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    for addr in listed:
        if not addr.startswith("127.") and addr != "::1":
            return addr
    raise LaunchError("cannot find a non-loopback address of rank 0's host; set MASTER_ADDR")


# ----------------------------------------------------------------------------- hostlist parsing


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"Slurm hostlist {text!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"Slurm hostlist {text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise LaunchError(f"Slurm hostlist {text!r}: unbalanced '['")
    items.append(text[start:].strip())
    return items


def _parse_item(item: str, expr: str) -> list[list[str]]:
    """One host pattern as a list of choices per segment: literal text has one choice, a bracket group many."""
    parts: list[list[str]] = []
    for literal, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
        if literal:
            parts.append([literal])
        if group:
            parts.append(_expand_group(group, expr))
        elif not literal:
            continue
    if re.search(r"\[\]", item):
        raise LaunchError(f"Slurm hostlist {expr!r}: empty brackets")
    return parts


def _expand_group(group: str, expr: str) -> list[str]:
    out: list[str] = []
    for rng in group.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", rng)
        if m is None:
            raise LaunchError(f"Slurm hostlist {expr!r}: cannot read range {rng!r}")
        lo_text, hi_text = m.group(1), m.group(2)
        lo, hi = int(lo_text), int(hi_text) if hi_text is not None else int(lo_text)
        if hi < lo:
            raise LaunchError(f"Slurm hostlist {expr!r}: range {rng!r} runs backwards")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


# ----------------------------------------------------------------------------- reading variables


def _text(environ: Mapping[str, str], name: str | None) -> str:
    """The variable's value, stripped; empty when unset (an empty value counts as unset)."""
    return environ.get(name, "").strip() if name else ""


def _first_set(environ: Mapping[str, str], *names: str) -> str:
    """The first of ``names`` that is set (non-empty), else the first name (reads as unset)."""
    return next((n for n in names if _text(environ, n)), names[0])


def _int(environ: Mapping[str, str], name: str | None) -> int | None:
    text = _text(environ, name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{name}={environ[name]!r} is not an integer") from None


def _port(environ: Mapping[str, str]) -> int | None:
    port = _int(environ, "MASTER_PORT")
    if port is not None and not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port")
    return port


def _pair(environ: Mapping[str, str], rank_name: str, size_name: str) -> tuple[int, int] | None:
    """(rank, size) when both are set, None when neither is; one without the other is an error."""
    rank, size = _int(environ, rank_name), _int(environ, size_name)
    if rank is None and size is None:
        return None
    if rank is None or size is None:
        have, missing = (rank_name, size_name) if rank is not None else (size_name, rank_name)
        raise LaunchError(f"{have}={environ[have]!r} is set but {missing} is not; a launcher sets both")
    return rank, size


def _desc(environ: Mapping[str, str], names: list[str]) -> str:
    shown = [f"{n}={_text(environ, n)}" for n in dict.fromkeys(names) if n and _text(environ, n)]
    return " ".join(shown)


def _is_loopback(addr: str) -> bool:
    return addr == "localhost" or addr.startswith("127.") or addr == "::1"
