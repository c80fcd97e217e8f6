"""Training-step throughput of fastmae against the paper's "encoder w/ [M]" and two baselines, one process.
Each row times full training steps (forward + backward + AdamW) on synthetic images; ``--ablations`` flips one
optimisation at a time and ``--check`` checks correctness. Usage:
``python benchmarks/throughput.py [--out DIR]``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from official_style import OfficialStyleMAE  # noqa: E402

common.leave_sys_path()  # keep benchmarks/masking_kernel.py from passing for HF's `kernels` package

import fastmae  # noqa: E402
from fastmae.attention import resolve_attention_backend  # noqa: E402
from fastmae.config import ModelConfig, get_preset  # noqa: E402
from fastmae.flops import encoder_skip_flops_ratio, train_flops  # noqa: E402
from fastmae.memory import estimate_memory  # noqa: E402
from fastmae.parallelize import allow_recompiles, apply_performance_toggles, resolve_compile  # noqa: E402

SCHEMA = 1
ALL_PRESETS = ("debug", "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
SHORT = {"debug": "debug", "mae_vit_base_patch16": "ViT-B/16", "mae_vit_large_patch16": "ViT-L/16",
         "mae_vit_huge_patch14": "ViT-H/14"}
CUDA_BATCH = {"debug": 256, "mae_vit_base_patch16": 256, "mae_vit_large_patch16": 128,
              "mae_vit_huge_patch14": 64}
CPU_BATCH = {"debug": 16, "mae_vit_base_patch16": 2, "mae_vit_large_patch16": 2, "mae_vit_huge_patch14": 1}
VARIANTS = ("fastmae", "fastmae_with_m", "official", "hf")
ROW_FIELDS = (
    "preset", "variant", "label", "status", "error", "batch_size", "dtype", "device", "masking", "attention",
    "compile", "fused_optimizer", "activation_checkpointing", "encoder_mask_tokens", "patch_embed_order",
    "engine", "mask_ratio",
    "norm_pix_loss", "params_m", "warmup", "repeats", "step_time_ms", "step_time_ms_min", "step_time_ms_all",
    "first_step_s", "cold_compile_s",
    "img_per_s", "train_gflop_per_img", "counted_train_gflop_per_img", "counted_over_analytic",
    "achieved_tflops", "mfu", "peak_mem_gb", "est_mem_gb", "loss",
)
# the switches --ablations flips; the rows come in the order of ablation_flips: those that reuse the base row's
# compiled blocks first, those that need a cold compile (new block graphs, or a whole-step graph) last
ABLATIONS = ("fused_optimizer", "zero", "masking", "patch_embed", "compile", "attention", "precision")
GOALS = {
    "encoder_skip_flops_ratio_vit_l": "3.2-3.4x (paper Table 1c: 3.3x); counted within 2% of analytic",
    "encoder_skip_wallclock_vit_l_h100": ">= 3.0x (paper Table 2: 2.8x ViT-L, 3.5x ViT-H on TPU-v3)",
    "speedup_vs_official_and_hf_vit_l_h100": ">= 1.5x img/s each",
    "mfu_vit_l_and_h_h100_bf16": ">= 55%",
}


# ----------------------------------------------------------------------------- availability


def masking_kernel_available() -> bool:
    """True when the fused Triton masking kernel module exists and triton imports."""
    from fastmae.kernels import triton_available

    try:
        return importlib.util.find_spec("fastmae.kernels.masking") is not None and triton_available()
    except Exception:
        return False


def transformers_available() -> bool:
    """True when transformers is installed (found without importing it: that takes a second)."""
    try:
        return importlib.util.find_spec("transformers") is not None
    except Exception:
        return False


# ----------------------------------------------------------------------------- contenders


@dataclasses.dataclass
class Settings:
    """One contender's switches, recorded verbatim in its row."""

    masking: str
    attention: str
    # fastmae.parallelize.COMPILE_MODES: off | blocks | step | cudagraphs
    compile: str
    fused_optimizer: bool
    activation_checkpointing: bool = False
    patch_embed_order: str = "gather_first"
    # "" = the run's --dtype; else this row's precision policy (the precision ablation)
    dtype: str = ""
    # -1: a plain torch optimizer step (the baselines); 0-3: the training programs' DeepSpeed engine at that
    # ZeRO stage (fastmae.engine.make_engine, stepped as the trainer steps it)
    zero_stage: int = -1

    @property
    def engine(self) -> str:
        return f"deepspeed ZeRO-{self.zero_stage}" if self.zero_stage >= 0 else "torch"


def fastmae_builder(preset: str, cfg: ModelConfig, ratio: float, s: Settings, with_m: bool
                    ) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        fields.update(attention=s.attention, encoder_mask_tokens=with_m, patch_embed_order=s.patch_embed_order)
        return fastmae.create_model(preset, mask_ratio=ratio, masking=s.masking, **fields)

    return build


def official_builder(cfg: ModelConfig, ratio: float) -> Callable[[], nn.Module]:
    return lambda: OfficialStyleMAE(cfg, mask_ratio=ratio)


def hf_builder(cfg: ModelConfig, ratio: float) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        hf_cfg = ViTMAEConfig(
            hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
            intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-6,
            image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans, qkv_bias=True,
            decoder_hidden_size=cfg.decoder_embed_dim, decoder_num_hidden_layers=cfg.decoder_depth,
            decoder_num_attention_heads=cfg.decoder_num_heads,
            decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
            mask_ratio=ratio, norm_pix_loss=cfg.norm_pix_loss,
        )
        return ViTMAEForPreTraining._from_config(hf_cfg, attn_implementation="sdpa")

    return build


