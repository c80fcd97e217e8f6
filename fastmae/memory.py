"""Analytic GPU memory estimate of MAE training per rank: the model states DeepSpeed holds for each ZeRO stage
and precision (as measured on DeepSpeed 0.19's fp32 engine) plus the activations backward keeps, with and
without activation checkpointing. See docs/training.md (memory and activation checkpointing).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .kernels import num_kept

# the ZeRO-3 gradient bucket of the bundled zero3.json (reduce_bucket_size, elements; DeepSpeed's default is 5e8)
ZERO3_BUCKET = 50_000_000


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank."""

    weights: int
    gradients: int
    # AdamW states, with DeepSpeed's fp32 partition copy (ZeRO-1/2/3) or fp32 master weights (fp16)
    optimizer: int
    activations: int
    # the data loader's own GPU buffers (DALI on a GPU: see DaliLoader.gpu_memory_bytes; 0 elsewhere)
    loader: int = 0
    # ZeRO's fixed buffers (ZeRO-3: the gradient bucket)
    buffers: int = 0
    # bf16 copies of the weights that autocast keeps for backward (train.precision=bf16)
    weight_copies: int = 0

    @property
    def model_states(self) -> int:
        """What DeepSpeed holds between steps (plus the gradients of the step in flight)."""
        return self.weights + self.gradients + self.optimizer + self.buffers

    @property
    def total(self) -> int:
        return self.model_states + self.weight_copies + self.activations + self.loader

    def describe(self) -> str:
        unit, div = ("GiB", 2**30) if self.total >= 2**30 else ("MiB", 2**20)
        buffers = f" + ZeRO buffers {self.buffers / div:.1f}" if self.buffers else ""
        copies = f" + bf16 weight copies {self.weight_copies / div:.1f}" if self.weight_copies else ""
        data = f" + data loader {self.loader / div:.1f}" if self.loader else ""
        return (f"weights {self.weights / div:.1f} + grads {self.gradients / div:.1f} + optimizer "
                f"{self.optimizer / div:.1f}{buffers}{copies} + activations {self.activations / div:.1f}{data} = "
                f"{self.total / div:.1f} {unit}")


def block_params(d: int, mlp_ratio: float) -> int:
    """Parameters of one transformer block of width ``d`` (two LayerNorms, qkv, projection, MLP)."""
    h = int(d * mlp_ratio)
    return 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)


def trainable_params(m: ModelConfig) -> int:
    """Trainable parameters of the MAE (fixed sin-cos position embeddings excluded)."""
    def block(d: int) -> int:
        return block_params(d, m.mlp_ratio)

    D, Dd, pd = m.embed_dim, m.decoder_embed_dim, m.patch_size**2 * m.in_chans
    enc = pd * D + D + D + m.depth * block(D) + 2 * D + (D if m.encoder_mask_tokens else 0)
    dec = D * Dd + Dd + Dd + m.decoder_depth * block(Dd) + 2 * Dd + Dd * pd + pd
    return enc + dec


def block_activation_bytes(tokens: int, dim: int, heads: int, mlp_ratio: float, elem: int,
                           attention: str, norm_elem: int | None = None) -> int:
    """Bytes one block keeps for backward per sample (no checkpointing)."""
    n = elem if norm_elem is None else norm_elem
    per_token = n * dim * (2 + 2) + elem * dim * (3 + 1 + 2 * mlp_ratio) + 16
    per_token += elem * heads * tokens if attention == "math" else 4 * heads
    return int(tokens * per_token)


def model_state_bytes(P: int, zero_stage: int = 2, world_size: int = 1, precision: str = "bf16",
                      reduce_bucket_size: int = ZERO3_BUCKET, grad_accum: int = 1) -> tuple[int, int, int, int]:
    """(weights, gradients, optimizer, buffers) bytes per rank of P trainable parameters (module docstring)."""
    W = max(1, world_size)
    part = W if zero_stage >= 1 else 1  # ZeRO-1/2/3 partition the optimizer (and DeepSpeed's fp32 copy)
    half = precision == "fp16"
    weights = (2 if half else 4) * P // (W if zero_stage >= 3 else 1)
    grads = (2 if half else 4) * P // part
    if zero_stage == 1 and grad_accum > 1:
        grads += 4 * (2 if half else 4) * P
    if half:
        optim = 12 * P // part  # fp32 master weights + m + v
    else:
        optim = 8 * P // part + (4 * P // W if zero_stage >= 1 else 0)  # m + v (+ the fp32 partition copy)
    buffers = 4 * reduce_bucket_size if zero_stage >= 3 else 0
    return weights, grads, optim, buffers


