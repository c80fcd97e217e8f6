"""The training program through DeepSpeed on CPU (gloo), as users launch it: the README command on 1, 2 and 3
ranks and through torchrun, ZeRO 0-3 with 2 ranks (compiled) against 1 (eager), no host sync between log steps,
kill -9 + exact resume on the same and on another number of ranks, preemption by SIGTERM, one rank's failure
(damaged JPEG, NaN) ending the whole job, the non-finite skip policy, and resume rules. The recipe's schedule and
weight-decay groups: tests/unit/test_train_recipe.py."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dsutil import deepspeed_env, free_port, once_per_run
from fastmae.data.loader import dali_available
from jobs import (
    BIN,
    RUNNER,
    SMALL,
    end_started,
    kill_job,
    launch,
    losses,
    rank_processes,
    recorded,
    records,
    run,
    seconds_from_error_to_exit,
    start,
    wait_for,
)
from storeutil import S3_CREDENTIALS, start_http_server, start_s3_server, stop, upload

import fastmae
from fastmae import checkpoint as ckpt
from fastmae.config import get_preset
from fastmae.distributed import SHM_DIR
from fastmae.optim import lr_factor


@pytest.fixture(scope="session")
def env() -> dict[str, str]:
    return deepspeed_env()


@pytest.fixture(autouse=True)
def _end_started_jobs() -> Iterator[None]:
    """A test that fails half-way leaves no job running behind it."""
    yield
    end_started()


# ----------------------------------------------------------------------------- the command line


def test_config_error_exits_with_message(env: dict[str, str]) -> None:
    out = run([sys.executable, "fastmae/train.py", "model.dept=3"], env, timeout=60, expect=2)
    assert "unknown key 'model.dept'; valid keys in [model]" in out
    out = run([sys.executable, "fastmae/train.py", "cls.num_classes=5"], env, timeout=60, expect=2)
    assert "cls.num_classes is not used by pre-training (the cls section configures fine-tuning" in out


# ----------------------------------------------------------------------------- the README command, any world size


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_readme_command_trains_on_any_number_of_ranks(ranks: int, env: dict[str, str], tmp_path: Path) -> None:
    """`deepspeed --num_gpus N fastmae/train.py --ds_config zero2.json` on its defaults (the debug preset on the
    bundled sample): the effective batch that 16 x N ranks reaches is chosen and said, and the loss falls."""
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port), "fastmae/train.py",
           "--ds_config", "zero2.json", f"train.output_dir={tmp_path}"]
    out = run(cmd, env, timeout=600)
    # DeepSpeed's CPU comm op leaves no shared-memory segment behind
    assert not list(Path(SHM_DIR).glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert f"preset debug | {ranks} rank(s)" in out and "data=" in out
    assert f"= {16 * ranks} | lr {1.5e-3 * ranks:.3e}" in out
    assert ("not reachable" in out) == (ranks > 1)
    got = losses(tmp_path)
    assert max(got) == get_preset("debug").train.steps
    first, last = got[min(got)], got[max(got)]
    assert last < first * 0.9, (first, last)
    if ranks == 1:
        export = tmp_path / "mae.pth"
        run([sys.executable, "-m", "fastmae.checkpoint", "export", str(tmp_path / "checkpoints"), str(export)], env)
        sd = torch.load(export, weights_only=True)["model"]
        fastmae.create_model("debug").load_state_dict(sd)  # strict: official names, nothing missing


def test_torchrun_starts_two_ranks(env: dict[str, str], tmp_path: Path) -> None:
    """torchrun starts 2 ranks; with train.compile=on every block is captured whole (fullgraph) under DeepSpeed
    (aot_eager: the graphs without the CPU's slow code generation; inductor compiles in
    tests/integration/test_parallelize.py)."""
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "fastmae/train.py",
           "--ds_config", "zero2.json", *SMALL, "train.steps=2", "train.trackers=csv", "train.compile=on",
           "train.compile_backend=aot_eager", f"train.output_dir={tmp_path}"]
    out = run(cmd, env)
    assert "2 rank(s) on cpu (launcher: torchrun/deepspeed)" in out
    assert "torch.compile per block (6 blocks) with backend aot_eager" in out
    assert all(math.isfinite(v) for v in losses(tmp_path).values())
    assert sorted(losses(tmp_path)) == [1, 2]
    assert (tmp_path / "metrics.csv").read_text().startswith("time,")


def test_ranks_import_deepspeed_without_its_autotuners_mlflow() -> None:
    """DeepSpeed's autotuner imports mlflow at import time (more than half of DeepSpeed's import where mlflow is
    installed): the ranks import DeepSpeed with mlflow hidden, and mlflow (for its tracker) imports afterwards."""
    code = ("import sys; from fastmae.distributed import import_deepspeed; ds = import_deepspeed(); "
            "assert callable(ds.initialize); assert 'mlflow' not in sys.modules, 'mlflow was imported'; "
            "from deepspeed.autotuning import autotuner; assert autotuner.has_mlflow is False; "
            "import importlib.util; print('mlflow installed:', importlib.util.find_spec('mlflow') is not None); "
            "import mlflow; print('mlflow imports after:', mlflow.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    if "mlflow installed: False" in out:  # nothing to hide, and nothing to import after
        assert "ModuleNotFoundError: No module named 'mlflow'" in out, out[-3000:]
    else:
        assert proc.returncode == 0 and "mlflow imports after: mlflow" in out, out[-3000:]


# ----------------------------------------------------------------------------- 2 ranks = 1 rank x accumulation 2


@pytest.fixture(scope="session")
def one_rank_reference(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """1 rank, micro 8 x accum 2: the reference the 2-rank runs must reproduce (run once per test run)."""
    out = once_per_run(tmp_path_factory, "ref1", lambda out: run(
        launch(1, RUNNER, ["--ds_config", "zero2.json", *SMALL, "train.steps=5", f"train.output_dir={out}"]), env))
    return losses(out)


@pytest.mark.parametrize("stage,mode,backend", [(0, "blocks", "aot_eager"), (1, "blocks", "aot_eager"),
                                                (2, "step", "aot_eager"), (3, "step", "aot_eager")])
def test_zero_stage_two_ranks_compiled_match_one_rank_eager(stage: int, mode: str, backend: str,
                                                            env: dict[str, str], tmp_path: Path,
                                                            one_rank_reference: dict[int, float]) -> None:
    """2 ranks with each bundled ZeRO config, compiled, log the eager one-rank run's losses (within 2e-3): per
    block, and the whole forward + loss as one graph. Under ZeRO-3 the whole-step mode compiles each block (a ZeRO-3
    leaf module) and says so. (With the aot_eager backend, which captures and differentiates the same graphs
    without the CPU's slow code generation; inductor compiles the blocks and the whole step in
    tests/integration/test_parallelize.py, against eager.)"""
    out = run(launch(2, RUNNER, ["--ds_config", f"zero{stage}.json", *SMALL, "train.steps=5", f"train.compile={mode}",
                                 f"train.compile_backend={backend}", f"train.output_dir={tmp_path}"]), env,
              timeout=600)
    assert f"ZeRO stage {stage}" in out and "2 rank(s)" in out
    if stage == 3:
        assert "train.compile=step runs per block under ZeRO-3" in out
        assert "ZeRO-3 leaf blocks (6), torch.compile per block (6 blocks)" in out
    elif mode == "blocks":
        assert "torch.compile per block (6 blocks) with backend aot_eager" in out
    else:
        assert "torch.compile of the whole forward and loss" in out
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for s, ref in one_rank_reference.items():
        assert math.isfinite(got[s]) and got[s] == pytest.approx(ref, rel=2e-3), (s, got[s], ref)
    assert got[5] < got[1]


# ----------------------------------------------------------------------------- host syncs in the hot loop


@pytest.mark.parametrize("stage,strategy", [(0, "random"), (1, "block"), (2, "grid"), (3, "random")])
def test_no_host_sync_between_log_steps(stage: int, strategy: str, env: dict[str, str], tmp_path: Path) -> None:
    """Between log steps a training step neither synchronises the device with the host nor reads a tensor value on
    the host, with each bundled config on one rank (fused AdamW, as on CUDA; ZeRO-1/2 take DeepSpeed's CUDA code
    paths), and with each mask strategy (block and grid draw their masks on the device too). ZeRO-3 keeps
    DeepSpeed's own finiteness check of the gradient norm: one read per step. (Without checkpoints:
    train.checkpoint_at_end=false leaves none.)"""
    counts_file = tmp_path / "syncs.json"
    e = dict(env, MASTER_PORT=str(free_port()), FASTMAE_TEST_SYNCS=str(counts_file),
             FASTMAE_TEST_SYNCS_AS_CUDA="0" if stage == 3 else "1")
    run([sys.executable, RUNNER, "--ds_config", f"zero{stage}.json", *SMALL, "train.steps=8", "train.log_interval=4",
         "optim.fused=on", "train.checkpoint_interval=0", "train.checkpoint_at_end=false", f"mask.strategy={strategy}",
         f"train.output_dir={tmp_path / 'run'}"], e)
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))  # a smoke run without any checkpoint
    events: dict[int, dict[str, int]] = {}
    for key, n in json.loads(counts_file.read_text()).items():
        step, kind, where = key.split("|")
        events.setdefault(int(step), {})[f"{kind} {where}"] = n
    assert any("nonfinite.py:check" in k for k in events[4]) and any("nonfinite.py:check" in k for k in events[8]), \
        events
    for step in (3, 5, 6, 7):  # not a log or checkpoint step, nor one of the first two (tracing, first-step checks)
        got = events.get(step, {})
        if stage == 3:
            assert got == {"__bool__ utils.py:is_invalid_grad_norm": 1}, (step, got)
        else:
            assert got == {}, (step, got)


# ----------------------------------------------------------------------------- kill -9, resume on 2 and on 1 rank


def test_kill_9_then_resume_on_two_ranks_and_on_one(env: dict[str, str], tmp_path: Path, id_shards: Path) -> None:
    """A 2-rank run on real shards is killed with SIGKILL after a checkpoint. Resumed on 2 ranks it logs the
    uninterrupted run's losses bit for bit; resumed on 1 rank (accumulation 2, through a universal checkpoint)
    the step count and LR schedule continue and the interrupted epoch still sees every sample exactly once."""
    common = ["--ds_config", "zero2.json", "data.backend=torch", f"data.shards={id_shards}", "data.num_workers=0",
              "data.batch_size=4", "train.batch_size=8", "train.log_interval=1", "train.progress=false",
              "train.checkpoint_interval=4", "train.keep_last=2", "train.trackers="]
    LAST = 30  # the reference run's length: the killed run must not have passed it
    full = tmp_path / "full"
    run(launch(2, RUNNER, [*common, f"train.steps={LAST}", f"train.output_dir={full}"]), env)
    ref = records(full)
    assert sorted(ref) == list(range(1, LAST + 1))

    killed = tmp_path / "killed"
    rec = tmp_path / "rec_killed"
    proc = start(launch(2, RUNNER, [*common, "train.steps=1000", f"train.output_dir={killed}"]),
                 dict(env, FASTMAE_TEST_RECORD=str(rec)), tmp_path / "killed.log")
    wait_for(killed / "checkpoints" / "step_00000008" / ckpt.STATE_FILE, proc)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # somewhere after it: maybe in a step, maybe in a save
    assert proc.poll() is None
    kill_job(proc)
    proc.wait(timeout=30)
    tag = ckpt.latest_complete(killed / "checkpoints")
    resumed_from = int(tag.split("_")[1])
    assert 8 <= resumed_from < LAST
    before = records(killed)
    for s in range(1, resumed_from + 1):
        assert before[s]["loss"] == ref[s]["loss"], s

    # the same number of ranks: bit-exact
    same = tmp_path / "same"
    shutil.copytree(killed, same)
    out = run(launch(2, RUNNER, [*common, f"train.steps={LAST}", f"train.output_dir={same}"]), env)
    assert f"resumed from {same / 'checkpoints' / tag} at step {resumed_from}" in out
    after = records(same)
    for s in range(resumed_from + 1, LAST + 1):
        assert after[s]["loss"] == ref[s]["loss"], (s, after[s]["loss"], ref[s]["loss"])

    # one rank, accumulation 2: resharded
    one = tmp_path / "one"
    shutil.copytree(killed, one)
    rec1 = tmp_path / "rec_one"
    killed_lines = len((one / "metrics.jsonl").read_text().splitlines())
    out = run(launch(1, RUNNER, [*common, f"train.steps={LAST}", f"train.output_dir={one}"]),
              dict(env, FASTMAE_TEST_RECORD=str(rec1)))
    assert f"resumed from {one / 'checkpoints' / tag} at step {resumed_from} (written by 2 rank(s)" in out
    assert "micro 4 x accum 2 x ranks 1 = 8" in out
    after = records(one, skip_lines=killed_lines)  # the resumed process's records
    assert sorted(after) == list(range(resumed_from + 1, LAST + 1))
    for s in range(resumed_from + 1, LAST + 1):  # the schedule goes on exactly; the losses stay close
        assert after[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-9), s
        assert after[s]["loss"] == pytest.approx(ref[s]["loss"], rel=0.25), (s, after[s]["loss"], ref[s]["loss"])
    # (the same samples and masks per step, other crops: per step a batch of 8 differs, their mean does not)
    mean = [sum(r[s]["loss"] for s in range(resumed_from + 1, LAST + 1)) for r in (after, ref)]
    assert mean[0] == pytest.approx(mean[1], rel=0.05)
    # every sample of the interrupted epoch once: the killed run's batches up to the checkpoint + the resumed run's
    seen = [r for r in recorded(rec) if r["step"] <= resumed_from] + recorded(rec1)
    epoch = max(r["epoch"] for r in seen if r["step"] <= resumed_from)
    labels = sorted(v for r in seen if r["epoch"] == epoch for v in r["labels"] if v >= 0)
    assert labels == list(range(48)), epoch
    assert sorted(r["step"] for r in recorded(rec1))[0] == resumed_from + 1


def test_s3_shards_train_and_resume_after_kill_9(env: dict[str, str], tmp_path: Path, id_shards: Path) -> None:
    """2 ranks train on shards streamed from a real S3-compatible server (moto, a separate process; the endpoint
    only from AWS_ENDPOINT_URL): every epoch reads each sample once across the ranks, each rank a run of whole
    shards; killed with SIGKILL after a checkpoint and resumed, the run logs the uninterrupted run's losses bit
    for bit."""
    pytest.importorskip("s3fs", reason="s3fs not installed: pip install -e '.[remote]'")
    server, endpoint = start_s3_server(tmp_path / "moto.log")
    try:
        upload(endpoint, "photos", "train", sorted(id_shards.glob("*.tar")) + sorted(id_shards.glob("*.idx")))
        s3env = {**env, **S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        common = ["--ds_config", "zero2.json", "data.backend=torch", "data.shards=s3://photos/train/{000000..000002}.tar",
                  f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "data.batch_size=4",
                  "data.shuffle_buffer=6", "train.batch_size=8", "train.log_interval=1", "train.progress=false",
                  "train.checkpoint_interval=3", "train.keep_last=2", "train.trackers="]
        last = 18
        rec = tmp_path / "rec"
        out = run(launch(2, RUNNER, [*common, f"train.steps={last}", f"train.output_dir={tmp_path / 'full'}"]),
                  dict(s3env, FASTMAE_TEST_RECORD=str(rec)))
        assert "shards: 3 streamed from s3://photos/train/{000000..000002}.tar (48 samples" in out
        ref = records(tmp_path / "full")
        assert sorted(ref) == list(range(1, last + 1))
        for epoch in range(3):  # 48 samples / (2 ranks x 4) = 6 steps per epoch
            seen = [r for r in recorded(rec) if r["epoch"] == epoch]
            assert sorted(v for r in seen for v in r["labels"]) == list(range(48)), epoch
            for rank in range(2):  # labels name samples; 16 per shard: 24 samples from at most 2 shards
                mine = {v // 16 for r in seen if r["rank"] == rank for v in r["labels"]}
                assert len(mine) <= 2, (epoch, rank, mine)
        assert not list((tmp_path / "cache" / "stream").glob("*/*.tar")), "the spools go with the run"
        killed = tmp_path / "killed"
        proc = start(launch(2, RUNNER, [*common, "train.steps=1000", f"train.output_dir={killed}"]), s3env,
                     tmp_path / "killed.log")
        wait_for(killed / "checkpoints" / "step_00000009" / ckpt.STATE_FILE, proc)
        kill_job(proc)
        proc.wait(timeout=30)
        resumed_from = int(ckpt.latest_complete(killed / "checkpoints").split("_")[1])
        assert 6 <= resumed_from < last  # step 9's save may be the one cut short: then step 6's is the last whole one
        out = run(launch(2, RUNNER, [*common, f"train.steps={last}", f"train.output_dir={killed}"]), s3env)
        assert f"at step {resumed_from}" in out
        after = records(killed)
        for s in range(resumed_from + 1, last + 1):
            assert after[s]["loss"] == ref[s]["loss"], (s, after[s]["loss"], ref[s]["loss"])
    finally:
        stop(server)


def test_http_shards_train(env: dict[str, str], tmp_path: Path, id_shards: Path) -> None:
    pytest.importorskip("aiohttp", reason="aiohttp not installed: pip install -e '.[remote]'")
    server, base = start_http_server(id_shards, tmp_path / "http.log")
    try:
        out = run(launch(1, RUNNER, ["--ds_config", "zero2.json", "data.backend=torch",
                                     f"data.shards={base}/{{000000..000002}}.tar", f"data.cache_dir={tmp_path / 'c'}",
                                     "data.num_workers=0", "data.batch_size=4", "train.batch_size=8", "train.steps=3",
                                     "train.log_interval=1", "train.progress=false", "train.trackers=",
                                     f"train.output_dir={tmp_path / 'run'}"]), env)
        assert "shards: 3 streamed from http://" in out and sorted(losses(tmp_path / "run")) == [1, 2, 3]
    finally:
        stop(server)


@pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI: pip install -e '.[dali]'")
def test_dali_feed_processes_train_like_the_feed_thread(env: dict[str, str], tmp_path: Path, id_shards: Path) -> None:
    """2 ranks train with DALI's feed in spawned worker processes (the GPU default) and log the losses of the
    same run with the feed on a thread, bit for bit."""
    common = ["--ds_config", "zero2.json", "data.backend=dali", f"data.shards={id_shards}", "data.num_workers=1",
              "data.batch_size=4", "train.batch_size=8", "train.steps=6", "train.log_interval=1",
              "train.progress=false", "train.trackers="]
    got = {}
    for feed in (0, 1):
        out = run(launch(2, RUNNER, [*common, f"data.feed_workers={feed}", f"train.output_dir={tmp_path / str(feed)}"]),
                  env)
        assert ("1 feed processes" if feed else "feed thread") in out
        got[feed] = losses(tmp_path / str(feed))
    assert sorted(got[0]) == list(range(1, 7)) and got[0] == got[1]


# ----------------------------------------------------------------------------- preemption


def test_sigterm_saves_a_checkpoint_and_resume_continues(env: dict[str, str], tmp_path: Path) -> None:
    args = ["--ds_config", "zero2.json", *SMALL, "train.checkpoint_interval=5", "train.steps=1000",
            "train.dist_timeout_s=123", f"train.output_dir={tmp_path}"]
    proc = start(launch(2, RUNNER, args, "deepspeed"), env, tmp_path / "run.log")
    wait_for(tmp_path / "checkpoints" / "step_00000005" / ckpt.STATE_FILE, proc)
    for p in rank_processes(proc, 2):  # as a scheduler signals the job's processes
        p.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    out = (tmp_path / "run.log").read_text()
    assert "process groups:" in out and "timeout 123 s" in out  # every group, DeepSpeed's included
    assert "SIGTERM: saving a checkpoint at the next step boundary" in out
    tag = ckpt.latest_complete(tmp_path / "checkpoints")
    step = int(tag.split("_")[1])
    assert step > 5 and f"stopped by a signal at step {step}" in out
    # a changed schedule is refused, naming the key; allowed explicitly it goes on
    out = run(launch(2, RUNNER, [*args[:-4], "train.epochs=7", "train.steps=2", f"train.output_dir={tmp_path}"]),
              env, expect=1)
    assert "resuming would change the schedule: train.epochs: checkpoint 400, now 7" in out
    out = run(launch(2, RUNNER, [*args[:-4], f"train.steps={step + 2}", f"train.output_dir={tmp_path}"]), env)
    assert f"resumed from {tmp_path / 'checkpoints' / tag} at step {step}" in out
    assert max(losses(tmp_path)) == step + 2


def test_zero0_on_one_rank_trains_resumes_and_refuses_resharding(env: dict[str, str], tmp_path: Path) -> None:
    """The bundled zero0.json (no partitioning: the cheapest step on one GPU) trains and resumes on one rank; its
    checkpoints cannot be resharded by DeepSpeed, so another number of ranks or another stage is refused by name."""
    args = [*SMALL, "train.checkpoint_interval=2", f"train.output_dir={tmp_path}"]
    out = run(launch(1, RUNNER, ["--ds_config", "zero0.json", *args, "train.steps=2"]), env)
    assert "ZeRO stage 0" in out
    out = run(launch(1, RUNNER, ["--ds_config", "zero0.json", *args, "train.steps=4"]), env)
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000002'} at step 2" in out
    assert max(losses(tmp_path)) == 4
    out = run(launch(2, RUNNER, ["--ds_config", "zero0.json", *args, "train.steps=6"]), env, expect=1)
    assert "written with ZeRO stage 0 by 1 rank(s); DeepSpeed reshards only ZeRO 1-3 checkpoints" in out
    out = run(launch(1, RUNNER, ["--ds_config", "zero2.json", *args, "train.steps=6"]), env, expect=1)
    assert "written with ZeRO stage 0, this run uses stage 2: resume it with the same stage" in out


# ----------------------------------------------------------------------------- one rank fails: the job ends


def test_damaged_jpeg_on_one_rank_ends_the_job(env: dict[str, str], tmp_path: Path, id_shards: Path) -> None:
    """Only rank 1 reads the damaged image; rank 0 waits in a collective. Both end within seconds, exit 1,
    the first error printed with its rank, shard and key."""
    from fastmae.data import ShardIndex, expand_shards
    from fastmae.data.sampling import epoch_order, rank_batch

    shards = tmp_path / "shards"
    shutil.copytree(id_shards, shards)
    index = ShardIndex(expand_shards(str(shards)))
    order = epoch_order(len(index), 0, 0, True)
    victim = int(rank_batch(order, 2, 1, 2, 4)[0][0])  # rank 1's first sample at step 3
    shard = index.shards[int(index.shard_of[victim])]
    data = index.read_image(victim)
    raw = shard.read_bytes()
    at = raw.index(data)
    shard.write_bytes(raw[:at + len(data) // 2] + b"\x00" * (len(data) - len(data) // 2) + raw[at + len(data):])
    args = ["--ds_config", "zero2.json", "data.backend=torch", f"data.shards={shards}", "data.num_workers=0",
            "data.batch_size=4", "train.batch_size=8", "train.progress=false", "train.steps=20",
            f"train.output_dir={tmp_path / 'out'}"]
    proc = start(launch(2, RUNNER, args, "deepspeed"), env, tmp_path / "run.log")
    took = seconds_from_error_to_exit(proc, tmp_path / "run.log", "rank 1: ShardError")
    out = (tmp_path / "run.log").read_text()
    assert proc.returncode == 1, out[-3000:]
    assert f"rank 1: ShardError: {shard}: {index.key(victim)}: image does not decode" in out
    assert "rank 0: stopping because rank 1 failed first: ShardError" in out
    failed_at = out.index("rank 1: ShardError")
    print(f"damaged JPEG: {took:.1f} s from rank 1's error to the job's exit")
    assert took < 60 and "Timeout" not in out[failed_at:], took
    # data.on_error=skip: the next readable sample takes its place; the count is logged (all ranks')
    skip = ["data.on_error=skip", "data.max_bad_samples=3", "train.steps=4", "train.log_interval=1",
            f"train.output_dir={tmp_path / 'skip'}"]
    out = run(launch(2, RUNNER, [*args[:-2], *skip]), env)
    assert f"rank 1: skipped a sample that cannot be read or decoded: {shard}:{index.key(victim)}" in out
    recs = records(tmp_path / "skip")
    assert sorted(recs) == [1, 2, 3, 4] and [recs[s]["data_bad_samples"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_on_one_rank(policy: str, env: dict[str, str], tmp_path: Path) -> None:
    """A NaN loss on rank 1 only: `stop` ends both ranks together at that step, naming it and the last good
    checkpoint; `skip` drops that micro batch on both ranks and training goes on."""
    env = dict(env, FASTMAE_TEST_NAN_AT="12", FASTMAE_TEST_NAN_RANK="1")  # micro batch 12 of rank 1 = step 13
    args = ["--ds_config", "zero2.json", *SMALL, "train.log_interval=5", "train.checkpoint_interval=5",
            "train.steps=20", f"train.on_nonfinite={policy}", f"train.output_dir={tmp_path}"]
    if policy == "stop":
        proc = start(launch(2, RUNNER, args, "deepspeed"), env, tmp_path / "run.log")
        took = seconds_from_error_to_exit(proc, tmp_path / "run.log", "non-finite loss at step 13")
        out = (tmp_path / "run.log").read_text()
        print(f"NaN stop: {took:.1f} s from the error to the job's exit")
        assert proc.returncode == 1 and took < 60, (proc.returncode, took, out[-3000:])
        assert "non-finite loss at step 13 (rank 1)" in out
        assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step_00000010'}" in out
        assert ckpt.latest_complete(tmp_path / "checkpoints") == "step_00000010"  # nothing saved after the NaN
        assert "Timeout" not in out and "stopping because" not in out  # agreed: both stop, nobody waits
    else:
        out = run(launch(2, RUNNER, args), env)
        assert "skipping a micro batch with non-finite loss at step 13 (rank 1)" in out
        got = records(tmp_path)
        assert all(math.isfinite(r["loss"]) for r in got.values()) and max(got) == 20
        assert got[15]["skipped"] == 1 and got[20]["skipped"] == 0


# ----------------------------------------------------------------------------- bf16


def test_bf16_zero3_two_ranks_trains_exports_and_resumes_on_one(env: dict[str, str], tmp_path: Path) -> None:
    """bf16 (autocast over fp32 weights, fp32 gradients) with ZeRO-3 partitioned parameters, fixed pos embeds
    included;
    then resumed on 1 rank through a universal checkpoint, every parameter group keeps its own weight decay
    and the lr schedule goes on."""
    args = ["--ds_config", "zero3.json", *SMALL, "train.precision=bf16", "train.checkpoint_interval=3",
            f"train.output_dir={tmp_path}"]
    rec2, rec1 = tmp_path / "rec2", tmp_path / "rec1"
    out2 = run(launch(2, RUNNER, [*args, "train.steps=6"]), dict(env, FASTMAE_TEST_RECORD=str(rec2)))
    got = losses(tmp_path)
    assert all(math.isfinite(v) for v in got.values()) and got[6] < got[1]
    export = tmp_path / "mae.pth"
    run([sys.executable, "-m", "fastmae.checkpoint", "export", str(tmp_path / "checkpoints"), str(export)], env)
    sd = torch.load(export, weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in sd.values())
    fresh = fastmae.create_model("debug")
    fresh.load_state_dict(sd)
    # the fixed sin-cos tables stay exact fp32 (never rounded through bf16)
    reference = fastmae.create_model("debug").state_dict()
    assert torch.equal(sd["pos_embed"], reference["pos_embed"])
    assert torch.equal(sd["decoder_pos_embed"], reference["decoder_pos_embed"])
    # bf16 autocast over fp32 weights: gradients reduced across the 2 ranks in fp32
    fp32 = {"weights": "torch.float32", "engine": "torch.float32", "grad_accum": "torch.float32",
            "communication": "torch.float32"}
    assert all(r["dtypes"] == fp32 for r in recorded(rec2))
    assert "precision bf16: bf16 autocast over fp32 weights; gradients accumulated and reduced in fp32" in out2

    out = run(launch(1, RUNNER, [*args, "train.steps=8"]), dict(env, FASTMAE_TEST_RECORD=str(rec1)))
    assert "at step 6 (written by 2 rank(s), resharded through a universal checkpoint)" in out
    assert (tmp_path / "checkpoints" / "step_00000006_universal").is_dir()
    before, after = recorded(rec2), recorded(rec1)
    assert all(r["dtypes"] == fp32 for r in after)  # 1 rank x accumulation 2: accumulated in fp32
    assert {r["step"] for r in after} == {7, 8}
    decays = sorted({g[0] for r in before for g in r["groups"]})
    assert decays == [0.0, 0.05]
    for r in after:
        assert sorted(g[0] for g in r["groups"]) == sorted(g[0] for g in before[0]["groups"])
    full = records(tmp_path)
    assert max(full) == 8 and all(math.isfinite(full[s]["loss"]) for s in (7, 8))
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / ckpt.STATE_FILE).read_text())
    peak, sched = state["schedule"]["lr"], state["schedule"]
    min_ratio = state["config"]["optim"]["min_lr"] / peak
    for r in before + after:  # the lr each group trains with at that step: the schedule, unbroken by the reshard
        want = peak * lr_factor(r["step"] - 1, sched["total_steps"], sched["warmup_steps"], min_ratio)
        assert [g[1] for g in r["groups"]] == pytest.approx([want] * len(r["groups"]), rel=1e-9), r["step"]