def mae_loss(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """Loss of fastmae and the official-style model: ``forward(imgs) -> (loss, pred, mask)``."""
    return model(imgs)[0]


def hf_loss(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=imgs).loss


# ----------------------------------------------------------------------------- one row


Rows = list[dict[str, Any]]


@dataclasses.dataclass
class Prepared:
    """A contender ready to time: its row (filled as it goes), its step and the last loss."""

    row: dict[str, Any]
    step: Callable[[], None] | None = None
    last: list[torch.Tensor] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)
    engine: Any = None  # the DeepSpeed engine of the row, destroyed by release()

    def release(self, device: torch.device) -> None:
        """Free what the row built: ZeRO's gradient hooks keep engine, model and optimizer alive after ``del``
        until ``engine.destroy()``, and every later row's peak memory would include them."""
        if self.engine is not None:
            self.engine.destroy()
        self.engine = self.step = None
        self.last.clear()
        common.free_device_memory(device)


def fail(row: dict[str, Any], e: BaseException) -> None:
    """Record an exception in the row (OOM separately)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        row["status"] = "oom"
        row["error"] = str(e).splitlines()[0]
    else:
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()


def prepare_row(*, preset: str, variant: str, label: str, build: Callable[[], nn.Module],
                loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], s: Settings, with_m: bool,
                cfg: ModelConfig, ratio: float, batch: int, device: torch.device, dtype: torch.dtype,
                warmup: int, repeats: int, count: bool,
                count_build: Callable[[], nn.Module] | None = None) -> Prepared:
    """Count FLOPs, build the model and optimizer, and return the step closure; never raises.

    ``count_build`` builds the model that FlopCounterMode runs on the meta device when ``build``'s
    cannot run there (the Triton masking kernel needs real tensors; masking has no matmuls).
    """
    if s.dtype:
        dtype = common.parse_dtype(s.dtype, device)
    cfg = dataclasses.replace(cfg, encoder_mask_tokens=with_m, patch_embed_order=s.patch_embed_order)
    row: dict[str, Any] = {k: None for k in ROW_FIELDS}
    row.update(preset=preset, variant=variant, label=label, batch_size=batch, dtype=common.dtype_name(dtype),
               device=device.type, masking=s.masking, attention=s.attention, compile=s.compile,
               fused_optimizer=s.fused_optimizer, activation_checkpointing=s.activation_checkpointing,
               encoder_mask_tokens=with_m, patch_embed_order=s.patch_embed_order, engine=s.engine,
               mask_ratio=ratio, norm_pix_loss=cfg.norm_pix_loss, warmup=warmup, repeats=repeats, status="ok")
    analytic = train_flops(cfg, ratio)
    row["train_gflop_per_img"] = analytic / 1e9
    prep = Prepared(row)
    if count:
        try:
            counted = common.counted_flops(count_build or build, loss_fn, batch=2, img_size=cfg.img_size)
            row["counted_train_gflop_per_img"] = counted / 1e9
            row["counted_over_analytic"] = counted / analytic
        except Exception as e:  # counting is a cross-check; the timing still runs
            row["error"] = f"flop count failed: {type(e).__name__}: {e}"
    try:
        with torch.device(device):
            model = build()
        model.train()
        n_params = common.param_count(model)
        row["params_m"] = n_params / 1e6
        est = estimate_memory(cfg, ratio, batch, zero_stage=max(s.zero_stage, 0), precision=common.dtype_name(dtype),
                              activation_checkpointing=s.activation_checkpointing,
                              attention="math" if s.attention.startswith("math") else "sdpa")
        row["est_mem_gb"] = est.total / 1e9
        if hasattr(model, "blocks"):  # fastmae and official-style: the package's toggles, in its order
            apply_performance_toggles(model, s.activation_checkpointing, s.compile, max(s.zero_stage, 0))
        else:  # HF: its own per-layer gradient checkpointing (non-reentrant); compile the whole model
            if s.activation_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if s.compile != "off":
                model = torch.compile(model)
        graph_step = s.compile == "cudagraphs"  # each step begins a new CUDA-graph replay, as in the trainer
        opt = common.make_adamw(model, s.fused_optimizer)
        fwd = model
        gen = torch.Generator(device=device).manual_seed(0)
        imgs = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device, generator=gen)

        if s.zero_stage >= 0:  # the training programs' engine and step
            engine = prep.engine = common.deepspeed_engine(model, opt, s.zero_stage, batch, common.dtype_name(dtype))

            def step() -> None:
                if graph_step:
                    torch.compiler.cudagraph_mark_step_begin()
                with common.autocast(device, dtype):
                    loss = loss_fn(engine, imgs)
                engine.backward(loss)
                engine.step()
                prep.last[:] = [loss.detach()]
        else:
            def step() -> None:
                if graph_step:
                    torch.compiler.cudagraph_mark_step_begin()
                with common.autocast(device, dtype):
                    loss = loss_fn(fwd, imgs)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                prep.last[:] = [loss.detach()]

        prep.step = step
    except Exception as e:
        fail(row, e)
    return prep


def finish_row(prep: Prepared, peak: float | None, peak_gb: float | None) -> dict[str, Any]:
    """Median step time and the derived rates into the row."""
    row = prep.row
    if prep.step is None or not prep.times or row["status"] != "ok":
        return row
    t = common.median(prep.times)
    batch = row["batch_size"]
    row["step_time_ms"] = t * 1e3
    row["step_time_ms_min"] = min(prep.times) * 1e3
    row["step_time_ms_all"] = [x * 1e3 for x in prep.times]
    row["img_per_s"] = batch / t
    row["achieved_tflops"] = row["train_gflop_per_img"] * 1e9 * batch / t / 1e12
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    row["peak_mem_gb"] = peak_gb
    if row["first_step_s"] is not None and row["compile"] not in (None, "off"):
        row["cold_compile_s"] = max(0.0, row["first_step_s"] - t)  # the first step compiles, the median does not
    loss_value = float(prep.last[0].float().item())
    row["loss"] = loss_value
    if not math.isfinite(loss_value):
        row["status"] = "nonfinite"
    return row


def time_sequential(jobs: list[dict[str, Any]], kw: dict[str, Any], peak: float | None,
                    on_row: Callable[[Rows], None] | None = None) -> Rows:
    """One contender at a time: build, warm up, time, free (peak memory is per contender); ``on_row`` gets
    the rows done so far after each one (a run cut short keeps them)."""
    device, warmup, repeats = kw["device"], kw["warmup"], kw["repeats"]
    rows = []
    for job in jobs:
        name = SHORT.get(job["preset"], job["preset"])
        print(f"-- {name} {job['label']} (batch {kw['batch']}) ...", flush=True)
        prep = prepare_row(**job, **kw)
        peak_gb = None
        if prep.step is not None:
            try:
                with common.peak_memory(device) as mem:
                    prep.row["first_step_s"] = common.time_once(prep.step, device)
                    prep.times = common.time_steps(prep.step, device, max(warmup - 1, 0), repeats)
                peak_gb = mem["peak_gb"]
            except Exception as e:
                fail(prep.row, e)
        rows.append(finish_row(prep, peak, peak_gb))
        prep.release(device)
        report_row(rows[-1])
        if on_row is not None:
            on_row(rows)
    return rows


def time_interleaved(jobs: list[dict[str, Any]], kw: dict[str, Any], peak: float | None,
                     on_row: Callable[[Rows], None] | None = None) -> Rows:
    """All contenders resident; each timed round runs one step of every contender in turn, so load from
    other processes on a shared machine hits all of them alike. No per-contender peak memory."""
    device, warmup, repeats = kw["device"], kw["warmup"], kw["repeats"]
    preps = [prepare_row(**job, **kw) for job in jobs]
    for prep in preps:
        if prep.step is not None:
            try:
                prep.row["first_step_s"] = common.time_once(prep.step, device)
                common.time_steps(prep.step, device, max(warmup - 1, 0), 0)
            except Exception as e:
                fail(prep.row, e)
                prep.step = None
    for _ in range(repeats):
        for prep in preps:
            if prep.step is not None and prep.row["status"] == "ok":
                try:
                    prep.times += common.time_steps(prep.step, device, 0, 1)
                except Exception as e:
                    fail(prep.row, e)
    rows = [finish_row(prep, peak, None) for prep in preps]
    for r in rows:
        report_row(r)
    for prep in preps:
        prep.release(device)
    return rows


def report_row(row: dict[str, Any]) -> None:
    print(f"   {SHORT.get(row['preset'], row['preset'])} {row['label']}: {row['status']}: "
          f"{fmt(row['step_time_ms'], '.1f')} ms/step, {fmt(row['img_per_s'], '.1f')} img/s"
          + (f" [{row['error']}]" if row["error"] else ""), flush=True)


def ablation_flips(base: Settings, which: list[str], cuda: bool, kernel_ok: bool, ds_ok: bool,
                   dtype: str) -> list[tuple[str, Settings | str]]:
    """(label, settings) of each ablation row: ``base`` with one switch flipped, or (label, "skipped: why") where
    the switch cannot flip here. Rows that reuse the base row's compiled blocks come first, the ones that compile
    new graphs last (attention and precision change the blocks; the whole-step modes compile the whole model), so
    a run cut short by its time limit loses the costliest rows."""
    flips: list[tuple[str, Settings | str]] = []
    cold: list[tuple[str, Settings | str]] = []  # rows that compile new graphs
    compiled = base.compile != "off"
    for name in (a for a in ABLATIONS if a in which):
        if name == "fused_optimizer":
            flips.append((f"fused_optimizer={'off' if base.fused_optimizer else 'on'}",
                          dataclasses.replace(base, fused_optimizer=not base.fused_optimizer)))
        elif name == "zero":
            for stage in (-1, 0, 1, 2):
                if stage == base.zero_stage:
                    continue
                label = "step=torch (no DeepSpeed)" if stage < 0 else f"zero={stage}"
                if stage >= 0 and not ds_ok:
                    flips.append((label, "skipped: deepspeed does not import"))
                else:
                    flips.append((label, dataclasses.replace(base, zero_stage=stage)))
        elif name == "masking":
            if base.masking == "triton":
                flips.append(("masking=torch", dataclasses.replace(base, masking="torch")))
            elif kernel_ok and cuda:
                flips.append(("masking=triton", dataclasses.replace(base, masking="triton")))
            else:
                flips.append(("masking=triton", "skipped: fused kernel needs CUDA and kernels/masking.py"))
        elif name == "patch_embed":
            other = "embed_first" if base.patch_embed_order == "gather_first" else "gather_first"
            flips.append((f"patch_embed_order={other}", dataclasses.replace(base, patch_embed_order=other)))
        elif name == "compile":
            modes = [m for m in ("off", "blocks", "step", "cudagraphs") if m != base.compile]
            for mode in modes:
                row = dataclasses.replace(base, compile=mode)
                if mode == "cudagraphs" and not cuda:
                    row = "skipped: CUDA graphs need CUDA (on the CPU the mode is compile=step)"
                (flips if mode == "off" else cold).append((f"compile={mode}", row))
        elif name == "attention":
            others = (["math"] if base.attention != "math" else []) + (["sdpa"] if base.attention == "flash" else [])
            for other in others:
                (cold if compiled else flips).append((f"attention={other}",
                                                      dataclasses.replace(base, attention=other)))
        elif name == "precision":
            other = "fp32" if dtype == "bf16" else "bf16"
            (cold if compiled else flips).append((f"precision={other}", dataclasses.replace(base, dtype=other)))
    # whole-step graphs last of all: their cold compile is the longest
    cold.sort(key=lambda item: item[0] in ("compile=step", "compile=cudagraphs"))
    return flips + cold


# ----------------------------------------------------------------------------- FLOPs table


def flops_table(presets: list[str], ratio: float) -> dict[str, dict[str, float]]:
    """Analytic and counted (meta device) training GFLOP/img of both encoder variants per preset."""
    out: dict[str, dict[str, float]] = {}
    for p in presets:
        cfg = get_preset(p).model
        s = Settings(masking="torch", attention="sdpa", compile="off", fused_optimizer=False)
        entry: dict[str, float] = {}
        for tag, with_m in (("without_m", False), ("with_m", True)):
            analytic = train_flops(cfg, ratio, encoder_mask_tokens=with_m)
            build = fastmae_builder(p, cfg, ratio, s, with_m)
            counted = common.counted_flops(build, mae_loss, 2, cfg.img_size)
            entry[f"analytic_gflop_{tag}"] = analytic / 1e9
            entry[f"counted_gflop_{tag}"] = counted / 1e9
            entry[f"counted_over_analytic_{tag}"] = counted / analytic
        entry["encoder_skip_ratio_analytic"] = encoder_skip_flops_ratio(p, ratio)
        entry["encoder_skip_ratio_counted"] = entry["counted_gflop_with_m"] / entry["counted_gflop_without_m"]
        out[p] = entry
    return out


# ----------------------------------------------------------------------------- SDPA probe


def sdpa_backend_probe(cfg: ModelConfig, ratio: float, batch: int, device: torch.device,
                       dtype: torch.dtype) -> dict[str, str]:
    """Which aten attention kernel SDPA dispatches to for the encoder and decoder shapes of ``cfg``."""
    from fastmae.kernels import num_kept
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from torch.profiler import ProfilerActivity, profile

    n = (cfg.img_size // cfg.patch_size) ** 2
    shapes = {
        "encoder": (batch, cfg.num_heads, num_kept(n, ratio) + 1, cfg.embed_dim // cfg.num_heads),
        "encoder_with_m": (batch, cfg.num_heads, n + 1, cfg.embed_dim // cfg.num_heads),
        "decoder": (batch, cfg.decoder_num_heads, n + 1, cfg.decoder_embed_dim // cfg.decoder_num_heads),
    }
    out: dict[str, str] = {}
    for name, shape in shapes.items():
        try:
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                sdpa(q, k, v).sum().backward()
            ops = sorted({e.key for e in prof.key_averages()
                          if e.key.startswith(("aten::_scaled_dot_product", "aten::_flash_attention",
                                               "aten::_efficient_attention", "aten::_cudnn_attention"))
                          and "backward" not in e.key})
            out[name] = f"{tuple(shape)}: " + (", ".join(ops) or "math (decomposed into matmul + softmax)")
        except Exception as e:
            out[name] = f"probe failed: {type(e).__name__}: {e}"
    return out


# ----------------------------------------------------------------------------- correctness mode


class Checks:
    """The results of ``--check``: each named check passes, fails or is skipped with a reason."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {"passed": True, "checks": []}

    def record(self, name: str, ok: bool | None, detail: str) -> None:
        self.results["checks"].append({"name": name, "ok": None if ok is None else bool(ok), "detail": detail})
        if ok is not None:
            self.results["passed"] &= bool(ok)
        print(f"[{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        """Run ``fn``; an exception is a failed check named ``name``."""
        try:
            fn()
        except Exception as e:
            self.record(name, False, f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """TF32 off for matrix products and cuDNN convolutions: a comparison at 1e-4 between two implementations must
    not measure TF32's rounding (cuDNN runs convolutions in TF32 by default, fastmae's patch embedding is a
    linear layer)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_attention(c: Checks, device: torch.device, dtype: torch.dtype) -> None:
    """sdpa (and flash) against math in fp32 accumulation."""
    from fastmae.attention import Attention, flash_attn_available

    torch.manual_seed(0)
    for dt in ([torch.float32] + ([dtype] if dtype != torch.float32 else [])):
        for dim, heads, tokens in ((768, 12, 50), (512, 16, 197), (1280, 16, 65)):
            x = torch.randn(3, tokens, dim, device=device, dtype=dt)
            attn = Attention(dim, heads, backend="math").to(device=device, dtype=dt)
            with torch.no_grad():
                attn_ref = Attention(dim, heads, backend="math").to(device=device, dtype=torch.float32)
                attn_ref.load_state_dict(attn.state_dict())
                ref = attn_ref(x.float())
                backends = ["math", "sdpa"] + (["flash"] if device.type == "cuda" and flash_attn_available()
                                               and dt != torch.float32 else [])
                for b in backends:
                    attn.backend = b
                    out = attn(x).float()
                    rel = ((out - ref).norm() / ref.norm()).item()
                    tol = 2e-5 if dt == torch.float32 else 2e-2
                    tol = 1e-3 if (dt == torch.float32 and device.type == "cuda") else tol  # fused fp32 kernels
                    c.record(f"attention {b} vs fp32 math ({common.dtype_name(dt)}, D={dim}, T={tokens})",
                             rel < tol and math.isfinite(rel), f"rel err {rel:.2e} (tol {tol:g})")


