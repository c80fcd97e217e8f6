"""The benchmark scripts run as programs on CPU: one CPU rehearsal of the whole GPU check (every stage runs and
emits every field), the GPU check's stage budgets, and the data loader benchmark against a local HTTP server.

No test checks a timing target (those are for benchmarks on a GPU, not for tests).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from benchutil import REPO, throughput
from dsutil import deepspeed_env, once_per_run, run_job

from fastmae.flops import encoder_skip_flops_ratio


def run(args: list[str], timeout: int = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # steadier than 2 on a shared machine
    proc = run_job(args, env=full_env, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# ----------------------------------------------------------------------------- gpu_check.sh, rehearsed on CPU
# One run of the whole script with tiny sizes (about 2 minutes on an idle 2-core machine: a dozen Python start-ups);
# the tests below read what its stages wrote, as the GPU run's results will be read.


@pytest.fixture(scope="session")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(the unpacked results folder, the script's output) of ``gpu_check.sh --cpu-rehearsal``, run once."""

    def produce(tmp: Path) -> None:
        out = tmp / "out"
        ds_env = deepspeed_env()  # its DeepSpeed stages reuse the tests' built comm op and compile cache
        proc = run(["bash", "benchmarks/gpu_check.sh", "--cpu-rehearsal"], timeout=900,
                   env={"OUT": str(out), "PYTHON": sys.executable,
                        **{k: ds_env[k] for k in ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR")}})
        packs = list(out.glob("cpu-rehearsal-*.tar.gz"))
        assert len(packs) == 1, list(out.iterdir())
        assert (out / "summary.md").exists() and (out / "gpu_check.log").exists()
        with tarfile.open(packs[0]) as tar:
            tar.extractall(tmp / "unpacked", filter="data")
        (tmp / "stdout.txt").write_text(proc.stdout)

    tmp = once_per_run(tmp_path_factory, "gpu_check", produce)
    (res,) = (tmp / "unpacked").iterdir()
    return res, (tmp / "stdout.txt").read_text()


@pytest.mark.timeout(900)  # the rehearsal's own limit: a dozen interpreters on a busy 2-core machine
def test_gpu_check_cpu_rehearsal(rehearsal: tuple[Path, str]) -> None:
    """One CPU rehearsal of the whole GPU check, read as the GPU run's results will be read (one test, so that no
    second worker waits for the rehearsal while the first runs it)."""
    _check_stages(*rehearsal)
    _check_throughput_fields(rehearsal[0])
    _check_correctness(rehearsal[0])
    _check_profile(rehearsal[0])


def _check_stages(res: Path, stdout: str) -> None:
    """Every stage ran and passed; the packed results hold each stage's JSON, report and log."""
    assert "gpu_check finished" in stdout
    for name in ("throughput.json", "correctness.json", "memory_vit_h.json", "throughput_ablations.json",
                 "ceilings.json", "profile/report.md", "profile/split.png", "summary.md", "gpu_check.log"):
        assert (res / name).is_file(), name
    stages = (res / "stages.tsv").read_text().splitlines()[1:]
    ran = {line.split("\t")[0]: line.split("\t")[1] for line in stages}
    assert {"setup", "env", "ceilings", "correctness", "throughput", "kernels", "pytest_gpu", "memory_vit_h",
            "profile", "ablations", "deepspeed", "zero3_compile", "data"} <= set(ran)
    assert all(rc in ("0", "-") for rc in ran.values()), stages
    assert "done: 3 steps" in (res / "logs" / "deepspeed.log").read_text()
    zero3 = (res / "logs" / "zero3_compile.log").read_text()
    assert "done: 2 steps" in zero3 and "ZeRO-3 leaf blocks (6), torch.compile per block (6 blocks)" in zero3
    for log in ("deepspeed.log", "zero3_compile.log"):  # the runs wrote no checkpoint
        text = (res / "logs" / log).read_text()
        run_dir = Path(re.search(r"done: \d+ steps, .* \| (\S+)", text).group(1))
        assert run_dir.is_dir() and not list(run_dir.glob("checkpoints/step_*")), run_dir
        # the rehearsal runs its one rank as a single process (a launcher's interpreters only cost CPU seconds)
        assert "(launcher: single process)" in text, log


def _check_throughput_fields(res: Path) -> None:
    """throughput.py's JSON and table hold every field, for every contender and ablation."""
    data = json.loads((res / "throughput.json").read_text())
    assert (res / "throughput.md").read_text().startswith("# Throughput")
    for key in ("schema", "environment", "machine", "peak_tflops", "peak_source", "settings", "flops", "rows",
                "summary", "goals"):
        assert key in data, key
    variants = {r["variant"] for r in data["rows"]}
    expected = {"fastmae", "fastmae_with_m", "official"}
    if throughput.transformers_available():
        expected.add("hf")
    assert expected <= variants
    for row in data["rows"]:
        assert set(throughput.ROW_FIELDS) <= set(row), set(throughput.ROW_FIELDS) - set(row)
        assert row["status"] == "ok", row
        assert row["step_time_ms"] > 0 and row["img_per_s"] > 0 and row["achieved_tflops"] > 0
        assert len(row["step_time_ms_all"]) == 2
        assert row["counted_over_analytic"] == pytest.approx(1.0, abs=0.02)
    by = {r["label"]: r for r in data["rows"]}
    assert by["fastmae w/ [M]"]["train_gflop_per_img"] / by["fastmae"]["train_gflop_per_img"] == pytest.approx(
        encoder_skip_flops_ratio("debug"))
    s = data["summary"]["debug"]
    for key in ("encoder_skip_flops_ratio_analytic", "encoder_skip_flops_ratio_counted",
                "encoder_skip_wallclock_ratio", "speedup_vs_official", "speedup_vs_hf", "sdpa_backend"):
        assert key in s, key
    assert s["encoder_skip_wallclock_ratio"] > 0 and s["speedup_vs_official"] > 0
    # the FLOPs table's entry (ViT-L's is checked in test_counted_flops_match_analytic_for_vit_l)
    debug = data["flops"]["debug"]
    assert debug["encoder_skip_ratio_analytic"] == encoder_skip_flops_ratio("debug")
    assert debug["encoder_skip_ratio_counted"] == pytest.approx(debug["encoder_skip_ratio_analytic"], rel=0.02)
    # the ablations: one toggle each, against the same preset's fastmae row
    abl = json.loads((res / "throughput_ablations.json").read_text())
    labels = {r["label"] for r in abl["rows"] if r["variant"] == "ablate"}
    assert {"attention=math", "fused_optimizer=on", "precision=bf16", "patch_embed_order=embed_first",
            "step=torch (no DeepSpeed)", "zero=0", "zero=1"} <= labels, labels
    by = {r["label"]: r for r in abl["rows"]}
    assert by["fastmae"]["engine"] == "deepspeed ZeRO-2" and by["zero=0"]["engine"] == "deepspeed ZeRO-0"
    assert by["step=torch (no DeepSpeed)"]["engine"] == "torch" and by["precision=bf16"]["dtype"] == "bf16"
    assert by["patch_embed_order=embed_first"]["patch_embed_order"] == "embed_first"
    for r in abl["rows"]:  # the Triton masking ablation needs CUDA: skipped with its reason on the CPU
        assert (r["status"] == "ok" and r["step_time_ms"] > 0) or (
            r["label"] == "masking=triton" and r["status"].startswith("skipped: fused kernel needs CUDA")), r
    assert "ablations" in abl["summary"]["debug"]


def _check_correctness(res: Path) -> None:
    """throughput.py --check passed, with a training step."""
    data = json.loads((res / "correctness.json").read_text())
    assert data["passed"] and any(c["name"].startswith("train step debug") for c in data["checks"])


def _check_profile(res: Path) -> None:
    """profile_step.py's report, figure, split and traces."""
    prof = res / "profile"
    report = (prof / "report.md").read_text()
    assert "w/o [M]" in report and "optimizer" in report and "Top CPU aten ops" in report
    assert (prof / "split.png").read_bytes()[:4] == b"\x89PNG"
    split = json.loads((prof / "split.json").read_text())
    for tag in ("without_m", "with_m"):
        phases = split[tag]["split_ms"]
        assert {"data", "masking", "encoder_fwd", "encoder_bwd", "decoder_fwd", "decoder_bwd", "loss_fwd",
                "optimizer", "total"} <= set(phases)
        assert phases["total"] > 0
        trace = json.loads(gzip.decompress((prof / f"trace_{tag}.json.gz").read_bytes()))
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"fastmae/encoder", "fastmae/decoder", "fastmae/masking", "fastmae/optimizer"} <= names


def _stage_limits(script: str, part: str) -> dict[str, int]:
    """stage name -> its largest time limit inside ``if in_part N; then ... fi  # part N`` of gpu_check.sh."""
    start = script.index(f"if in_part {part}; then")
    end = script.index(f"fi  # part {part}")
    limits: dict[str, int] = {}
    for name, limit in re.findall(r"\bstage (\w+) (\d+) ", script[start:end]):
        limits[name] = max(limits.get(name, 0), int(limit))
    return limits


def test_gpu_check_parts_fit_their_budget() -> None:
    """Each part's stage limits (with env) add up to its budget, and parts 1 and 2 with the machine's start fit
    one 15-minute lease: 360 s and 300 s. The numbers that matter most come in part 1."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    env = int(re.search(r"\bstage env (\d+) ", script).group(1))
    budgets = {int(k): int(v) for k, v in re.findall(r"\[(\d)\]=(\d+)", re.search(r"PART_BUDGETS=\((.*)\)",
                                                                               script).group(1))}
    assert budgets == {1: 360, 2: 300, 3: 120}
    parts = {n: _stage_limits(script, str(n)) for n in (1, 2, 3)}
    assert list(parts[1]) == ["ceilings", "correctness", "kernels", "throughput"]
    assert list(parts[2]) == ["ablations", "memory_vit_h", "deepspeed", "zero3_compile", "pytest_gpu", "profile"]
    assert list(parts[3]) == ["data"]
    for n, limits in parts.items():
        assert env + sum(limits.values()) <= budgets[n], (n, limits)
    bad = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--part", "4"], cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "--part takes 1, 2, 3 or all" in bad.stderr


# ----------------------------------------------------------------------------- the data loader benchmark


def test_data_throughput_reports_idle_and_busy_main_thread_rates(tmp_path: Path) -> None:
    """Every loader is timed idle and with the main thread spinning in Python after each batch, on the local
    files and streamed from a local HTTP server; DALI's feed on a thread and in a worker process."""
    from fastmae.data import bundled_sample_dir, dali_available

    dali = ["dali"] if dali_available() else []
    # streaming from HTTP needs the remote extra (fsspec's HTTP filesystem runs on aiohttp)
    http = all(importlib.util.find_spec(m) is not None for m in ("fsspec", "aiohttp"))
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_throughput.py"), "--shards",
                          str(bundled_sample_dir()), "--backends", ",".join(dali + ["torch", "synthetic"]),
                          "--sources", "local,http" if http else "local",
                          "--feed-workers", "0,1", "--batch-size", "8", "--train", "debug", "--workers", "1",
                          "--warmup", "1", "--batches", "2", "--repeats", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["backend"], r["source"], r["feed_workers"]): r
            for r in json.loads((tmp_path / "data_throughput.json").read_text())["rows"]}
    sources = ("local", "http") if http else ("local",)
    want = {("torch", src, None) for src in sources} | {("synthetic", "local", None)}
    want |= {("dali", src, feed) for src in sources for feed in (0, 1)} if dali else set()
    assert set(rows) == want
    assert rows["torch", "local", None]["read"] == "global"
    assert not http or rows["torch", "http", None]["read"] == "stream"
    for r in rows.values():
        assert r["img_per_s"] > 0 and r["busy_img_per_s"] > 0 and r["busy_ms_per_batch"] > 0
        assert r["busy_over_idle"] == pytest.approx(r["busy_img_per_s"] / r["img_per_s"])
        assert r["train_preset"] == "debug" and r["train_img_per_s"] > 0  # a real MAE step per batch
    assert "busy/idle" in res.stdout and "vs synth" in res.stdout
