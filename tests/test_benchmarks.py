"""CPU tests of the benchmark scripts: they run, emit every field, and their FLOPs figures are right.

Timing targets are never asserted (they are for benchmarks on a GPU, not for tests).
"""

from __future__ import annotations

import dataclasses
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
import torch
from dsutil import deepspeed_env, once_per_run, run_job

import fastmae
from fastmae.flops import encoder_skip_flops_ratio, train_flops

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import throughput  # noqa: E402
from official_style import OfficialStyleMAE  # noqa: E402


def run(args: list[str], timeout: int = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # steadier than 2 on a shared machine
    proc = run_job(args, env=full_env, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_benchmark_modules_shadow_nothing() -> None:
    """No script in benchmarks/ carries a stdlib or installed module's name (it is first on sys.path)."""
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    try:
        for f in BENCH.glob("*.py"):
            name = f.stem
            assert name not in sys.stdlib_module_names, name
            spec = None if name in sys.modules else importlib.util.find_spec(name)
            # `python -m pytest` puts the repository root on sys.path, where kernels/ and data/ live:
            # those are the package's own sources, not installed modules
            installed = spec is not None and REPO not in Path(spec.origin or "").resolve().parents
            assert not installed, f"benchmarks/{f.name} shadows {spec.origin}"
    finally:
        sys.path[:] = saved


def test_scripts_leave_sys_path_for_transformers() -> None:
    """After import, throughput.py has dropped benchmarks/ from sys.path, so transformers' probe for HF's
    `kernels` package cannot import benchmarks/masking_kernel.py."""
    assert all(Path(p or ".").resolve() != BENCH for p in sys.path)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 NVL", 835.0),
])
def test_peak_lookup(name: str, peak: float) -> None:
    assert common.lookup_peak_tflops(name)[0] == peak
    assert common.lookup_peak_tflops(name, override=500.0) == (500.0, "--peak-tflops")
    assert common.lookup_peak_tflops("Some CPU")[0] is None