def check_masking(c: Checks, device: torch.device, dtype: torch.dtype, ratio: float) -> None:
    """The Triton kernel equals the torch reference exactly, from noise and from a seed (its in-kernel Philox
    against the reference's torch Philox), and the seeded reference masks the same on this device as on the CPU."""
    from fastmae.kernels import random_masking_ref

    interpreter = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    shapes = ((4, 196, 768), (3, 256, 1280), (5, 64, 96)) if not interpreter else ((5, 64, 96),)
    for (B, N, D) in shapes:
        x = torch.randn(B, N, D, device=device, dtype=dtype)
        pos = torch.randn(1, N, D, device=device, dtype=dtype)
        seed = torch.tensor(20261203, device=device)
        cpu = random_masking_ref(x.cpu(), ratio, seed=20261203, pos_embed=pos.cpu())
        here = random_masking_ref(x, ratio, seed=seed, pos_embed=pos)
        same = all(torch.equal(a.cpu(), b) for a, b in zip(here, cpu, strict=True))
        c.record(f"seeded masking {device.type} vs cpu (B={B}, N={N}, D={D})", same, "exact" if same else "mismatch")
        if not (masking_kernel_available() and (device.type == "cuda" or interpreter)):
            c.record("masking triton vs torch", None, "skipped: needs CUDA (or TRITON_INTERPRET=1) and "
                                                      "kernels/masking.py")
            continue
        from fastmae.kernels.masking import random_masking

        noise = torch.rand(B, N, device=device)
        for how, kw in (("noise", {"noise": noise}), ("seed", {"seed": seed})):
            got = random_masking(x, ratio, pos_embed=pos, **kw)
            ref = random_masking_ref(x, ratio, pos_embed=pos, **kw)
            ok = all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
            c.record(f"masking triton vs torch from {how} (B={B}, N={N}, D={D})", ok, "exact" if ok else "mismatch")


