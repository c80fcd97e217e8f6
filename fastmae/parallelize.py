"""Performance toggles applied outside the model, in one place and one order (torchtitan style): ZeRO-3 leaf
blocks, per-block activation checkpointing, then ``torch.compile`` (``blocks``, ``step`` or ``cudagraphs``),
before DeepSpeed wraps the result; parameter names stay unchanged. See docs/architecture.md and
docs/training.md.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# train.compile after resolving auto/on/off (fastmae.config.COMPILE_CHOICES holds what a user may write)
COMPILE_MODES = ("off", "blocks", "step", "cudagraphs")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Encoder and decoder blocks of an MAE model."""
    return [*getattr(model, "blocks", []), *getattr(model, "decoder_blocks", [])]


def _checkpointed(forward, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():
        return checkpoint(forward, x, use_reentrant=False)
    return forward(x)


def apply_activation_checkpointing(model: nn.Module, blocks: str = "all") -> int:
    """Recompute each block in backward (``blocks``: all | encoder). Returns how many blocks were wrapped.

    A block without a trainable parameter is left alone: fastmae freezes only leading blocks (partial
    fine-tuning, linear probing), which run without a backward graph, so there is nothing to recompute."""
    targets = list(model.blocks) if blocks == "encoder" else transformer_blocks(model)
    targets = [blk for blk in targets if any(p.requires_grad for p in blk.parameters())]
    for blk in targets:
        blk.forward = functools.partial(_checkpointed, blk.forward)
    return len(targets)


def allow_recompiles(limit: int = 32) -> None:
    """Let torch.compile keep up to ``limit`` graphs per code object. Every block shares ``Block.forward``'s code,
    and with static shapes each (token count, batch size, train/eval) gets a graph: pre-training needs 2, fine-
    tuning with validation about 5, a benchmark process with several presets dozens; past dynamo's default of 8
    a ``fullgraph`` compile fails instead of compiling one more graph."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(limit, getattr(dynamo_config, name)))


def apply_compile(model: nn.Module, mode: str = "blocks", backend: Any = "inductor") -> str:
    """``torch.compile`` the model in place (see the module docstring for the modes); returns what was done.

    ``blocks`` compiles each block's ``forward`` (not ``Module.__call__``, so module hooks such as ZeRO-3's stay
    outside the graph); blocks of one shape share one compiled graph. A graph break is an error, not a silent
    slow path: the blocks and the MAE's whole training forward have none (tested).
    """
    allow_recompiles()
    if mode == "blocks":
        targets = transformer_blocks(model)
        for blk in targets:
            blk.forward = torch.compile(blk.forward, fullgraph=True, dynamic=False, backend=backend)
        return f"torch.compile per block ({len(targets)} blocks){_backend_note(backend)}"
    if mode in ("step", "cudagraphs"):
        extra = {"mode": "reduce-overhead"} if mode == "cudagraphs" else {}
        model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend=backend, **extra)
        return "torch.compile of the whole forward and loss" + (" as CUDA graphs" if extra else "") + \
            _backend_note(backend)
    raise ValueError(f"unknown compile mode {mode!r}; valid: {', '.join(COMPILE_MODES)}")


def _backend_note(backend: Any) -> str:
    return "" if backend == "inductor" else f" with backend {getattr(backend, '__name__', backend)}"


def resolve_compile(choice: str, device: torch.device) -> str:
    """``train.compile`` (after config normalisation) -> one of :data:`COMPILE_MODES` on ``device``: ``auto`` is
    ``blocks`` on CUDA and ``off`` elsewhere (a CPU compile costs more than it saves on short runs)."""
    if choice == "auto":
        return "blocks" if torch.device(device).type == "cuda" else "off"
    if choice not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {choice!r}; valid: auto, {', '.join(COMPILE_MODES)}")
    return choice


def compile_mode_for(mode: str, zero_stage: int) -> tuple[str, str]:
    """The compile mode that runs under ``zero_stage`` for the asked one, and why it differs ("" if not).

    ZeRO-3 gathers and frees each module's parameters in eager hooks between modules, so a graph can span at
    most one block (a leaf module whose one hook sits outside its compiled forward)."""
    if zero_stage >= 3 and mode in ("step", "cudagraphs"):
        return "blocks", (f"train.compile={mode} runs per block under ZeRO-3 (DeepSpeed gathers each block's "
                          "parameters in an eager hook, so no graph can span blocks)")
    return mode, ""


def mark_zero3_leaf_blocks(model: nn.Module) -> int:
    """Make every transformer block a ZeRO-3 leaf module (DeepSpeed gathers all its parameters in one hook on
    the block, none on its sub-modules); call before ``deepspeed.initialize``. Returns how many."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = list({type(b) for b in transformer_blocks(model)})
    return len(set_z3_leaf_modules(model, classes)) if classes else 0


def apply_performance_toggles(model: nn.Module, activation_checkpointing: bool, compile: str | bool = "off",
                              zero_stage: int = 0, backend: Any = "inductor") -> list[str]:
    """Apply the toggles in the documented order; returns what was applied, for the start-up log.

    ``compile``: one of :data:`COMPILE_MODES` (True means ``blocks``); ``zero_stage``: the DeepSpeed stage the
    model will run under (3 changes how it compiles, see :func:`compile_mode_for`); ``backend``: torch.compile's."""
    mode = {True: "blocks", False: "off"}.get(compile, compile) if isinstance(compile, bool) else compile
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; valid: {', '.join(COMPILE_MODES)}")
    applied = []
    mode, why = compile_mode_for(mode, zero_stage)
    if why:
        applied.append(why)
    if mode != "off" and zero_stage >= 3:
        applied.append(f"ZeRO-3 leaf blocks ({mark_zero3_leaf_blocks(model)})")
        if getattr(model, "prefix_frozen", False):
            # measured (DeepSpeed 0.19): a compiled leaf block whose input needs no gradient has its parameters
            # released before their gradients are accumulated; a frozen prefix's output that requires grad (a leaf,
            # no graph behind it) costs the first trainable block its input gradient and keeps them gathered
            model.prefix_output_requires_grad = True
            applied.append("frozen prefix output requires grad (compiled blocks under ZeRO-3)")
    if activation_checkpointing:
        applied.append(f"activation checkpointing ({apply_activation_checkpointing(model)} blocks)")
    if mode != "off":
        applied.append(apply_compile(model, mode, backend))
    return applied
