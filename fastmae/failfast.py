"""Ranks that stop together: :class:`FailFast` ends every rank within seconds when one fails, whatever the
others are blocked in; :class:`StepAgreement` agrees on a per-step flag (a stop signal, a non-finite loss)
without stalling the step."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore, _get_default_store

from .distributed import abort_process_groups


class FailFast:
    """Ends every rank of the job within seconds when one rank fails, whatever the others are blocked in.

    A rank that fails writes its error into the job's rendezvous store (the c10d store every rank already
    shares); a watcher thread on every rank polls the store and, on seeing it, prints which rank failed first
    and ends its process at once (``os._exit``: a collective waiting for the dead rank cannot be interrupted
    otherwise). The failing rank waits a few seconds for the others to acknowledge, tears its process groups
    down without a barrier and exits with status 1. A store that stops answering means its host (rank 0 or
    the launcher) is gone: the watcher ends its rank too.

    Every watcher also counts a heartbeat in the store at each poll. When a rank fails in communication (a peer's
    connection reset, a collective timed out), it first looks for the ranks whose heartbeat stopped and names
    them and their hosts (``hosts``: every rank's host name): the ranks of a node that died or that the network
    cut off.
    """

    def __init__(self, rank: int, world_size: int, poll_s: float = 1.0, ack_wait_s: float = 5.0,
                 hosts: tuple[str, ...] = ()) -> None:
        self.rank, self.world_size = rank, world_size
        self.poll_s, self.ack_wait_s = poll_s, ack_wait_s
        self.hosts = hosts
        self._store: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FailFast:
        if self.world_size > 1 and dist.is_initialized():
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
                self._store.add(f"beat/{self.rank}", 1)
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
        if first and self._store is not None and communication_error(err):
            lost = self.silent_ranks(2.5 * self.poll_s + 0.5)
            if lost:
                _say(f"rank {self.rank}: lost {describe_ranks(lost, self.hosts)}: their heartbeat stopped (the "
                     "process or its node died, or the network to it failed); the job stops. Resume with "
                     "train.resume=auto from the last complete checkpoint", stream=sys.stderr)
                detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
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


    def silent_ranks(self, wait_s: float) -> list[int]:
        """The other ranks whose heartbeat did not advance within ``wait_s`` ([] when the store is gone)."""
        try:
            before = [int(self._store.add(f"beat/{r}", 0)) for r in range(self.world_size)]
            time.sleep(wait_s)
            after = [int(self._store.add(f"beat/{r}", 0)) for r in range(self.world_size)]
        except Exception:
            return []
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]


# what a collective that lost a peer raises: gloo's and NCCL's words for a dead or unreachable peer
_COMMUNICATION_WORDS = ("connection reset", "connection closed", "connection refused", "broken pipe", "timed out",
                        "timeout", "socket", "nccl", "gloo", "remote process", "peer")


def communication_error(err: BaseException) -> bool:
    """Whether ``err`` comes from communication with other ranks (rather than from this rank's own work)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _COMMUNICATION_WORDS)


def describe_ranks(ranks: list[int], hosts: tuple[str, ...]) -> str:
    """``rank 1 (on node2)`` / ``ranks 2, 3 (on node2)`` / ``ranks 1 (on node2), 5 (on node3)``."""
    if not hosts:
        return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
    by_host: dict[str, list[int]] = {}
    for r in ranks:
        by_host.setdefault(hosts[r] if r < len(hosts) else "?", []).append(r)
    parts = [f"{', '.join(map(str, rs))} (on {host})" for host, rs in by_host.items()]
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(parts)}"


def _say(msg: str, stream: Any = None) -> None:
    print(f"[fastmae] {msg}", file=stream or sys.stderr, flush=True)


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
            self._group = dist.new_group(backend="gloo")  # collective: every rank creates it at start

    def post(self, flag: int) -> int:
        """Post this step's flag; returns the agreed (max over ranks) flag of the previous post (0 at first)."""
        if self._group is None:
            return int(flag)
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
        self.drain_keep()
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=self._group)
        return t.tolist()

    def drain_keep(self) -> None:
        """Let the outstanding per-step reduction finish first, keeping its result for the next :meth:`post`."""
        if self._pending is not None:
            self._pending[0].wait()