def check_official(c: Checks, preset: str, device: torch.device, ratio: float) -> None:
    """The official-style baseline computes the same loss on the same weights and noise (fp32; TF32 is off for
    every check, see :func:`exact_matmuls`)."""
    cfg = get_preset(preset).model
    torch.manual_seed(0)
    with torch.device(device):
        ours = fastmae.create_model(preset, masking="torch", attention="math")
        theirs = OfficialStyleMAE(cfg, ratio)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    n = (cfg.img_size // cfg.patch_size) ** 2
    imgs = torch.randn(2, 3, cfg.img_size, cfg.img_size, device=device)
    noise = torch.rand(2, n, device=device)
    with torch.no_grad():
        a = ours(imgs, noise=noise)[0].item()
        b = theirs(imgs, noise=noise)[0].item()
    rel = abs(a - b) / abs(a)
    c.record(f"official-style == fastmae on shared weights ({preset}, fp32)", rel < 1e-4, f"loss {a:.6f} vs {b:.6f}")


def check_graph_breaks(c: Checks, preset: str, device: torch.device, dtype: torch.dtype, kernel: str) -> None:
    """train.compile=step's graph: the whole training forward + loss under the precision policy, no break."""
    torch._dynamo.reset()
    with torch.device(device):
        model = fastmae.create_model(preset, masking=kernel)
    size = model.config.img_size
    imgs = torch.randn(2, 3, size, size, device=device)
    with common.autocast(device, dtype):
        explained = torch._dynamo.explain(model)(imgs, mask_seed=torch.tensor(1, device=device))
    c.record(f"graph breaks in the training forward + loss ({preset}, masking {kernel}, "
             f"{common.dtype_name(dtype)})", explained.graph_break_count == 0,
             f"{explained.graph_break_count} breaks in {explained.graph_count} graph(s) "
             f"{[str(r.reason)[:200] for r in explained.break_reasons]}")


def check_train_step(c: Checks, preset: str, device: torch.device, dtype: torch.dtype, batch: int,
                     kernel: str) -> None:
    """One training step in the benchmark dtype: finite loss, gradients and parameters."""
    cfg = get_preset(preset).model
    with torch.device(device):
        model = fastmae.create_model(preset, masking=kernel)
    opt = common.make_adamw(model, common.resolve_fused("auto", device))
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    with common.autocast(device, dtype):
        loss = model(x)[0]
    loss.backward()
    grads_ok = all(torch.isfinite(q.grad).all().item() for q in model.parameters() if q.grad is not None)
    opt.step()
    params_ok = all(torch.isfinite(q).all().item() for q in model.parameters())
    lv = loss.item()
    c.record(f"train step {preset} ({common.dtype_name(dtype)}, batch {batch}, masking {kernel})",
             math.isfinite(lv) and grads_ok and params_ok,
             f"loss {lv:.4f}, grads finite {grads_ok}, params finite {params_ok}")


def check(presets: list[str], device: torch.device, dtype: torch.dtype, batch: int, ratio: float
          ) -> dict[str, Any]:
    """Attention backends agree, the masking kernel equals its reference (noise and seed paths; the seeded
    reference equals the CPU's), the official-style baseline equals fastmae on shared weights, the training forward
    compiles without a graph break, and one training step per preset is finite."""
    c = Checks()
    with exact_matmuls():
        run_checks(c, presets, device, dtype, batch, ratio)
    return c.results


def run_checks(c: Checks, presets: list[str], device: torch.device, dtype: torch.dtype, batch: int,
               ratio: float) -> None:
    c.guarded("attention", lambda: check_attention(c, device, dtype))
    c.guarded("masking", lambda: check_masking(c, device, dtype, ratio))
    c.guarded("official-style", lambda: check_official(c, presets[0], device, ratio))
    kernel = "triton" if device.type == "cuda" and masking_kernel_available() else "torch"
    # every preset is the same module code: one trace shows whether the training forward breaks
    c.guarded(f"graph breaks {presets[0]}", lambda: check_graph_breaks(c, presets[0], device, dtype, kernel))
    for p in presets:
        c.guarded(f"train step {p}", lambda p=p: check_train_step(c, p, device, dtype, batch, kernel))
        common.free_device_memory(device)


# ----------------------------------------------------------------------------- report


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    head = ("| preset | contender | compile | batch | step ms | min ms | img/s | GFLOP/img | TFLOP/s | MFU | "
            "peak GB | est GB | cold compile s | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {SHORT.get(r['preset'], r['preset'])} | {r['label']} | {r['compile'] or '-'} | {r['batch_size']} | "
            f"{fmt(r['step_time_ms'], '.1f')} | {fmt(r['step_time_ms_min'], '.1f')} | {fmt(r['img_per_s'], '.1f')} | "
            f"{fmt(r['train_gflop_per_img'], '.2f')} | {fmt(r['achieved_tflops'], '.3f')} | "
            f"{'-' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'} | "
            f"{fmt(r['peak_mem_gb'], '.2f')} | {fmt(r['est_mem_gb'], '.2f')} | {fmt(r['cold_compile_s'], '.1f')} | "
            f"{r['status']} |"
        )
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(rows: list[dict[str, Any]], presets: list[str], flops: dict[str, Any]) -> dict[str, Any]:
    """Per preset: encoder-skip FLOPs and wall-clock ratios, speedups over the baselines, ablation shares."""
    out: dict[str, Any] = {}
    for p in presets:
        mine = [r for r in rows if r["preset"] == p]
        by = {r["variant"]: r for r in mine if r["status"] == "ok" and not r["variant"].startswith("ablate")}
        base = by.get("fastmae")
        wm = by.get("fastmae_with_m")
        s: dict[str, Any] = {
            "encoder_skip_flops_ratio_analytic": encoder_skip_flops_ratio(p, mine[0]["mask_ratio"])
            if mine else None,
            "encoder_skip_flops_ratio_counted": ratio(wm and wm["counted_train_gflop_per_img"],
                                                      base and base["counted_train_gflop_per_img"]),
            "encoder_skip_wallclock_ratio": ratio(wm and wm["step_time_ms"], base and base["step_time_ms"]),
            "speedup_vs_official": ratio(base and base["img_per_s"],
                                         by.get("official", {}).get("img_per_s")),
            "speedup_vs_hf": ratio(base and base["img_per_s"], by.get("hf", {}).get("img_per_s")),
            # the training default's first step minus a steady one: what compiling costs once per run
            "cold_compile_s": base and base["cold_compile_s"],
            # the same from the fastest step of each contender: steadier on a shared, loaded CPU
            "encoder_skip_wallclock_ratio_min": ratio(wm and wm["step_time_ms_min"],
                                                      base and base["step_time_ms_min"]),
            "speedup_vs_official_min": ratio(by.get("official", {}).get("step_time_ms_min"),
                                             base and base["step_time_ms_min"]),
            "speedup_vs_hf_min": ratio(by.get("hf", {}).get("step_time_ms_min"), base and base["step_time_ms_min"]),
            "ablations": {},
        }
        if s["encoder_skip_flops_ratio_counted"] is None and p in flops:
            s["encoder_skip_flops_ratio_counted"] = flops[p]["encoder_skip_ratio_counted"]
        for r in mine:
            if r["variant"].startswith("ablate"):
                s["ablations"][r["label"]] = {
                    "status": r["status"],
                    "img_per_s": r["img_per_s"],
                    "base_over_ablated": ratio(base and base["img_per_s"], r["img_per_s"]),
                    "base_over_ablated_min": ratio(r["step_time_ms_min"], base and base["step_time_ms_min"]),
                }
        out[p] = s
    return out


def summary_text(summary: dict[str, Any]) -> str:
    lines = []
    for p, s in summary.items():
        def x(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}x"

        lines.append(
            f"{SHORT.get(p, p)}: encoder-skip FLOPs {x(s['encoder_skip_flops_ratio_analytic'])} analytic / "
            f"{x(s['encoder_skip_flops_ratio_counted'])} counted, wall-clock "
            f"{x(s['encoder_skip_wallclock_ratio'])}; fastmae vs official-style "
            f"{x(s['speedup_vs_official'])}, "
            f"vs HF ViTMAE {x(s['speedup_vs_hf'])}; cold compile "
            f"{'-' if s['cold_compile_s'] is None else format(s['cold_compile_s'], '.1f') + ' s'} "
            f"(from the fastest steps: wall-clock "
            f"{x(s['encoder_skip_wallclock_ratio_min'])}, vs official-style {x(s['speedup_vs_official_min'])}, "
            f"vs HF {x(s['speedup_vs_hf_min'])})"
        )
        for label, a in s["ablations"].items():
            lines.append(f"    {label}: fastmae (base) / this = {x(a['base_over_ablated'])} median, "
                         f"{x(a['base_over_ablated_min'])} fastest steps ({a['status']})")
    return "\n".join(lines)


def flops_text(flops: dict[str, Any]) -> str:
    lines = ["| preset | train GFLOP/img w/o [M] | w/ [M] | ratio analytic | ratio counted | "
             "counted/analytic |", "|---|---|---|---|---|---|"]
    for p, e in flops.items():
        lines.append(
            f"| {SHORT.get(p, p)} | {e['analytic_gflop_without_m']:.2f} | {e['analytic_gflop_with_m']:.2f} | "
            f"{e['encoder_skip_ratio_analytic']:.3f} | {e['encoder_skip_ratio_counted']:.3f} | "
            f"{e['counted_over_analytic_without_m']:.4f} / {e['counted_over_analytic_with_m']:.4f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="auto",
                    help="comma list of presets (auto: debug,mae_vit_base_patch16 on CPU; B,L,H on CUDA)")
    ap.add_argument("--batch-size", type=int, default=0, help="micro batch for every preset (0: per preset)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--warmup", type=int, default=-1, help="untimed steps (default 3)")
    ap.add_argument("--repeats", type=int, default=-1, help="timed steps, median reported (default 10)")
    ap.add_argument("--masking", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--attention", default="auto", choices=("auto", "flash", "sdpa", "math"))
    ap.add_argument("--compile", nargs="?", const="blocks", default="auto",
                    choices=("auto", "off", "blocks", "step", "cudagraphs"),
                    help="torch.compile of fastmae's rows (fastmae.parallelize, as train.py does; auto: the training "
                         "default, blocks on CUDA and off on CPU; --compile alone: blocks)")
    ap.add_argument("--fused-optimizer", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--activation-checkpointing", default="off", choices=("off", "on", "both"),
                    help="checkpoint every block (fastmae.parallelize: torch.utils.checkpoint per block, "
                         "applied from outside the model)")
    ap.add_argument("--interleave", default="auto", choices=("auto", "on", "off"),
                    help="time contenders round-robin with all resident (auto: on for CPU, off for CUDA)")
    ap.add_argument("--ablations", action="store_true", help="also time fastmae with each switch flipped")
    ap.add_argument("--ablate", default=",".join(ABLATIONS),
                    help=f"which switches --ablations flips (comma list of {', '.join(ABLATIONS)})")
    ap.add_argument("--zero-stage", default="auto", choices=("auto", "none", "0", "1", "2", "3"),
                    help="fastmae rows step the training programs' DeepSpeed engine at this ZeRO stage (auto: 2, "
                         "the bundled zero2.json, when deepspeed imports); none: a plain torch AdamW step")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="card peak for MFU (0: from device name)")
    ap.add_argument("--flops-presets", default=",".join(ALL_PRESETS),
                    help="presets of the FLOPs table (analytic + counted); empty to skip")
    ap.add_argument("--no-count", action="store_true", help="skip the per-row FlopCounterMode count")
    ap.add_argument("--check", action="store_true", help="correctness checks instead of timing")
    ap.add_argument("--out", default="", help="folder for throughput.json / throughput.md")
    ap.add_argument("--name", default="throughput", help="file stem inside --out")
    return ap.parse_args(argv)


@dataclasses.dataclass
class Run:
    """What one invocation times, resolved from the command line and the machine."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    presets: list[str]
    variants: list[str]
    warmup: int
    repeats: int
    env: dict[str, Any]
    peak: float | None
    peak_source: str
    masking: str = "torch"
    attention: str = "sdpa"
    fused: bool = False
    ac_values: tuple[bool, ...] = (False,)
    ds_ok: bool = False
    kernel_ok: bool = False
    hf_ok: bool = False
    zero: int = -1
    compile_mode: str = "off"
    interleave: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def step_desc(self) -> str:
        return Settings("", "", "off", False, zero_stage=self.zero).engine


def _resolve_run(args: argparse.Namespace) -> Run:
    """The device, presets and variants, peak TFLOP/s; printed as the run's header."""
    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    if args.presets == "auto":
        presets = ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"] if cuda \
            else ["debug", "mae_vit_base_patch16"]
    else:
        presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        get_preset(p)  # fails early on a typo, naming the valid presets
    variants = [v for v in args.variants.split(",") if v]
    bad = set(variants) - set(VARIANTS)
    if bad:
        raise SystemExit(f"unknown variants {sorted(bad)}; valid: {', '.join(VARIANTS)}")
    env = common.environment(device)
    if cuda or args.peak_tflops:
        peak, peak_source = common.lookup_peak_tflops(env["device"], args.peak_tflops)
    else:
        peak, peak_source = None, "CPU: no tensor-core peak; pass --peak-tflops for MFU"
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"transformers {env['transformers']} | commit {env['commit']}", flush=True)
    print(f"peak: {peak} TFLOP/s ({peak_source})", flush=True)
    return Run(args, device, common.parse_dtype(args.dtype, device), presets, variants,
               args.warmup if args.warmup >= 0 else 3, args.repeats if args.repeats > 0 else 10, env, peak,
               peak_source)


