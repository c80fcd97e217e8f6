"""Several real hosts on one machine: Linux network namespaces joined by a private virtual switch, each with its own
interface, address, host name, loopback and sshd -- for multi-node launches (deepspeed over pdsh/ssh, torchrun
rendezvous, mpirun, Slurm) and for losing a node or its link.

Layout of a cluster named ``P`` (by default ``fmn<pid>c<n>``, ``n`` counting the clusters of that process, so that
concurrent test workers never meet):

* namespace ``P-sw`` holds a bridge ``br0``; namespace ``P-node<i>`` holds ``eth0`` (address 10.213.0.<i>/24),
  joined to the bridge by a veth pair whose switch end is ``port<i>`` in ``P-sw``. Nothing is created in the
  machine's own network namespace: every packet stays on these links.
* each node sees host names ``node1 .. nodeN`` through ``/etc/netns/P-node<i>/hosts`` (``ip netns exec`` binds it
  over ``/etc/hosts``) and runs with its own host name (a UTS namespace per command);
* an sshd per node listening on its address, with a host key and a client key made for the cluster in its
  folder; ``bin/ssh`` there is an ``ssh`` that uses the cluster's client config, so whatever runs with that folder
  first on PATH (pdsh, DeepSpeed's launcher, Open MPI) reaches ``nodeI`` without touching ``~/.ssh``;
* the filesystem is shared, as NFS would be on a cluster: the repository and its venv are at the same path on
  every node.

:func:`cluster` is a context manager that removes everything (processes in the namespaces, the namespaces, the
``/etc/netns`` entries) when the block ends, also after a failure; :func:`sweep` removes what a killed run left.
Run as a script to rehearse a launch by hand::

    sudo python tests/helpers/nodes.py up --nodes 2 --dir /tmp/cluster    # prints how to use it
    sudo ip netns exec fmn-node1 bash                                     # a shell "on node1" (--prefix fmn)
    sudo python tests/helpers/nodes.py down --dir /tmp/cluster
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0"
SSH_READY_S = 20.0
TOOLS = ("ip", "unshare", "ssh", "ssh-keygen")
SSHD = "/usr/sbin/sshd"
_COUNT = itertools.count(1)


def missing() -> str | None:
    """Why namespaced nodes cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2, util-linux, openssh-client)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed (Debian: openssh-server; scripts/install_launchers.sh installs it)"
    probe = f"fmnprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


@dataclass
class Node:
    index: int
    name: str  # host name: node1, node2, ...
    ns: str  # network namespace
    addr: str

    @property
    def port(self) -> str:
        """The switch side of this node's link (in the switch namespace)."""
        return f"port{self.index}"