def estimate_memory(m: ModelConfig, mask_ratio: float, micro_batch: int, zero_stage: int = 2,
                    world_size: int = 1, precision: str = "bf16", activation_checkpointing: bool = False,
                    attention: str = "sdpa", reduce_bucket_size: int = ZERO3_BUCKET,
                    grad_accum: int = 1, trainable_blocks: int | None = None) -> MemoryEstimate:
    """Per-rank bytes of one training step at the activation peak (end of the forward pass).

    ``trainable_blocks`` (partial fine-tuning, ``cls.finetune_blocks``): only the last that many encoder blocks
    and the final norm train. The frozen rest keeps its weights but no gradient, optimizer state, bf16 copy or
    saved activation (it runs without a backward graph); checkpointing applies to the trainable blocks only."""
    P_all = trainable_params(m)
    P = P_all  # what gets gradients and optimizer state
    if trainable_blocks is not None:
        P = trainable_blocks * block_params(m.embed_dim, m.mlp_ratio) + 2 * m.embed_dim
    weights, grads, optim, buffers = model_state_bytes(P, zero_stage, world_size, precision, reduce_bucket_size,
                                                       grad_accum)
    if P != P_all:
        weights = model_state_bytes(P_all, zero_stage, world_size, precision, reduce_bucket_size, grad_accum)[0]
    copies = 2 * P if precision == "bf16" else 0
    e = 4 if precision == "fp32" else 2  # activations
    ln = 4 if precision in ("bf16", "fp32") else 2  # LayerNorm inputs/outputs, the residual stream

    n = (m.img_size // m.patch_size) ** 2
    t_enc = (n if m.encoder_mask_tokens else num_kept(n, mask_ratio)) + 1
    t_dec = n + 1
    enc_blk = block_activation_bytes(t_enc, m.embed_dim, m.num_heads, m.mlp_ratio, e, attention, ln)
    dec_blk = block_activation_bytes(t_dec, m.decoder_embed_dim, m.decoder_num_heads, m.mlp_ratio, e, attention, ln)
    depth = m.depth if trainable_blocks is None else trainable_blocks  # encoder blocks that keep activations
    if activation_checkpointing:  # block inputs + one block recomputed at a time
        blocks = (depth * t_enc * m.embed_dim + m.decoder_depth * t_dec * m.decoder_embed_dim) * ln
        blocks += max(enc_blk, dec_blk)
    else:
        blocks = depth * enc_blk + m.decoder_depth * dec_blk
    if depth < m.depth:  # a frozen block's working set, before any trainable block keeps anything
        blocks = max(blocks, enc_blk)
    pd = m.patch_size**2 * m.in_chans
    # images (fp32) + patch tokens (gather_first: N + K pixel patches and K tokens; else N x D twice) + decoder
    # input/unshuffle (3 x N x Dd) + prediction, target, loss (fp32)
    if m.patch_embed_order == "gather_first" and not m.encoder_mask_tokens:
        tokens = e * ((n + t_enc) * pd + t_enc * m.embed_dim)
    else:
        tokens = e * n * m.embed_dim * 2
    other = 4 * 3 * m.img_size**2 + tokens + e * 3 * t_dec * m.decoder_embed_dim + 4 * 4 * n * pd
    return MemoryEstimate(weights, grads, optim, micro_batch * (blocks + other), buffers=buffers,
                          weight_copies=copies)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def allocated_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes allocated now on ``device``: CUDA's caching allocator, or on the CPU the C heap in use (glibc's
    ``mallinfo2``: small blocks in use + mmapped blocks, where every tensor storage lives whether or not Python
    holds a reference to it). Used to check the estimate against DeepSpeed and the benchmarks' clean-up."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        raise RuntimeError("measuring CPU memory needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def decide_activation_checkpointing(mode: str, device: torch.device,
                                    estimate: Callable[[bool], MemoryEstimate | None],
                                    loader_bytes: int = 0) -> tuple[bool, MemoryEstimate | None]:
    """``train.activation_checkpointing``: on / off, or auto = on only when the analytic estimate without it
    (``estimate(False)``, plus the loader's ``loader_bytes`` on the GPU) exceeds 90% of this GPU's memory.
    Returns the decision and the estimate of the decided configuration. Under partial fine-tuning the estimate
    counts the trainable blocks only (``estimate_memory(trainable_blocks=...)``), the only ones checkpointing
    wraps (:func:`fastmae.parallelize.apply_activation_checkpointing`)."""

    def with_loader(use: bool) -> MemoryEstimate | None:
        est = estimate(use)
        return None if est is None else dataclasses.replace(est, loader=loader_bytes)

    if mode == "auto":
        use = False
        est = with_loader(False)
        if device.type == "cuda" and est is not None:
            use = est.total > 0.9 * torch.cuda.get_device_properties(device).total_memory
    else:
        use = mode == "on"
    return use, with_loader(use)