def _resolve_backends(run: Run) -> None:
    """fastmae's backends, the DeepSpeed stage and the compile mode of the rows; refuses what cannot run."""
    args, device, cuda = run.args, run.device, run.cuda
    run.kernel_ok = masking_kernel_available()
    run.masking = args.masking if args.masking != "auto" else ("triton" if cuda and run.kernel_ok else "torch")
    if run.masking == "triton" and not run.kernel_ok:
        print("masking=triton asked for but fastmae.kernels.masking is missing: rows will fail", flush=True)
    run.attention = resolve_attention_backend(args.attention, device, run.dtype)
    run.fused = common.resolve_fused(args.fused_optimizer, device)
    run.ac_values = {"off": (False,), "on": (True,), "both": (False, True)}[args.activation_checkpointing]
    run.ds_ok = common.deepspeed_available()
    if args.zero_stage == "auto":
        run.zero = 2 if run.ds_ok else -1
    else:
        run.zero = -1 if args.zero_stage == "none" else int(args.zero_stage)
    if run.zero >= 0 and not run.ds_ok:
        raise SystemExit(f"--zero-stage {run.zero} needs deepspeed, which does not import here (or --zero-stage "
                         "none)")
    run.compile_mode = resolve_compile(args.compile, device)
    n_rows = len(run.presets) * len(run.variants) * len(run.ac_values)
    if run.zero == 3 and (n_rows > 1 or args.ablations):
        raise SystemExit("--zero-stage 3 times one row per process: DeepSpeed keeps a ZeRO-3 engine's memory after "
                         "destroy(), so later rows would measure it; pass one preset and --variants fastmae")
    bad_ablate = set(a for a in args.ablate.split(",") if a) - set(ABLATIONS)
    if bad_ablate:
        raise SystemExit(f"unknown --ablate {sorted(bad_ablate)}; valid: {', '.join(ABLATIONS)}")
    run.hf_ok = transformers_available()
    run.interleave = args.interleave == "on" or (args.interleave == "auto" and not cuda)
    print(f"fastmae backends: masking={run.masking} attention={run.attention} compile={run.compile_mode} "
          f"fused_adamw={run.fused} dtype={common.dtype_name(run.dtype)} step={run.step_desc}"
          f"{'' if run.ds_ok else ' (deepspeed not importable)'} | HF baseline: "
          f"{'yes' if run.hf_ok else 'no (transformers not importable)'}", flush=True)


