"""Analytic GPU memory estimate of MAE pre-training per rank: model states by ZeRO stage + activations.

Model states (P trainable parameters, W data-parallel ranks), bytes, by ``train.precision``
(:mod:`fastmae.precision`):

==============  ===============================  ===========================  ====================
                bf16 (autocast, fp32 weights)    fp16 (DeepSpeed fp16 mode)   fp32
==============  ===============================  ===========================  ====================
weights         4P + 2P bf16 copies autocast      2P    (ZeRO-3: 2P/W)         4P  (ZeRO-3: 4P/W)
                keeps for backward (ZeRO-3: /W)
gradients       4P    (ZeRO-2/3: 4P/W)           2P    (ZeRO-2/3: 2P/W)       4P  (ZeRO-2/3: 4P/W)
AdamW states    8P/W  (m, v; the weights are      12P/W (fp32 master, m, v)    8P/W (m, v)
                the master weights)
==============  ===============================  ===========================  ====================

(ZeRO-1/2/3 all partition the optimizer states; bucket buffers are ignored.)

Activations kept for backward by one pre-norm block, per token, with e bytes per activation element
(2 for bf16/fp16), n bytes per LayerNorm input/output element (4 under bf16 autocast: LayerNorm runs in fp32
and the residual stream stays fp32; e otherwise) and width h (no dropout in MAE):
LayerNorm inputs 2nh + LayerNorm outputs 2nh + q, k, v 3eh + attention output eh + fc1 output 4eh +
GELU output 4eh, plus fp32 LayerNorm statistics (16 B) and the attention's fp32 log-sum-exp per
head (FlashAttention/SDPA) - or the full softmax, e * heads * tokens, with ``math`` attention. With activation
checkpointing a block keeps only its input (nh per token) and one block at a time is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .kernels import num_kept


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    # the data loader's own GPU buffers (DALI on a GPU: see DaliLoader.gpu_memory_bytes; 0 elsewhere)
    loader: int = 0

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.loader

    def describe(self) -> str:
        unit, div = ("GiB", 2**30) if self.total >= 2**30 else ("MiB", 2**20)
        data = f" + data loader {self.loader / div:.1f}" if self.loader else ""
        return (f"weights {self.weights / div:.1f} + grads {self.gradients / div:.1f} + optimizer "
                f"{self.optimizer / div:.1f} + activations {self.activations / div:.1f}{data} = "
                f"{self.total / div:.1f} {unit}")


def trainable_params(m: ModelConfig) -> int:
    """Trainable parameters of the MAE (fixed sin-cos position embeddings excluded)."""
    def block(d: int) -> int:
        h = int(d * m.mlp_ratio)
        return 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)

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


def estimate_memory(m: ModelConfig, mask_ratio: float, micro_batch: int, zero_stage: int = 2,
                    world_size: int = 1, precision: str = "bf16", activation_checkpointing: bool = False,
                    attention: str = "sdpa") -> MemoryEstimate:
    """Per-rank bytes of one training step at the activation peak (end of the forward pass)."""
    P = trainable_params(m)
    W = max(1, world_size)
    e = 4 if precision == "fp32" else 2  # activations
    ln = 4 if precision in ("bf16", "fp32") else 2  # LayerNorm inputs/outputs, the residual stream
    w_bytes = {"bf16": 4 + 2, "fp16": 2, "fp32": 4}[precision]
    g_bytes = 2 if precision == "fp16" else 4
    weights = w_bytes * P // (W if zero_stage >= 3 else 1)
    grads = g_bytes * P // (W if zero_stage >= 2 else 1)
    optim = (12 if precision == "fp16" else 8) * P // W

    n = (m.img_size // m.patch_size) ** 2
    t_enc = (n if m.encoder_mask_tokens else num_kept(n, mask_ratio)) + 1
    t_dec = n + 1
    enc_blk = block_activation_bytes(t_enc, m.embed_dim, m.num_heads, m.mlp_ratio, e, attention, ln)
    dec_blk = block_activation_bytes(t_dec, m.decoder_embed_dim, m.decoder_num_heads, m.mlp_ratio, e, attention, ln)
    if activation_checkpointing:  # block inputs + one block recomputed at a time
        blocks = (m.depth * t_enc * m.embed_dim + m.decoder_depth * t_dec * m.decoder_embed_dim) * ln
        blocks += max(enc_blk, dec_blk)
    else:
        blocks = m.depth * enc_blk + m.decoder_depth * dec_blk
    pd = m.patch_size**2 * m.in_chans
    # images (fp32) + patch tokens (gather_first: N + K pixel patches and K tokens; else N x D twice) + decoder
    # input/unshuffle (3 x N x Dd) + prediction, target, loss (fp32)
    if m.patch_embed_order == "gather_first" and not m.encoder_mask_tokens:
        tokens = e * ((n + t_enc) * pd + t_enc * m.embed_dim)
    else:
        tokens = e * n * m.embed_dim * 2
    other = 4 * 3 * m.img_size**2 + tokens + e * 3 * t_dec * m.decoder_embed_dim + 4 * 4 * n * pd
    return MemoryEstimate(weights, grads, optim, micro_batch * (blocks + other))
