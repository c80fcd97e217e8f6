"""Real Open MPI jobs (``mpirun -n 2``) that start the process groups and the training program, with rank and
world size from Open MPI's variables. What every launcher exports, read from plain dicts, and the refused
environments: tests/unit/test_launch_env.py."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from dsutil import deepspeed_env, free_port, run_job

MPIRUN = shutil.which("mpirun")


needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="Open MPI's mpirun is not installed (apt install "
                                                         "openmpi-bin; bash .ci/run installs it)")


def mpirun(n: int, args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """``mpirun -n N`` on this host, output of every rank; Open MPI refuses root without the two variables."""
    env = dict(env, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")  # 2 ranks on a 2-core machine that other tests share
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    # by name, not /usr/bin/mpirun: Open MPI takes an absolute path as --prefix and puts /usr/bin first on the ranks'
    # PATH, so they would build DeepSpeed's comm op with another ninja than the other tests (a rebuild)
    proc = run_job(["mpirun", "-n", str(n), *args], env=env, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mpirun exited {proc.returncode}:\n{out[-4000:]}"
    return out


PROBE = """
import torch, torch.distributed as dist
from fastmae.distributed import init_distributed, shutdown_distributed
info = init_distributed(60)
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(f"probe rank {info.rank} of {info.world_size} local {info.local_rank} via {info.launcher}: sum {t.item():g}")
shutdown_distributed()
"""


@needs_mpirun
def test_mpirun_gives_each_process_its_rank(tmp_path: Path) -> None:
    env = dict(deepspeed_env(), MASTER_PORT=str(free_port()))
    out = mpirun(2, ["-x", "MASTER_PORT", sys.executable, "-c", PROBE], env)
    for r in (0, 1):
        assert f"probe rank {r} of 2 local {r} via openmpi: sum 3" in out, out[-3000:]


@needs_mpirun
def test_deepspeed_openmpi_launcher_starts_the_training_program(tmp_path: Path) -> None:
    """``deepspeed --launcher openmpi`` with a hostfile: DeepSpeed runs mpirun, which exports no RANK; the program
    still trains as 2 ranks. (--no_ssh_check: one host, no ssh here; --force_multi: use the launcher on one host.)"""
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    env = dict(deepspeed_env(), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"), "--no_ssh_check",
           "--force_multi", "--launcher", "openmpi", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "fastmae/train.py", "--ds_config", "zero2.json", "data.backend=synthetic", "data.synthetic_size=64",
           "data.batch_size=8", "train.batch_size=16", "train.steps=2", "train.log_interval=1", "train.progress=false",
           "train.trackers=", f"train.output_dir={tmp_path / 'out'}"]
    proc = run_job(cmd, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "cmd = mpirun -n 2" in out  # DeepSpeed's Open MPI runner, not its local launcher
    assert "2 rank(s) on cpu (launcher: openmpi)" in out, out[-3000:]
    assert "micro 8 x accum 1 x ranks 2 = 16" in out
    assert (tmp_path / "out" / "checkpoints" / "step_00000002").is_dir()