def test_official_style_computes_the_same_loss() -> None:
    """The baseline is a different implementation of the same model: one state dict, same noise, same loss."""
    cfg = fastmae.get_preset("debug").model
    ours = fastmae.create_model("debug", masking="torch", attention="math")
    theirs = OfficialStyleMAE(cfg, mask_ratio=0.75)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    noise = torch.rand(3, (cfg.img_size // cfg.patch_size) ** 2)
    with torch.no_grad():
        a_loss, a_pred, a_mask = ours(imgs, noise=noise)
        b_loss, b_pred, b_mask = theirs(imgs, noise=noise)
    torch.testing.assert_close(a_mask, b_mask)
    torch.testing.assert_close(a_pred, b_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_loss, b_loss, rtol=1e-5, atol=1e-6)


def test_counted_flops_match_analytic_for_vit_l() -> None:
    """FlopCounterMode on the meta device agrees with fastmae.flops within 2% for both encoder variants, and
    throughput.py's FLOPs table reports the ViT-L encoder-skip ratio from fastmae.flops (3.2-3.4x, paper 3.3x)."""
    cfg = fastmae.get_preset("mae_vit_large_patch16").model
    vit_l = throughput.flops_table(["mae_vit_large_patch16"], 0.75)["mae_vit_large_patch16"]
    for tag, with_m in (("without_m", False), ("with_m", True)):
        counted = vit_l[f"counted_gflop_{tag}"] * 1e9
        assert counted == pytest.approx(train_flops(cfg, 0.75, with_m), rel=0.02)
    assert vit_l["encoder_skip_ratio_analytic"] == encoder_skip_flops_ratio("mae_vit_large_patch16")
    assert 3.2 <= vit_l["encoder_skip_ratio_analytic"] <= 3.4
    assert vit_l["encoder_skip_ratio_counted"] == pytest.approx(vit_l["encoder_skip_ratio_analytic"], rel=0.02)
    assert vit_l["counted_over_analytic_without_m"] == pytest.approx(1.0, abs=0.02)
    assert vit_l["counted_over_analytic_with_m"] == pytest.approx(1.0, abs=0.02)


# ----------------------------------------------------------------------------- gpu_check.sh, rehearsed on CPU
# One run of the whole script with tiny sizes (about 100 s on an idle 2-core machine: a dozen Python start-ups);
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
        run_dir = Path(re.search(r"done: \d+ steps, .* \| (\S+)", (res / "logs" / log).read_text()).group(1))
        assert run_dir.is_dir() and not list(run_dir.glob("checkpoints/step_*")), run_dir


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


def test_gpu_check_summary_names_stages_that_did_not_run(tmp_path: Path) -> None:
    (tmp_path / "stages.tsv").write_text("stage\texit\tseconds\tnote\nenv\t0\t3\tok\n"
                                         "kernels\t124\t70\ttimed out after 70s\n"
                                         "data\t-\t0\tskipped: budget spent\n")
    text = common.gpu_check_summary(tmp_path)
    assert "Not run or not passed: kernels (timed out after 70s); data (skipped: budget spent)." in text


def test_ablation_flips_and_rows_written_one_by_one(tmp_path: Path) -> None:
    """Every switch flips in the documented order (a switch that cannot flip here is a named skip), and the
    sequential timer hands over the rows after each one (throughput.py writes its JSON then)."""
    base = throughput.Settings("torch", "sdpa", "off", False, zero_stage=2)
    flips = throughput.ablation_flips(base, list(throughput.ABLATIONS), cuda=False, kernel_ok=True, ds_ok=True,
                                      dtype="fp32")
    assert [label for label, _ in flips] == [
        "fused_optimizer=on", "step=torch (no DeepSpeed)", "zero=0", "zero=1", "masking=triton",
        "patch_embed_order=embed_first", "attention=math", "precision=bf16", "compile=blocks", "compile=step",
        "compile=cudagraphs"]
    by_label = dict(flips)
    assert by_label["masking=triton"] == "skipped: fused kernel needs CUDA and kernels/masking.py"
    assert by_label["compile=cudagraphs"].startswith("skipped: CUDA graphs need CUDA")
    assert all(isinstance(s, throughput.Settings) for label, s in flips
               if label not in ("masking=triton", "compile=cudagraphs"))
    # on a GPU the training default is compiled per block: rows needing new graphs come last, whole-step last of all
    gpu = throughput.ablation_flips(dataclasses.replace(base, masking="triton", compile="blocks"),
                                    list(throughput.ABLATIONS), cuda=True, kernel_ok=True, ds_ok=True, dtype="bf16")
    assert [label for label, _ in gpu] == [
        "fused_optimizer=on", "step=torch (no DeepSpeed)", "zero=0", "zero=1", "masking=torch",
        "patch_embed_order=embed_first", "compile=off", "attention=math", "precision=fp32", "compile=step",
        "compile=cudagraphs"]
    no_ds = dict(throughput.ablation_flips(base, ["zero"], cuda=False, kernel_ok=False, ds_ok=False, dtype="bf16"))
    assert no_ds["zero=0"] == "skipped: deepspeed does not import"
    assert dict(throughput.ablation_flips(base, ["precision"], False, False, True, "bf16"))["precision=fp32"].dtype \
        == "fp32"
    cfg = fastmae.get_preset("debug").model
    seen: list[int] = []
    kw = dict(cfg=cfg, ratio=0.75, batch=2, device=torch.device("cpu"), dtype=torch.float32, warmup=0, repeats=1,
              count=False)
    jobs = []
    for order in ("gather_first", "embed_first"):
        s = throughput.Settings("torch", "sdpa", "off", False, patch_embed_order=order)
        jobs.append(dict(preset="debug", variant="ablate", label=order, s=s, with_m=False,
                         build=throughput.fastmae_builder("debug", cfg, 0.75, s, False), loss_fn=throughput.mae_loss))
    rows = throughput.time_sequential(jobs, kw, None, on_row=lambda done: seen.append(len(done)))
    assert seen == [1, 2] and [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["train_gflop_per_img"] < rows[1]["train_gflop_per_img"]  # a quarter of the patch embedding


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
