"""Partial fine-tuning (paper Fig. 9, ``cls.finetune_blocks``): time and memory of one classifier training step
(forward, backward, AdamW over the trainable parameters; the fine-tuning program's model and optimizer) for each
number of trained blocks. ``python benchmarks/partial_finetune.py [--preset mae_vit_base_patch16]
[--blocks=-1,4,1,0] [--batch-size 4] [--out DIR]``. See benchmarks/README.md.

Memory, per row: the bytes autograd saves for backward in the forward pass (activations, parameters excluded;
what the frozen prefix does not keep), the model states (weights + gradients + AdamW state), and the peak: CUDA's
peak allocation over a step on a GPU; on the CPU the heap in use at the end of the forward pass (glibc's
``mallinfo2``: activations alive for backward + model states), which is where a training step peaks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.leave_sys_path()

from fastmae.finetune import build_model, classifier_optimizer  # noqa: E402
from fastmae.memory import allocated_bytes  # noqa: E402
from fastmae.precision import Precision  # noqa: E402
from fastmae.recipes import finetune_recipe  # noqa: E402


def saved_activation_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``forward``; return its output and the bytes of the distinct tensors autograd saved for backward,
    parameters (and casts of them) left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and not isinstance(t, nn.Parameter):
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(seen.values())


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights, gradients and optimizer state in bytes (after a step, when the state exists)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return weights + grads + state


def run_row(preset: str, blocks: int, batch: int, device: torch.device, warmup: int,
            repeats: int) -> dict[str, Any]:
    """One setting of ``cls.finetune_blocks``: the fine-tuning program's classifier and optimizer, timed."""
    common.free_device_memory(device)  # the previous row's model and optimizer
    cfg = finetune_recipe(preset)
    cfg.cls.finetune_blocks = blocks
    torch.manual_seed(0)
    model, _ = build_model(cfg, None, probe=False)
    model = model.to(device).train()
    opt = classifier_optimizer(model, cfg, 1e-4, device, probe=False)
    precision = Precision("bf16" if device.type == "cuda" else "fp32")
    size = cfg.model.img_size
    imgs = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, cfg.cls.num_classes, (batch,), device=device)

    def forward() -> torch.Tensor:
        with precision.autocast(device):
            return F.cross_entropy(model(imgs).float(), labels)

    def step() -> None:
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = common.time_steps(step, device, warmup, repeats)
    states = model_state_bytes(model, opt)
    with common.peak_memory(device) as peak:
        before = allocated_bytes(device)
        loss, saved = saved_activation_bytes(model, forward)
        at_forward_end = allocated_bytes(device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {"finetune_blocks": blocks, "trainable_params": trainable,
           "total_params": sum(p.numel() for p in model.parameters()), "batch": batch,
           "median_ms": 1e3 * common.median(times), "min_ms": 1e3 * min(times),
           "saved_activations_mb": saved / 2**20, "model_states_mb": states / 2**20,
           "forward_end_heap_growth_mb": (at_forward_end - before) / 2**20}
    row["peak_mb"] = peak["peak_gb"] * 1e9 / 2**20 if peak["peak_gb"] is not None else at_forward_end / 2**20
    return row


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], preset: str) -> str:
    """The table of the rows, with the machine and date."""
    full = rows[0]
    lines = [f"# Partial fine-tuning step ({preset}, batch {full['batch']})", "",
             f"{env['device']} | torch {env['torch']} | {env['date_utc']} | commit {env['commit']}", "",
             "| finetune_blocks | trainable params | step ms (median / min) | speed-up vs first row | saved "
             "activations MiB | model states MiB | peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['finetune_blocks']} | {r['trainable_params'] / 1e6:.2f} M | {r['median_ms']:.0f} / "
                     f"{r['min_ms']:.0f} | {full['min_ms'] / r['min_ms']:.2f}x | "
                     f"{r['saved_activations_mb']:.0f} | {r['model_states_mb']:.0f} | {r['peak_mb']:.0f} |")
    lines += ["", "peak: CUDA's peak allocation over a step; on the CPU the heap in use at the end of the forward "
              "pass (mallinfo2)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mae_vit_base_patch16")
    ap.add_argument("--blocks", default="-1,4,1,0", help="comma list of cls.finetune_blocks values (-1 = all)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="folder for partial_finetune.json / .md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = [run_row(args.preset, b, args.batch_size, device, args.warmup, args.repeats) for b in blocks]
    env = common.environment(device)
    text = markdown(rows, env, args.preset)
    print(text, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "partial_finetune.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (args.out / "partial_finetune.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
