"""Performance toggles applied outside the model, in one place and one order (torchtitan style):

1. activation checkpointing per transformer block (recompute the block in backward),
2. ``torch.compile`` per block (after checkpointing, so the compiled region includes the recompute),
3. DeepSpeed ZeRO wraps the result (in the program).

Both keep parameter names unchanged (the blocks' ``forward`` is wrapped, the module tree is not), so
checkpoints stay in the official MAE naming.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Encoder and decoder blocks of an MAE model."""
    return [*getattr(model, "blocks", []), *getattr(model, "decoder_blocks", [])]


def _checkpointed(forward, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():
        return checkpoint(forward, x, use_reentrant=False)
    return forward(x)


def apply_activation_checkpointing(model: nn.Module, blocks: str = "all") -> int:
    """Recompute each block in backward (``blocks``: all | encoder). Returns how many blocks were wrapped."""
    targets = list(model.blocks) if blocks == "encoder" else transformer_blocks(model)
    for blk in targets:
        blk.forward = functools.partial(_checkpointed, blk.forward)
    return len(targets)


def apply_compile(model: nn.Module) -> int:
    """``torch.compile`` every block in place (``Module.compile``: names unchanged, and blocks of one shape
    share one compiled graph), ``fullgraph=True``: a graph break is an error, not a silent slow path (the
    blocks have none with any attention backend; tested). Returns how many blocks were compiled."""
    targets = transformer_blocks(model)
    for blk in targets:
        blk.compile(fullgraph=True)
    return len(targets)


def apply_performance_toggles(model: nn.Module, activation_checkpointing: bool, compile: bool) -> list[str]:
    """Apply the toggles in the documented order; returns what was applied, for the start-up log."""
    applied = []
    if activation_checkpointing:
        applied.append(f"activation checkpointing ({apply_activation_checkpointing(model)} blocks)")
    if compile:
        applied.append(f"torch.compile ({apply_compile(model)} blocks)")
    return applied
