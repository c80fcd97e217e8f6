"""Two real hosts: the training program launched across network namespaces (tests/helpers/nodes.py: own
interfaces, addresses, host names and sshd; a shared filesystem), and what happens when one of them is lost.

* ``deepspeed --hostfile`` (pdsh over ssh), with ``.deepspeed_env`` carrying variables to every node, and torchrun
  with a c10d rendezvous started on each node, both log the losses of the same 2 ranks on one host;
* a node killed mid-run (every process, SIGKILL) and a node cut off (its link down): the survivors exit non-zero
  within limits, naming the lost rank and host, and no checkpoint is half-written;
* torchrun's elastic restarts (``--nnodes 1:2 --max-restarts 3``): after a killed rank, and then a killed node, the
  job starts again by itself and resumes from the newest checkpoint (the surviving node alone, the second time),
  every epoch seeing each sample once.

The cluster and the one-host reference run are fixtures of tests/conftest.py.

mpirun and Slurm across the same kind of hosts: tests/integration/test_multinode_launchers.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nodes
import pytest
from dsutil import REPO, free_port
from jobs import HOSTS_ARGS, RUNNER, end_started, losses, recorded, records

from fastmae import checkpoint as ckpt

pytestmark = [pytest.mark.multinode, pytest.mark.xdist_group("nodes")]

BIN = Path(sys.executable).parent
# real shards whose labels name the samples (48 of them), for sample coverage across a lost node
SHARD_ARGS = ["--ds_config", "zero2.json", "data.backend=torch", "data.num_workers=0", "data.batch_size=4",
              "train.batch_size=8", "train.log_interval=1", "train.progress=false", "train.checkpoint_interval=4",
              "train.keep_last=2", "train.trackers="]


@pytest.fixture(scope="module")
def env(hosts_env: dict[str, str]) -> dict[str, str]:
    return hosts_env


@pytest.fixture(autouse=True)
def _end_started_jobs(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    end_started()
    if "cluster" in request.fixturenames:  # nothing of this test may run on in the nodes; killed nodes come back
        c = request.getfixturevalue("cluster")
        for node in c.nodes:
            c.reset(node)


def _torchrun(c: nodes.Cluster, port: int, script_args: list[str], *extra: str, nnodes: str = "2") -> list[list[str]]:
    """The torchrun command of each node for a c10d rendezvous of ``nnodes`` nodes at node1:port (1 rank per
    node)."""
    return [c.command(n, [str(BIN / "torchrun"), "--nnodes", nnodes, "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                          "--rdzv-endpoint", f"node1:{port}", "--rdzv-id", f"job{port}", *extra, RUNNER,
                          *script_args]) for n in c.nodes]


def _start_all(cmds: list[list[str]], env: dict[str, str], logs: list[Path]) -> list[subprocess.Popen]:
    procs = []
    for cmd, log in zip(cmds, logs, strict=True):
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    for p, log in zip(procs, logs, strict=True):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{log.name} did not end within {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")
    return [p.returncode for p in procs]


def _wait_for(path: Path, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p, log in zip(procs, logs, strict=True):
            assert p.poll() is None, f"{log.name} ended (exit {p.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path} within {timeout} s"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- launching across hosts


def test_deepspeed_hostfile_over_pdsh(cluster: nodes.Cluster, env: dict[str, str], one_host: dict[int, float],
                                      tmp_path: Path) -> None:
    """``deepspeed --hostfile`` on node1 starts one rank per node through pdsh/ssh. The ranks on node2 get their
    variables from the ``.deepspeed_env`` file only (an ssh session carries none of the caller's): the socket
    interface, the op cache, and the per-micro-batch record switch that proves both hosts trained."""
    c, rec = cluster, tmp_path / "rec"
    (tmp_path / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    env_file = tmp_path / "deepspeed_env"
    carried = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "FASTMAE_TEST_RECORD": str(rec),
               "TORCH_EXTENSIONS_DIR": env["TORCH_EXTENSIONS_DIR"]}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in carried.items()))
    e = c.env(env, DS_ENV_FILE=str(env_file))
    assert "FASTMAE_TEST_RECORD" not in e
    t0 = time.monotonic()
    done = c.run(c.node("node1"), [str(BIN / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"), "--master_addr",
                                   "node1", "--master_port", str(free_port()), RUNNER, *HOSTS_ARGS,
                                   f"train.output_dir={tmp_path / 'out'}"], e, timeout=300, cwd=REPO)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    print(f"deepspeed --hostfile over pdsh, 2 nodes x 1 rank: {time.monotonic() - t0:.1f} s")
    assert "Running on the following workers: node1,node2" in out
    assert "hosts: node1 (rank 0), node2 (rank 1)" in out
    assert {(r["rank"], r["host"]) for r in recorded(rec)} == {(0, "node1"), (1, "node2")}
    assert losses(tmp_path / "out") == one_host


def test_torchrun_rendezvous_on_each_node(cluster: nodes.Cluster, env: dict[str, str], one_host: dict[int, float],
                                          tmp_path: Path) -> None:
    """``torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node1:PORT`` started on each node."""
    c = cluster
    logs = [tmp_path / f"{n.name}.log" for n in c.nodes]
    t0 = time.monotonic()
    cmds = _torchrun(c, free_port(), [*HOSTS_ARGS, f"train.output_dir={tmp_path / 'out'}"])
    procs = _start_all(cmds, c.env(env), logs)
    assert _wait_all(procs, logs) == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    print(f"torchrun c10d rendezvous, 2 nodes x 1 rank: {time.monotonic() - t0:.1f} s")
    assert "hosts: node1 (rank 0), node2 (rank 1)" in logs[0].read_text()
    assert losses(tmp_path / "out") == one_host


# ----------------------------------------------------------------------------- losing a node


def _run_until_checkpoint(c: nodes.Cluster, env: dict[str, str], out: Path, rec: Path, logs: list[Path],
                          *args: str) -> list[subprocess.Popen]:
    """A 2-node torchrun job on the id shards, running until its step-8 checkpoint is complete."""
    e = c.env(env, FASTMAE_TEST_RECORD=str(rec))
    procs = _start_all(_torchrun(c, free_port(), [*SHARD_ARGS, *args, "train.steps=1000", f"train.output_dir={out}"]),
                       e, logs)
    _wait_for(out / "checkpoints" / "step_00000008" / ckpt.STATE_FILE, procs, logs)
    return procs


def _no_half_checkpoint(ckpt_dir: Path) -> str:
    """Every checkpoint folder is complete (a save cut short leaves only its temporary folder, never a step_*
    folder without its state file); returns the newest complete tag."""
    partial = [p.name for p in ckpt_dir.glob("step_*") if not (p / ckpt.STATE_FILE).is_file()]
    assert not partial, f"half-written checkpoints: {partial}"
    tag = ckpt.latest_complete(ckpt_dir)
    assert tag is not None
    return tag


def test_node_killed_survivor_stops_naming_it(cluster: nodes.Cluster, env: dict[str, str], tmp_path: Path,
                                              id_shards: Path) -> None:
    """Every process of node2 killed (SIGKILL) after a checkpoint: node1's rank and launcher exit non-zero within
    60 s, naming rank 1 on node2, with no half-written checkpoint left. (node1 alone resuming from it with every
    sample of the interrupted epoch seen once: the elastic test below, which restarts there by itself.)"""
    c, out, rec = cluster, tmp_path / "out", tmp_path / "rec"
    logs = [tmp_path / f"{n.name}.log" for n in c.nodes]
    procs = _run_until_checkpoint(c, env, out, rec, logs, f"data.shards={id_shards}")
    time.sleep(0.3)  # somewhere after it: in a step, or in the next save
    killed = time.monotonic()
    assert c.kill_node(c.node("node2"))
    procs[0].wait(timeout=120)
    took = time.monotonic() - killed
    log = logs[0].read_text(errors="replace")
    print(f"node2 killed: node1 exited {procs[0].returncode} after {took:.1f} s")
    assert procs[0].returncode != 0 and took < 60, (took, log[-3000:])
    assert "lost rank 1 (on node2): their heartbeat stopped" in log, log[-3000:]
    _no_half_checkpoint(out / "checkpoints")


def test_partition_survivor_stops_within_the_timeout(cluster: nodes.Cluster, env: dict[str, str], tmp_path: Path,
                                                     id_shards: Path) -> None:
    """node2's link cut at the switch (its processes live on, unreachable): node1's rank waits no longer than
    train.dist_timeout_s, then it and its launcher exit non-zero naming rank 1 on node2, with no half-written
    checkpoint left."""
    c, out, rec = cluster, tmp_path / "out", tmp_path / "rec"
    logs = [tmp_path / f"{n.name}.log" for n in c.nodes]
    timeout_s = 15
    procs = _run_until_checkpoint(c, env, out, rec, logs, f"data.shards={id_shards}",
                                  f"train.dist_timeout_s={timeout_s}")
    cut = time.monotonic()
    c.cut(c.node("node2"))
    procs[0].wait(timeout=timeout_s + 90)
    took = time.monotonic() - cut
    log = logs[0].read_text(errors="replace")
    print(f"node2 cut off: node1 exited {procs[0].returncode} after {took:.1f} s (train.dist_timeout_s={timeout_s})")
    assert procs[0].returncode != 0 and took < timeout_s + 30, (took, log[-3000:])
    assert "lost rank 1 (on node2): their heartbeat stopped" in log, log[-3000:]
    _no_half_checkpoint(out / "checkpoints")


# ----------------------------------------------------------------------------- restarting by itself

ELASTIC_STEPS = 24  # 4 epochs of the 48 id samples at 8 a step


def _kill_ranks(c: nodes.Cluster, node: nodes.Node) -> list[int]:
    """SIGKILL the training processes of ``node`` (not its torchrun agent, not its sshd)."""
    killed = []
    for pid in c.pids(node):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.endswith(RUNNER) for a in cmd) and not any(a.endswith("torchrun") for a in cmd):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def _attempts(rec: Path) -> dict[int, list[dict]]:
    """The runner's records grouped by the step their process started from (one group per attempt of the job)."""
    by_start: dict[int, list[dict]] = {}
    for r in recorded(rec):
        by_start.setdefault(r["start"], []).append(r)
    return by_start


def _effective(attempts: dict[int, list[dict]]) -> list[dict]:
    """The micro batches whose optimizer steps stand: an attempt's steps up to where the next attempt resumed."""
    starts = sorted(attempts)
    ends = [*starts[1:], None]
    return [r for s, e in zip(starts, ends, strict=True) for r in attempts[s] if e is None or r["step"] <= e]


def test_elastic_restarts_after_a_lost_rank_and_a_lost_node(cluster: nodes.Cluster, env: dict[str, str],
                                                           tmp_path: Path, id_shards: Path) -> None:
    """``torchrun --nnodes 1:2 --max-restarts 3`` on each node, nobody acting after a failure: node2's rank killed
    after the step-8 checkpoint makes both agents restart their ranks, which resume from it on 2 ranks; node2 then
    killed whole after the step-16 checkpoint makes node1's agent restart alone, resuming on 1 rank. The job ends
    at its step budget with every step logged and every epoch seeing each sample once."""
    c, out, rec = cluster, tmp_path / "out", tmp_path / "rec"
    logs = [tmp_path / f"{n.name}.log" for n in c.nodes]
    ckpts = out / "checkpoints"
    args = [*SHARD_ARGS, f"data.shards={id_shards}", f"train.steps={ELASTIC_STEPS}", f"train.output_dir={out}"]
    cmds = _torchrun(c, free_port(), args, "--max-restarts", "3", "--rdzv-conf", "last_call_timeout=10",
                     nnodes="1:2")
    procs = _start_all(cmds, c.env(env, FASTMAE_TEST_RECORD=str(rec)), logs)
    _wait_for(ckpts / "step_00000008" / ckpt.STATE_FILE, procs, logs)
    lost_rank = time.monotonic(), time.time()
    assert _kill_ranks(c, c.node("node2"))
    _wait_for(ckpts / "step_00000016" / ckpt.STATE_FILE, procs, logs)
    lost_node = time.monotonic(), time.time()
    assert c.kill_node(c.node("node2"))
    procs[0].wait(timeout=300)
    log = logs[0].read_text(errors="replace")
    print(f"elastic job: node1's torchrun exited {procs[0].returncode} {time.monotonic() - lost_node[0]:.1f} s "
          "after node2 was killed")
    assert procs[0].returncode == 0, log[-4000:]
    assert f"resumed from {ckpts / 'step_00000008'} at step 8 (epoch 1" in log, log[-4000:]
    assert (f"resumed from {ckpts / 'step_00000016'} at step 16 (written by 2 rank(s), resharded through a universal "
            "checkpoint)") in log, log[-4000:]
    assert "micro 4 x accum 2 x ranks 1 = 8" in log, log[-4000:]
    assert sorted(records(out)) == list(range(1, ELASTIC_STEPS + 1))
    attempts = _attempts(rec)
    assert sorted(attempts) == [0, 8, 16], sorted(attempts)
    assert {r["host"] for r in attempts[8]} == {"node1", "node2"}
    assert {r["host"] for r in attempts[16]} == {"node1"}
    seen = _effective(attempts)
    for epoch in sorted({r["epoch"] for r in seen}):
        labels = sorted(v for r in seen if r["epoch"] == epoch for v in r["labels"] if v >= 0)
        assert labels == list(range(48)), epoch
    for what, (_, failed_at), start in (("rank", lost_rank, 8), ("node", lost_node, 16)):
        back = min(r["time"] for r in attempts[start]) - failed_at
        lost = max(r["step"] for r in attempts[start - 8]) - start
        assert 0 <= lost < 4, (what, lost)  # the newest checkpoint: fewer steps redone than a checkpoint interval
        print(f"lost {what}: training again after {back:.1f} s, {lost} step(s) done since the checkpoint redone")