def _preset_jobs(run: Run, p: str, batch: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the rows to time for preset ``p``, the ablation rows that cannot run here, with their reason)."""
    args, ratio = run.args, run.args.mask_ratio
    cfg = get_preset(p).model
    fm = lambda s, with_m: fastmae_builder(p, cfg, ratio, s, with_m)  # noqa: E731
    # the meta-device FLOP count runs the torch masking path (the kernel needs real tensors)
    fm_count = lambda s, with_m: fm(dataclasses.replace(s, masking="torch"), with_m)  # noqa: E731
    jobs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for ac in run.ac_values:
        base = Settings(run.masking, run.attention, run.compile_mode, run.fused, ac, zero_stage=run.zero)
        tag = " +AC" if ac else ""
        if "fastmae" in run.variants:
            jobs.append(dict(variant="fastmae", label="fastmae" + tag, s=base, with_m=False,
                             loss_fn=mae_loss, build=fm(base, False), count_build=fm_count(base, False)))
        if "fastmae_with_m" in run.variants:
            jobs.append(dict(variant="fastmae_with_m", label="fastmae w/ [M]" + tag, s=base, with_m=True,
                             loss_fn=mae_loss, build=fm(base, True), count_build=fm_count(base, True)))
        eager = Settings("torch (argsort+gather)", "math (eager softmax)", "off", run.fused, ac, "embed_first")
        if "official" in run.variants:
            jobs.append(dict(variant="official", label="official-style" + tag, s=eager, with_m=False,
                             build=official_builder(cfg, ratio), loss_fn=mae_loss))
        if "hf" in run.variants and run.hf_ok:
            hs = Settings("torch (argsort+gather)", "sdpa", "off", run.fused, ac, "embed_first")
            jobs.append(dict(variant="hf", label="HF ViTMAE (sdpa)" + tag, s=hs, with_m=False,
                             build=hf_builder(cfg, ratio), loss_fn=hf_loss))
    if args.ablations:
        base = Settings(run.masking, run.attention, run.compile_mode, run.fused, False, zero_stage=run.zero)
        flips = ablation_flips(base, [a for a in args.ablate.split(",") if a], run.cuda, run.kernel_ok, run.ds_ok,
                               common.dtype_name(run.dtype))
        for label, s in flips:
            if isinstance(s, str):
                row = {k: None for k in ROW_FIELDS}
                row.update(preset=p, variant="ablate", label=label, status=s, batch_size=batch, mask_ratio=ratio)
                skipped.append(row)
                continue
            jobs.append(dict(variant="ablate", label=label, s=s, with_m=False,
                             build=fm(s, False), count_build=fm_count(s, False), loss_fn=mae_loss))
    for job in jobs:
        job["preset"] = p
    return jobs, skipped


def _time_presets(run: Run) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every preset's rows (written to --out after each row: a cut run keeps them) and SDPA backend probes."""
    args = run.args
    rows: list[dict[str, Any]] = []
    probes: dict[str, Any] = {}
    for p in run.presets:
        cfg = get_preset(p).model
        batch = args.batch_size or (CUDA_BATCH if run.cuda else CPU_BATCH)[p]
        common_kw = dict(cfg=cfg, ratio=args.mask_ratio, batch=batch, device=run.device, dtype=run.dtype,
                         warmup=run.warmup, repeats=run.repeats, count=not args.no_count)
        probes[p] = sdpa_backend_probe(cfg, args.mask_ratio, batch, run.device, run.dtype)
        jobs, skipped = _preset_jobs(run, p, batch)

        def partial(done: Rows, p: str = p) -> None:
            if args.out:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{args.name}.json").write_text(json.dumps(
                    {"schema": SCHEMA, "partial": f"preset {p}: {len(done)} row(s) done",
                     "environment": run.env, "machine": run.env["device"], "rows": done}, indent=2))

        timer = time_interleaved if run.interleave else time_sequential
        rows += timer(jobs, common_kw, run.peak, on_row=lambda done, before=list(rows): partial(before + done))
        rows += skipped
        partial(rows)
    return rows, probes


