"""CPU tests of the benchmark scripts in the test process: their modules, the peak lookup, the official-style
baseline, FLOPs figures, the GPU check's summary, the ablation switches. The scripts run as programs (the GPU
check's CPU rehearsal, the data loader benchmark): tests/integration/test_benchmark_runs.py.

Timing targets are never asserted (they are for benchmarks on a GPU, not for tests).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from benchutil import BENCH, REPO, OfficialStyleMAE, common, throughput

import fastmae
from fastmae.flops import encoder_skip_flops_ratio, train_flops


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


# ----------------------------------------------------------------------------- gpu_check.sh's summary, ablations


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