@dataclass
class Cluster:
    prefix: str
    folder: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def bin(self) -> Path:
        return self.folder / "bin"

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # ------------------------------------------------------------------ commands on a node
    def command(self, node: Node, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``node``: in its network namespace, with its host name."""
        return ["ip", "netns", "exec", node.ns, "unshare", "--uts", "sh", "-c",
                f'hostname {node.name} && exec "$@"', "sh", *argv]

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """An environment whose ``ssh`` is the cluster's (``bin`` first on PATH) and whose sockets use ``eth0``."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env.update(GLOO_SOCKET_IFNAME="eth0", NCCL_SOCKET_IFNAME="eth0", PDSH_RCMD_TYPE="ssh")
        env.update(extra)
        return env

    def popen(self, node: Node, argv: Sequence[str], env: dict[str, str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(node, argv), env=env, start_new_session=True, **kw)

    def run(self, node: Node, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(node, argv), env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout, **kw)

    def pids(self, node: Node) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", node.ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    # ------------------------------------------------------------------ failures
    def kill_node(self, node: Node) -> list[int]:
        """SIGKILL every process of ``node`` (its sshd included): the node is gone."""
        pids = self.pids(node)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def cut(self, node: Node) -> None:
        """Cut ``node``'s link at the switch: a network partition (its processes live on)."""
        _ip("link", "set", node.port, "down", ns=self.switch)

    def mend(self, node: Node) -> None:
        _ip("link", "set", node.port, "up", ns=self.switch)

    def reset(self, node: Node) -> None:
        """``node`` as it was made: every process but its sshd killed, its link up, and its sshd started again if
        the node was killed (a node rebooted)."""
        sshd = False
        for pid in self.pids(node):
            if _is_sshd(pid):
                sshd = True
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.mend(node)
        if not sshd:
            _sshd(self, node)
            _wait_ssh(self, [node])


# ---------------------------------------------------------------------------------------------------- set-up


def _network(c: Cluster, count: int) -> None:
    _ip("netns", "add", c.switch)
    _ip("link", "add", "br0", "type", "bridge", ns=c.switch)
    _ip("link", "set", "br0", "up", ns=c.switch)
    hosts = "127.0.0.1 localhost\n" + "".join(f"{SUBNET}.{i} node{i}\n" for i in range(1, count + 1))
    for i in range(1, count + 1):
        node = Node(i, f"node{i}", f"{c.prefix}-node{i}", f"{SUBNET}.{i}")
        c.nodes.append(node)
        _ip("netns", "add", node.ns)
        _ip("link", "add", node.port, "netns", c.switch, "type", "veth", "peer", "name", "eth0", "netns", node.ns)
        _ip("link", "set", node.port, "master", "br0", ns=c.switch)
        _ip("link", "set", node.port, "up", ns=c.switch)
        _ip("addr", "add", f"{node.addr}/24", "dev", "eth0", ns=node.ns)
        _ip("link", "set", "eth0", "up", ns=node.ns)
        _ip("link", "set", "lo", "up", ns=node.ns)
        etc = Path("/etc/netns") / node.ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts)


def _keys(c: Cluster) -> None:
    ssh = c.folder / "ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        if not (ssh / key).exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key)], check=True)
    (ssh / "authorized_keys").write_text((ssh / "client_key.pub").read_text())
    (ssh / "config").write_text(
        "Host node*\n"
        f"  IdentityFile {ssh / 'client_key'}\n  User root\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n  ConnectTimeout 5\n")
    c.bin.mkdir(exist_ok=True)
    wrapper = c.bin / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {ssh / "config"} "$@"\n')
    wrapper.chmod(0o755)


def _sshd(c: Cluster, node: Node) -> None:
    ssh = c.folder / "ssh"
    cfg = ssh / f"sshd_{node.name}.conf"
    # a login shell on the node gets the caller's PATH (the venv's tools), as a cluster's shared profile would
    cfg.write_text(
        f"ListenAddress {node.addr}\nPort 22\nHostKey {ssh / 'host_key'}\nPidFile {ssh / f'sshd_{node.name}.pid'}\n"
        f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitUserEnvironment no\n"
        f"SetEnv PATH={c.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}\nMaxStartups 64\nMaxSessions 64\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    log = open(c.folder / f"sshd_{node.name}.log", "ab")  # noqa: SIM115 (kept open by the daemon)
    subprocess.Popen(c.command(node, [SSHD, "-D", "-e", "-f", str(cfg)]), stdout=log, stderr=log,
                     start_new_session=True)


def _is_sshd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"sshd")
    except OSError:
        return False


def _wait_ssh(c: Cluster, which: Sequence[Node] | None = None) -> None:
    deadline = time.time() + SSH_READY_S
    for node in c.nodes if which is None else which:
        while True:
            done = c.run(c.nodes[0], ["ssh", node.name, "hostname"], timeout=15)
            if done.returncode == 0 and done.stdout.strip() == node.name:
                break
            if time.time() > deadline:
                raise RuntimeError(f"sshd on {node.name} did not answer: {done.stderr.strip()}\n"
                                   + (c.folder / f"sshd_{node.name}.log").read_text(errors="replace"))
            time.sleep(0.2)


def up(count: int, folder: Path, prefix: str | None = None) -> Cluster:
    """Make a cluster of ``count`` nodes (see the module's description); its state is saved in ``folder``."""
    c = Cluster(prefix or f"fmn{os.getpid()}c{next(_COUNT)}", Path(folder))
    c.folder.mkdir(parents=True, exist_ok=True)
    (c.folder / "cluster.json").write_text(json.dumps({"prefix": c.prefix, "nodes": count}))
    try:
        _network(c, count)
        _keys(c)
        for node in c.nodes:
            _sshd(c, node)
        _wait_ssh(c)
    except BaseException:
        down(c)
        raise
    return c


def down(c: Cluster) -> None:
    """Kill every process in the cluster's namespaces, delete them and their /etc/netns entries."""
    names = [n.ns for n in c.nodes] or [f"{c.prefix}-node{i}" for i in range(1, 9)]
    _remove(c.prefix, names)


def _remove(prefix: str, names: Sequence[str]) -> None:
    for ns in [*names, f"{prefix}-sw"]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    for ns in [*names, f"{prefix}-sw"]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def sweep() -> list[str]:
    """Remove the namespaces of clusters whose creating process is gone (a run killed before its clean-up)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    stale: dict[str, list[str]] = {}
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("fmn") or "-" not in name:
            continue
        prefix = name.split("-", 1)[0]
        owner = prefix[3:].split("c", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            stale.setdefault(prefix, []).append(name)
    for prefix, names in stale.items():
        _remove(prefix, [n for n in names if not n.endswith("-sw")])
    return sorted(stale)


@contextlib.contextmanager
def cluster(count: int, folder: Path) -> Iterator[Cluster]:
    """A cluster for the ``with`` block; everything is removed when it ends, however it ends."""
    sweep()
    c = up(count, folder)
    try:
        yield c
    finally:
        down(c)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="N network-namespace nodes with sshd on this machine (root).")
    ap.add_argument("action", choices=("up", "down"))
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--dir", type=Path, required=True, help="folder for the keys, configs and logs")
    ap.add_argument("--prefix", default="fmn", help="namespace name prefix")
    args = ap.parse_args(argv)
    if args.action == "down":
        state = json.loads((args.dir / "cluster.json").read_text())
        _remove(state["prefix"], [f"{state['prefix']}-node{i}" for i in range(1, state["nodes"] + 1)])
        return 0
    reason = missing()
    if reason:
        print(f"cannot make nodes here: {reason}", file=sys.stderr)
        return 1
    c = up(args.nodes, args.dir, args.prefix)
    names = " ".join(n.name for n in c.nodes)
    print(f"nodes {names} up ({SUBNET}.0/24 on a private switch).\n"
          f"  shell on node1:  ip netns exec {c.nodes[0].ns} bash\n"
          f"  there, first:    export PATH={c.bin}:$PATH GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0\n"
          f"  then e.g.:       ssh node2 hostname; pdsh -R ssh -w {','.join(n.name for n in c.nodes)} hostname\n"
          f"  remove:          python {__file__} down --dir {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