def _write_result(run: Run, rows: list[dict[str, Any]], probes: dict[str, Any], flops: dict[str, Any]) -> None:
    """The JSON and the Markdown report (printed, and written to --out)."""
    args, env, dtype = run.args, run.env, common.dtype_name(run.dtype)
    summary = summarize(rows, run.presets, flops)
    for p, pr in probes.items():
        summary[p]["sdpa_backend"] = pr
    result = {
        "schema": SCHEMA, "environment": env, "machine": env["device"], "peak_tflops": run.peak,
        "peak_source": run.peak_source,
        "settings": {"presets": run.presets, "variants": run.variants, "dtype": dtype,
                     "mask_ratio": args.mask_ratio, "warmup": run.warmup, "repeats": run.repeats,
                     "masking": run.masking, "attention": run.attention, "compile": run.compile_mode,
                     "fused_optimizer": run.fused, "activation_checkpointing": args.activation_checkpointing,
                     "ablations": args.ablations, "step": run.step_desc,
                     "timing": "interleaved rounds" if run.interleave else "one contender at a time",
                     "optimizer": "AdamW lr 1.5e-4 betas (0.9, 0.95) wd 0.05 (no decay on 1-D params); fastmae "
                                  "rows step it through the training programs' DeepSpeed engine (see step)",
                     "data": "synthetic torch.randn images on the device (no loader)",
                     "flop_count": "FlopCounterMode over forward+backward on the meta device, batch 2"},
        "flops": flops, "rows": rows, "summary": summary, "goals": GOALS,
    }
    sdpa_line = "; ".join(f"{SHORT.get(p, p)} {k} {v}" for p, pr in probes.items() for k, v in pr.items())
    text = "\n".join([
        f"# Throughput: {env['device']}",
        f"date {env['date_utc']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, "
        f"dtype {dtype}, warm-up {run.warmup}, median of {run.repeats} steps, peak {run.peak} TFLOP/s "
        f"({run.peak_source})", "",
        table(rows), "", summary_text(summary), "",
        "Attention kernel dispatched by SDPA: " + sdpa_line, "",
        "FLOPs per image (training = forward + backward):", "", flops_text(flops) if flops else "(skipped)",
    ])
    print("\n" + text, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        (out / f"{args.name}.md").write_text(text + "\n")
        print(f"wrote {out / (args.name + '.json')} and .md", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = _resolve_run(args)
    if args.check:
        batch = args.batch_size or (8 if run.cuda else 2)
        res = check(run.presets, run.device, run.dtype, batch, args.mask_ratio)
        res["environment"] = run.env
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{args.name}.json").write_text(json.dumps(res, indent=2))
        print(f"correctness: {'PASSED' if res['passed'] else 'FAILED'}", flush=True)
        return 0 if res["passed"] else 1
    _resolve_backends(run)
    allow_recompiles(64)  # blocks of every preset and variant share one code object
    flops_presets = [p for p in args.flops_presets.split(",") if p]
    flops = flops_table(flops_presets, args.mask_ratio) if flops_presets else {}
    rows, probes = _time_presets(run)
    _write_result(run, rows, probes, flops)
    return 0 if all(r["status"] in ("ok",) or str(r["status"]).startswith("skipped") for r in rows) else 2


if __name__ == "__main__":
    raise SystemExit(main())
