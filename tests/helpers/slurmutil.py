"""A private Slurm cluster for the tests: its own ``slurmctld`` and one ``slurmd`` per node, from the Slurm packages
installed on this machine, with a minimal configuration in a folder of the test's (no munge, no cgroups, no
accounting), so it never touches a cluster the machine may belong to.

Two shapes use it: one node on this host reached on the loopback address (tests/integration/test_slurm.py), and
one node per network-namespace host (tests/helpers/nodes.py; tests/integration/test_multinode_launchers.py), where
the daemons are started inside the namespaces by a ``spawn`` function and the clients run there too.

Starting the daemons needs root (``slurmd`` runs job steps as their user) and the Slurm binaries (Debian/Ubuntu:
``apt-get install slurmd slurmctld slurm-client``); :class:`SlurmUnavailable` says why a cluster cannot be had
(the tests skip with its message, which carries the daemon's log).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from jobs import without_launcher_vars
from storeutil import stop

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("srun", "sinfo", "scontrol", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
READY_TIMEOUT_S = 30
CLIENT_TIMEOUT_S = 30

# (node name, argv, environment, output file) -> the started daemon
Spawn = Callable[[str, list[str], dict[str, str], IO[bytes]], subprocess.Popen]
# (argv, environment) -> the finished client command (sinfo, squeue, scancel)
Client = Callable[[list[str], dict[str, str]], subprocess.CompletedProcess]


class SlurmUnavailable(RuntimeError):
    """A private Slurm cluster cannot be had here (not installed, not root, a daemon that does not come up)."""


def find_binaries() -> dict[str, str]:
    """Path of every Slurm daemon and client the tests use; raises :class:`SlurmUnavailable` when one is missing
    or this process is not root."""
    bins = {name: shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN)) for name in DAEMONS + CLIENTS}
    missing = [name for name, path in bins.items() if path is None]
    if missing:
        raise SlurmUnavailable(f"Slurm is not installed: {', '.join(missing)} not found (Debian/Ubuntu: apt-get "
                               "install slurmd slurmctld slurm-client)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd needs root (it runs job steps as their user)")
    return {name: path for name, path in bins.items() if path is not None}


def host_hardware(slurmd: str) -> tuple[str, str]:
    """This host's Slurm node name and its hardware (CPUs, sockets, cores, threads) as ``slurmd -C`` sees them."""
    proc = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30)
    first = proc.stdout.splitlines()[0] if proc.stdout.strip() else ""
    fields = dict(item.split("=", 1) for item in first.split() if "=" in item)
    if proc.returncode != 0 or "NodeName" not in fields:
        raise SlurmUnavailable(f"`slurmd -C` cannot describe this host (exit {proc.returncode}): "
                               f"{proc.stdout}{proc.stderr}")
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return fields["NodeName"], " ".join(f"{k}={fields[k]}" for k in keep if k in fields)


def this_host() -> tuple[dict[str, str], str, str]:
    """(the Slurm binaries, this host's node name, its hardware line) for a private cluster here; raises
    :class:`SlurmUnavailable` saying why there can be none."""
    bins = find_binaries()
    return (bins, *host_hardware(bins["slurmd"]))


def tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path.name} not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def write_conf(root: Path, nodes: Sequence[tuple[str, str]], hardware: str, ctld_port: int, slurmd_port: int,
               cluster_name: str = "fastmaetest") -> Path:
    """``root/slurm.conf`` for ``nodes`` (name, address), the first of them also the controller's host; every node
    has ``hardware``. Each slurmd gets its own spool folder, pid and log file (``%n``: the node's name).

    FirstJobId is random so that the rendezvous port fastmae derives from the job id differs from that of a second
    such cluster running tests at the same time on the same network."""
    (root / "state").mkdir(parents=True, exist_ok=True)
    for name, _ in nodes:
        (root / f"spool-{name}").mkdir(exist_ok=True)
    ctld_name, ctld_addr = nodes[0]
    node_lines = "".join(f"NodeName={name} NodeAddr={addr} {hardware} State=UNKNOWN\n" for name, addr in nodes)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName={cluster_name}
SlurmctldHost={ctld_name}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool-%n"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd-%n.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root / "slurmd-%n.log"}
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
{node_lines}PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _spawn_here(node: str, argv: list[str], env: dict[str, str], out: IO[bytes]) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _client_here(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)


def with_host_cgroups(argv: Sequence[str]) -> list[str]:
    """``argv`` in a mount namespace of its own that sees this host's cgroup file systems again.

    ``ip netns exec`` mounts a fresh ``/sys`` for the namespace, without ``/sys/fs/cgroup`` under it, and slurmd
    refuses to start without the cgroup mounts it detects (22.05, even with no cgroup plugin configured). The
    mounts are replayed from ``/proc/self/mounts`` (same types and options), inside a private mount namespace
    (``unshare --mount``), so nothing changes outside the command."""
    lines = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _src, target, fstype, opts = line.split()[:4]
        if target == "/sys/fs/cgroup" or target.startswith("/sys/fs/cgroup/"):
            lines.append(f"mkdir -p {target} && mount -t {fstype} -o {opts} {fstype} {target}")
    script = " && ".join([*lines, 'exec "$@"'])
    return ["unshare", "--mount", "sh", "-c", script, "sh", *argv]


@dataclass
class SlurmCluster:
    """A private Slurm cluster described by ``conf``; ``spawn`` starts its daemons, ``client`` runs its client
    commands (both in this host's network by default)."""

    root: Path
    conf: Path
    bins: dict[str, str]
    base_env: dict[str, str]
    spawn: Spawn = _spawn_here
    client: Client = _client_here
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a client command (srun, sinfo, ...) of this cluster only: launcher variables of the
        surrounding shell removed, SLURM_CONF pointing at the private configuration."""
        return {**without_launcher_vars(self.base_env), "SLURM_CONF": str(self.conf), **extra}

    def start(self, nodes: Sequence[str], wrap: Callable[[list[str]], list[str]] = list) -> None:
        """slurmctld on the first of ``nodes``, a slurmd on each (``wrap`` adjusts a daemon's command line); returns
        when every node is idle. Raises :class:`SlurmUnavailable` with the daemons' logs when they do not get
        there within :data:`READY_TIMEOUT_S`."""
        env = self.env()
        starts = [("slurmctld", nodes[0], [self.bins["slurmctld"], "-D", "-f", str(self.conf)])]
        starts += [(f"slurmd-{n}", n, [self.bins["slurmd"], "-D", "-f", str(self.conf), "-N", n]) for n in nodes]
        for name, node, argv in starts:
            with (self.root / f"{name}.out").open("wb") as out:
                self.procs.append(self.spawn(node, wrap(argv), env, out))
        names = [name for name, _, _ in starts]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            for name, proc in zip(names, self.procs, strict=True):
                if proc.poll() is not None:
                    log = self.root / f"{name}.log"
                    raise SlurmUnavailable(f"{name} exited with status {proc.returncode} on start; "
                                           f"{tail(log if log.exists() else self.root / f'{name}.out')}")
            info = self.client([self.bins["sinfo"], "-h", "-N", "-o", "%N %t"], env)
            states = info.stdout.split() if info.returncode == 0 else [info.stderr.strip()]
            if states[1::2] == ["idle"] * len(nodes):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"{name}.log:\n{tail(self.root / f'{name}.log')}" for name in names)
                raise SlurmUnavailable(f"the Slurm nodes are not idle after {READY_TIMEOUT_S} s (sinfo: "
                                       f"{' '.join(states)!r}); {logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel what is left of the jobs (their slurmstepd would outlive slurmd), then stop the daemons."""
        env = self.env()
        if self.procs and self.procs[0].poll() is None:
            self.client([self.bins["scancel"], "--full", "--user", "root"], env)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                jobs = self.client([self.bins["squeue"], "-h", "-o", "%i"], env)
                if jobs.returncode != 0 or not jobs.stdout.strip():
                    break
                time.sleep(0.5)
        while self.procs:  # the slurmds first, then slurmctld
            stop(self.procs.pop(), grace=20)
