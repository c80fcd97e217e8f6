"""Fused per-sample random masking + gather of the visible tokens (+ position embedding) in Triton: one kernel
(or a sort and a gather kernel) replaces the official ``argsort -> argsort -> gather -> add`` sequence, bit
for bit equal to :func:`random_masking_ref`, as torch custom ops so that whole steps compile. Runs on CUDA
tensors, or on CPU ones under ``TRITON_INTERPRET=1``. See docs/architecture.md.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .masking_ref import num_kept

__all__ = [
    "DEFAULT_SCHEDULE", "MAX_TOKENS", "SCHEDULES", "masking_bwd", "masking_fwd", "pos_embed_grad", "random_masking",
]

MAX_TOKENS = 4096  # sorted in registers (compiled for sm_90 without spills); ViT-H/14 at 448 px: 1024
SCHEDULES = ("fused", "split")
DEFAULT_SCHEDULE = "fused"  # until benchmarks/masking_kernel.py has measured both on a GPU
_INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # padding key: sorts after every real key


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _cast(v, dst_ty: tl.constexpr, BF16_RNE: tl.constexpr):
    """``v.to(dst_ty)``; with BF16_RNE, float32 -> bfloat16 rounded to nearest even by integer ops.

    BF16_RNE is set only under the interpreter, whose float32 -> bfloat16 cast does not round to
    nearest even (the GPU's ``cvt.rn.bf16.f32`` does), so the interpreter matches torch bit for bit.
    """
    if BF16_RNE:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = tl.where(is_nan, (bits >> 16) | 0x40, rounded)  # keep NaN a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dst_ty)


@triton.jit
def _sorted_keys(
    noise_ptr,
    seed_ptr,
    seed,
    b,
    N,
    stride_noise_b,
    NP: tl.constexpr,
    LOG2_NP: tl.constexpr,
    USE_NOISE: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
):
    """Sorted packed keys (NP,) int64 of sample ``b``; the low index bits hold ``argsort(noise[b])``."""
    n = tl.arange(0, NP)  # (NP,)
    valid = n < N
    if USE_NOISE:
        v = tl.load(noise_ptr + b * stride_noise_b + n, mask=valid, other=0.0).to(tl.float32)
        bits = v.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        key = tl.where(bits < 0, -mag, mag)  # monotone in the float value; -0.0 -> 0 like +0.0
        key = tl.where(mag > 0x7F800000, 0x7FC00000, key)  # any NaN: after +inf, ties by index
        packed = (key.to(tl.int64) << 32) | n.to(tl.int64)
    else:
        if SEED_FROM_PTR:
            seed = tl.load(seed_ptr)  # int64 drawn on the device by torch: no host sync
        c0 = n.to(tl.uint32)
        c1 = tl.zeros([NP], dtype=tl.uint32) + b.to(tl.uint32)
        zero = tl.zeros([NP], dtype=tl.uint32)
        r0, r1, _r2, _r3 = tl.philox(seed, c0, c1, zero, zero)
        rnd = ((r0.to(tl.int64) & 0x7FFFFFFF) << 32) | (r1.to(tl.int64) & 0xFFFFFFFF)  # 63 bits
        packed = ((rnd >> LOG2_NP) << LOG2_NP) | n.to(tl.int64)
    packed = tl.where(valid, packed, _INT64_MAX)  # padding sorts last
    return tl.sort(packed)


@triton.jit
def _shuffle_and_scatter(
    noise_ptr,
    seed_ptr,
    seed,
    mask_ptr,
    ids_restore_ptr,
    b,
    N,
    K,
    stride_noise_b,
    write,
    NP: tl.constexpr,
    LOG2_NP: tl.constexpr,
    USE_NOISE: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
):
    """ids_shuffle (NP,) int32 of sample b (token at each rank); if ``write``, also scatters mask and
    ids_restore of the sample (N small elements)."""
    srt = _sorted_keys(
        noise_ptr, seed_ptr, seed, b, N, stride_noise_b, NP, LOG2_NP, USE_NOISE, SEED_FROM_PTR
    )  # (NP,)
    if USE_NOISE:
        ids_shuffle = (srt & 0xFFFFFFFF).to(tl.int32)
    else:
        ids_shuffle = (srt & (NP - 1)).to(tl.int32)
    rank = tl.arange(0, NP)  # (NP,)
    # one comparison, not ``(rank < N) & write``: Triton 3.9's interpreter stores a scalar comparison as int32
    # data, and an int1 mask holding int32 data is refused by its masked store
    ok = rank < tl.where(write, N, 0)
    tl.store(ids_restore_ptr + b * N + ids_shuffle, rank.to(tl.int64), mask=ok)
    is_masked = tl.where(rank >= K, 1.0, 0.0).to(mask_ptr.dtype.element_ty)  # (NP,) exact in any dtype
    tl.store(mask_ptr + b * N + ids_shuffle, is_masked, mask=ok)
    return ids_shuffle


@triton.jit
def _gather_tile(
    x_ptr,
    pos_ptr,
    out_ptr,
    b,
    rows,
    r,
    r_ok,
    d,
    d_ok,
    stride_xb,
    stride_xn,
    stride_pn,
    stride_ob,
    stride_ok,
    HAS_POS: tl.constexpr,
    BF16_RNE: tl.constexpr,
):
    """out[b, r, d] = (x + pos)[b, rows, d] for a (BLOCK_K, BLOCK_D) tile.

    Rows are contiguous along d, so the loads and stores are 16-byte vector accesses when the row
    strides are multiples of 16 bytes (D % 8 == 0 in bf16: every ViT width).
    """
    rows = rows.to(tl.int64)
    m2 = r_ok[:, None] & d_ok[None, :]  # (BLOCK_K, BLOCK_D)
    v = tl.load(x_ptr + b * stride_xb + rows[:, None] * stride_xn + d[None, :], mask=m2)
    if HAS_POS:
        p = tl.load(pos_ptr + rows[:, None] * stride_pn + d[None, :], mask=m2)
        v = v.to(tl.float32) + p.to(tl.float32)  # one rounding below, as torch's add
    dst = out_ptr + b * stride_ob + r[:, None].to(tl.int64) * stride_ok + d[None, :]
    tl.store(dst, _cast(v, out_ptr.dtype.element_ty, BF16_RNE), mask=m2)


@triton.jit(do_not_specialize=["seed"])
def _masking_fwd_kernel(
    x_ptr,
    pos_ptr,
    noise_ptr,
    seed_ptr,
    seed,
    out_ptr,
    mask_ptr,
    ids_restore_ptr,
    N,
    K,
    D,
    stride_xb,
    stride_xn,
    stride_pn,
    stride_noise_b,
    stride_ob,
    stride_ok,
    NP: tl.constexpr,
    LOG2_NP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr,
    USE_NOISE: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
    BF16_RNE: tl.constexpr,
):
    """Fused: x_vis[b, :, d-chunk] = (x + pos)[b, ids_shuffle[:K], d-chunk]; grid (B, cdiv(D, BLOCK_D)).

    Every program sorts its sample's keys; the first D-chunk program also writes mask/ids_restore.
    """
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    ids_shuffle = _shuffle_and_scatter(
        noise_ptr, seed_ptr, seed, mask_ptr, ids_restore_ptr, b, N, K, stride_noise_b, pid_d == 0,
        NP, LOG2_NP, USE_NOISE, SEED_FROM_PTR,
    )  # (NP,)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_ok = d < D
    for k0 in range(0, K, BLOCK_K):
        r = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) ranks = rows of x_vis
        rows = tl.gather(ids_shuffle, tl.minimum(r, NP - 1), 0)  # (BLOCK_K,) their tokens
        _gather_tile(
            x_ptr, pos_ptr, out_ptr, b, rows, r, r < K, d, d_ok,
            stride_xb, stride_xn, stride_pn, stride_ob, stride_ok, HAS_POS, BF16_RNE,
        )


@triton.jit(do_not_specialize=["seed"])
def _masking_sort_kernel(
    noise_ptr,
    seed_ptr,
    seed,
    mask_ptr,
    ids_restore_ptr,
    ids_keep_ptr,
    N,
    K,
    stride_noise_b,
    NP: tl.constexpr,
    LOG2_NP: tl.constexpr,
    USE_NOISE: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
):
    """Split, step 1 (grid (B,)): sort once per sample; write mask, ids_restore and ids_keep (B, K) int32."""
    b = tl.program_id(0).to(tl.int64)
    ids_shuffle = _shuffle_and_scatter(
        noise_ptr, seed_ptr, seed, mask_ptr, ids_restore_ptr, b, N, K, stride_noise_b, True,
        NP, LOG2_NP, USE_NOISE, SEED_FROM_PTR,
    )  # (NP,)
    rank = tl.arange(0, NP)
    tl.store(ids_keep_ptr + b * K + rank, ids_shuffle, mask=rank < K)


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    pos_ptr,
    ids_keep_ptr,
    out_ptr,
    K,
    D,
    stride_xb,
    stride_xn,
    stride_pn,
    stride_ob,
    stride_ok,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr,
    BF16_RNE: tl.constexpr,
):
    """Split, step 2 (grid (B, cdiv(K, BLOCK_K), cdiv(D, BLOCK_D))): a pure gather, no sort."""
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    r_ok = r < K
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    rows = tl.load(ids_keep_ptr + b * K + r, mask=r_ok, other=0)  # (BLOCK_K,)
    _gather_tile(
        x_ptr, pos_ptr, out_ptr, b, rows, r, r_ok, d, d < D,
        stride_xb, stride_xn, stride_pn, stride_ob, stride_ok, HAS_POS, BF16_RNE,
    )


@triton.jit
def _masking_bwd_kernel(
    gvis_ptr,
    ids_restore_ptr,
    gx_ptr,
    N,
    K,
    D,
    stride_gb,
    stride_gk,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_RNE: tl.constexpr,
):
    """grad_x[b, n, d-chunk] = grad_x_vis[b, ids_restore[b, n], d-chunk] if kept else 0 (all written)."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    n_ok = n < N
    d_ok = d < D
    j = tl.load(ids_restore_ptr + b * N + n, mask=n_ok, other=K)  # (BLOCK_N,) int64 rank
    keep = n_ok & (j < K)
    src = gvis_ptr + b * stride_gb + j[:, None] * stride_gk + d[None, :]
    g = tl.load(src, mask=keep[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    dst = gx_ptr + (b * N + n[:, None].to(tl.int64)) * D + d[None, :]
    tl.store(dst, _cast(g, gx_ptr.dtype.element_ty, BF16_RNE), mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _pos_grad_kernel(
    gvis_ptr,
    ids_restore_ptr,
    partial_ptr,
    B,
    N,
    K,
    D,
    stride_gb,
    stride_gk,
    B_PER_SPLIT,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """partial[s, n, d-chunk] = sum over samples b of split s of (kept ? grad_x_vis[b, ids_restore[b, n]] : 0).

    Grid (cdiv(N, BLOCK_N), cdiv(D, BLOCK_D), splits); fp32 partial sums, reduced by the launcher in a
    fixed order: deterministic, no atomics.
    """
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    split = tl.program_id(2)
    n_ok = n < N
    d_ok = d < D
    b0 = split.to(tl.int64) * B_PER_SPLIT
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    ids_row = ids_restore_ptr + b0 * N + n  # (BLOCK_N,) pointers into sample b0, advanced per sample
    g_base = gvis_ptr + b0 * stride_gb
    for i in range(0, B_PER_SPLIT):
        # n_ok while sample b0 + i exists, as one tensor comparison (see _shuffle_and_scatter)
        live = n < tl.where(b0 + i < B, N, 0)
        j = tl.load(ids_row, mask=live, other=K)  # (BLOCK_N,) rank of token n in sample b0 + i
        keep = live & (j < K)
        src = g_base + j[:, None] * stride_gk + d[None, :]
        acc += tl.load(src, mask=keep[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        ids_row += N
        g_base += stride_gb
    dst = partial_ptr + (split.to(tl.int64) * N + n[:, None]) * D + d[None, :]
    tl.store(dst, acc, mask=n_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launchers


def _interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _needs_bf16_rne(src: torch.dtype, dst: torch.dtype) -> bool:
    """Round float -> bfloat16 by hand (see ``_cast``): only under the interpreter, only if it converts."""
    return _interpreting() and dst == torch.bfloat16 and src != torch.bfloat16


def _check_device(t: torch.Tensor, what: str) -> None:
    """Raise a clear error for tensors the kernel cannot run on."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _interpreting():
        return
    raise RuntimeError(
        f"fastmae.kernels.random_masking needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported); {what} is on {t.device}. Use the masking backend 'torch' (or 'auto') "
        f"on this device."
    )


def _sort_warps(NP: int) -> int:
    """Warps that keep a sort of NP int64 keys in registers (<= 8 keys per thread up to 4096)."""
    return max(4, min(16, NP // 512))


def _fwd_blocks(N: int, K: int, D: int, block_d: int | None) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps) of the forward kernels.

    On GPU a program moves a (64, 256) bf16 slab per step at most (32 KiB in flight per program, a
    few programs per SM: enough bytes in flight to saturate HBM), and with ``fused`` the duplicated
    per-chunk sort stays a small share (B * D/256 sorts of N keys; SASS of the N=196 fused kernel:
    ~900 instructions per warp, mostly the sort). The interpreter runs programs one after the other
    and pays ~0.25 s per sort of 256 keys, so there one program per sample does all of D.
    """
    kp = triton.next_power_of_2(K)
    if block_d is None:
        block_d = min(triton.next_power_of_2(max(D, 1)), 4096 if _interpreting() else 256)
    block_k = kp if _interpreting() else min(kp, max(16, 16384 // block_d))
    num_warps = 8 if block_k * block_d >= 16384 else 4
    return block_k, block_d, max(num_warps, _sort_warps(triton.next_power_of_2(N)))


def masking_fwd(
    x: torch.Tensor,
    K: int,
    pos_embed: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: torch.Tensor | int | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block_d: int | None = None,
    schedule: str = "fused",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel(s) (no autograd, no argument normalisation).

    x (B, N, D) with unit stride in D; pos_embed (N, D) with unit stride in D or None; noise (B, N)
    contiguous float32/16/bf16 or None, in which case seed is an int in [0, 2^63) (a kernel argument)
    or a (1,) int64 tensor on x's device (read by the kernel: a seed drawn on the device, no sync).
    ``out`` = (x_vis (B, K, D), mask (B, N), ids_restore (B, N) int64) buffers to write (tests poison
    them to check every element is written). ``schedule``: ``fused`` (one kernel, a sort per
    program) or ``split`` (a sort kernel writing ids_keep (B, K) int32, then a gather kernel).
    Returns (x_vis, mask, ids_restore).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown masking kernel schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    B, N, D = x.shape
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    if out is None:
        x_vis = torch.empty((B, K, D), device=x.device, dtype=dtype)
        mask = torch.empty((B, N), device=x.device, dtype=dtype)
        ids_restore = torch.empty((B, N), device=x.device, dtype=torch.int64)
    else:
        x_vis, mask, ids_restore = out
    if B == 0:
        return x_vis, mask, ids_restore
    NP = triton.next_power_of_2(N)
    block_k, block_d, num_warps = _fwd_blocks(N, K, D, block_d)
    has_pos, use_noise = pos_embed is not None, noise is not None
    pos_arg = pos_embed if has_pos else x  # dummy pointer, never read without HAS_POS
    noise_arg = noise if use_noise else x  # dummy pointer, never read without USE_NOISE
    seed_from_ptr = isinstance(seed, torch.Tensor)
    seed_arg = seed if seed_from_ptr else ids_restore  # dummy pointer unless SEED_FROM_PTR
    seed_int = 0 if seed_from_ptr or seed is None else int(seed)
    pos_stride = pos_embed.stride(0) if has_pos else 0
    noise_stride = noise.stride(0) if use_noise else 0
    bf16_rne = _needs_bf16_rne(torch.float32 if has_pos else x.dtype, dtype)
    log2_np = NP.bit_length() - 1
    if schedule == "fused":
        if D == 0:  # no D-chunk program would write mask / ids_restore
            return masking_fwd(x, K, pos_embed, noise, seed, (x_vis, mask, ids_restore), block_d, "split")
        _masking_fwd_kernel[(B, triton.cdiv(D, block_d))](
            x, pos_arg, noise_arg, seed_arg, seed_int, x_vis, mask, ids_restore,
            N, K, D, x.stride(0), x.stride(1), pos_stride, noise_stride, x_vis.stride(0), x_vis.stride(1),
            NP=NP, LOG2_NP=log2_np, BLOCK_K=block_k, BLOCK_D=block_d, HAS_POS=has_pos,
            USE_NOISE=use_noise, SEED_FROM_PTR=seed_from_ptr, BF16_RNE=bf16_rne, num_warps=num_warps,
        )
        return x_vis, mask, ids_restore
    ids_keep = torch.empty((B, K), device=x.device, dtype=torch.int32)  # (B, K): 4*B*K bytes, no (B, N)
    _masking_sort_kernel[(B,)](
        noise_arg, seed_arg, seed_int, mask, ids_restore, ids_keep, N, K, noise_stride,
        NP=NP, LOG2_NP=log2_np, USE_NOISE=use_noise, SEED_FROM_PTR=seed_from_ptr, num_warps=_sort_warps(NP),
    )
    if D > 0:
        grid = (B, triton.cdiv(K, block_k), triton.cdiv(D, block_d))
        _gather_rows_kernel[grid](
            x, pos_arg, ids_keep, x_vis, K, D, x.stride(0), x.stride(1), pos_stride,
            x_vis.stride(0), x_vis.stride(1),
            BLOCK_K=block_k, BLOCK_D=block_d, HAS_POS=has_pos, BF16_RNE=bf16_rne, num_warps=num_warps,
        )
    return x_vis, mask, ids_restore


def _bwd_blocks(N: int, D: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the backward kernels: 64x128 tiles on GPU, one program per sample interpreted."""
    if _interpreting():
        return triton.next_power_of_2(N), triton.next_power_of_2(D)
    return min(64, triton.next_power_of_2(N)), min(128, triton.next_power_of_2(D))


def masking_bwd(
    grad_x_vis: torch.Tensor,
    ids_restore: torch.Tensor,
    D: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad_x (B, N, D) of ``dtype`` from grad_x_vis (B, K, D) (unit stride in D) and ids_restore (B, N).

    Every element of the result is written by the kernel (zeros at masked rows): no memset.
    """
    B, N = ids_restore.shape
    K = grad_x_vis.shape[1]
    grad_x = torch.empty((B, N, D), device=grad_x_vis.device, dtype=dtype) if out is None else out
    if B == 0 or D == 0:
        return grad_x
    block_n, block_d = _bwd_blocks(N, D)
    grid = (B, triton.cdiv(N, block_n), triton.cdiv(D, block_d))
    _masking_bwd_kernel[grid](
        grad_x_vis, ids_restore, grad_x, N, K, D, grad_x_vis.stride(0), grad_x_vis.stride(1),
        BLOCK_N=block_n, BLOCK_D=block_d, BF16_RNE=_needs_bf16_rne(grad_x_vis.dtype, dtype), num_warps=4,
    )
    return grad_x


def pos_embed_grad(
    grad_x_vis: torch.Tensor,
    ids_restore: torch.Tensor,
    D: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """grad of the fused pos_embed (N, D) of ``dtype``: the scattered rows summed over the batch.

    fp32 partial sums over up to 16 batch splits (so a B=256 batch still fills the GPU), then one
    fixed-order sum: deterministic, no atomics. MAE keeps pos_embed frozen; this is for other uses.
    ``splits`` overrides the number of batch splits (tests).
    """
    B, N = ids_restore.shape
    K = grad_x_vis.shape[1]
    if B == 0 or D == 0:
        grad = torch.zeros((N, D), device=grad_x_vis.device, dtype=dtype)
        return grad if out is None else out.copy_(grad)
    if _interpreting():
        block_n, block_d, default_splits = triton.next_power_of_2(N), triton.next_power_of_2(D), 1
    else:
        block_n, block_d, default_splits = min(32, triton.next_power_of_2(N)), min(128, triton.next_power_of_2(D)), 16
    splits = splits if splits is not None else default_splits
    b_per_split = triton.cdiv(B, min(splits, B))
    splits = triton.cdiv(B, b_per_split)
    partial = torch.empty((splits, N, D), device=grad_x_vis.device, dtype=torch.float32)
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d), splits)
    _pos_grad_kernel[grid](
        grad_x_vis, ids_restore, partial, B, N, K, D, grad_x_vis.stride(0), grad_x_vis.stride(1), b_per_split,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    grad = partial.sum(0).to(dtype)  # (N, D)
    return grad if out is None else out.copy_(grad)


# ----------------------------------------------------------------------------- torch ops (autograd, compile)
#
# The launchers are registered as torch custom ops with shape-only "fake" versions: torch.compile sees each as one
# opaque node (no graph break, no tracing into Python launch code; a whole training step compiles into one graph
# and CUDA graphs can capture it), and autograd runs the backward kernels through ``register_autograd``.


@torch.library.custom_op("fastmae::masking_fwd", mutates_args=())
def _masking_fwd_op(x: torch.Tensor, K: int, pos_embed: torch.Tensor | None, noise: torch.Tensor | None,
                    seed: torch.Tensor | None, seed_int: int, block_d: int, schedule: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return masking_fwd(x, K, pos_embed=pos_embed, noise=noise, seed=seed if seed is not None else seed_int,
                       block_d=block_d or None, schedule=schedule)


@_masking_fwd_op.register_fake
def _(x, K, pos_embed, noise, seed, seed_int, block_d, schedule):
    B, N, D = x.shape
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    return (x.new_empty((B, K, D), dtype=dtype), x.new_empty((B, N), dtype=dtype),
            x.new_empty((B, N), dtype=torch.int64))


@torch.library.custom_op("fastmae::masking_bwd", mutates_args=())
def _masking_bwd_op(grad_x_vis: torch.Tensor, ids_restore: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    return masking_bwd(grad_x_vis, ids_restore, D, dtype)


@_masking_bwd_op.register_fake
def _(grad_x_vis, ids_restore, D, dtype):
    return grad_x_vis.new_empty((*ids_restore.shape, D), dtype=dtype)


@torch.library.custom_op("fastmae::pos_embed_grad", mutates_args=())
def _pos_embed_grad_op(grad_x_vis: torch.Tensor, ids_restore: torch.Tensor, D: int, dtype: torch.dtype
                       ) -> torch.Tensor:
    return pos_embed_grad(grad_x_vis, ids_restore, D, dtype)


@_pos_embed_grad_op.register_fake
def _(grad_x_vis, ids_restore, D, dtype):
    return grad_x_vis.new_empty((ids_restore.shape[1], D), dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, _K, pos_embed, *_ = inputs
    ctx.save_for_backward(output[2])  # ids_restore
    ctx.x_dtype, ctx.D = x.dtype, x.shape[2]
    ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_x_vis: torch.Tensor, _grad_mask: torch.Tensor, _grad_ids: torch.Tensor):
    """grad x (B, N, D) by inverse permutation, zeros at masked rows; grad pos_embed (N, D) summed over B."""
    (ids_restore,) = ctx.saved_tensors
    grad_x_vis = grad_x_vis.contiguous()
    grad_x = grad_pos = None
    if ctx.needs_input_grad[0]:
        grad_x = _masking_bwd_op(grad_x_vis, ids_restore, ctx.D, ctx.x_dtype)  # (B, N, D)
    if ctx.needs_input_grad[2]:
        grad_pos = _pos_embed_grad_op(grad_x_vis, ids_restore, ctx.D, ctx.pos_dtype)  # (N, D)
    return grad_x, None, grad_pos, None, None, None, None, None


_masking_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

_NOISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    block_d: int | None = None,
    schedule: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a uniformly random subset of ``K = int(N * (1 - mask_ratio))`` tokens per sample (fused).

    Same contract as :func:`fastmae.kernels.random_masking_ref`.

    Args:
        x: tokens (B, N, D), fp32/bf16/fp16, CUDA (or CPU under ``TRITON_INTERPRET=1``). Any strides;
            a tensor whose last dim is not unit-stride is copied with ``.contiguous()`` first (the
            gather needs contiguous rows; the official PatchEmbed's ``transpose`` output is such a
            tensor: produce (B, N, D) contiguous upstream to avoid the copy).
        mask_ratio: share of tokens removed.
        noise: optional (B, N) floats; the permutation of sample b is ``argsort(noise[b])`` (stable)
            and the outputs equal the reference's exactly. float64/integer noise is first replaced by
            its exact per-sample ranks (two torch argsorts), which preserves the order.
        seed: used when ``noise`` is None: sample b's mask is a pure function of (seed, b, N, K)
            (Philox in the kernel; the torch reference computes the same keys). An int in [0, 2^63) (a
            kernel argument) or a one-element int64 tensor on x's device (read by the kernel: no host
            sync, one compiled graph for every seed). None draws a seed from torch's default generator on
            x's device (follows ``torch.manual_seed``; no host sync).
        pos_embed: optional (N, D) or (1, N, D), added to the gathered rows (``x + pos_embed``); the
            outputs then have ``promote_types(x.dtype, pos_embed.dtype)`` like the reference.
        block_d: channels per program (power of two); None picks a default. For tests and tuning.
        schedule: ``fused`` (one kernel; every program re-sorts its sample) or ``split`` (one sort
            per sample, then a sort-free gather kernel); None: ``DEFAULT_SCHEDULE``. Same results.

    Returns:
        x_vis (B, K, D), mask (B, N) (1 = masked), ids_restore (B, N) int64.
    """
    x, K = _checked_tokens(x, mask_ratio, block_d)
    pos_embed = _checked_pos_embed(pos_embed, x)
    noise, seed_arg = _noise_or_seed(noise, seed, x)
    schedule = DEFAULT_SCHEDULE if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown masking kernel schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    seed_tensor = seed_arg if isinstance(seed_arg, torch.Tensor) else None
    seed_int = 0 if seed_tensor is not None else int(seed_arg or 0)
    return _masking_fwd_op(x, K, pos_embed, noise, seed_tensor, seed_int, block_d or 0, schedule)


def _checked_tokens(x: torch.Tensor, mask_ratio: float, block_d: int | None) -> tuple[torch.Tensor, int]:
    """(x with unit-stride rows, tokens kept per sample) after :func:`random_masking`'s checks of x."""
    if x.dim() != 3:
        raise ValueError(f"random_masking expects x of shape (B, N, D), got {tuple(x.shape)}")
    _check_device(x, "x")
    if x.dtype not in _NOISE_DTYPES:
        raise TypeError(f"random_masking supports float32, float16 and bfloat16 tokens, got {x.dtype}")
    N = x.shape[1]
    K = num_kept(N, mask_ratio)
    if not 0 < K <= N:
        raise ValueError(f"mask_ratio={mask_ratio} keeps {K} of {N} tokens")
    if N > MAX_TOKENS:
        raise ValueError(f"random_masking sorts in registers: at most {MAX_TOKENS} tokens, not {N}")
    if block_d is not None and (block_d < 1 or block_d & (block_d - 1)):
        raise ValueError(f"block_d must be a power of two, got {block_d}")
    return (x.contiguous() if x.stride(-1) != 1 else x), K


def _checked_pos_embed(pos_embed: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``pos_embed`` as an (N, D) tensor with unit-stride rows, checked against x (B, N, D)."""
    if pos_embed is None:
        return None
    _, N, D = x.shape
    if tuple(pos_embed.shape) not in ((N, D), (1, N, D)):
        shape = tuple(pos_embed.shape)
        raise ValueError(f"pos_embed must have shape {(N, D)} or {(1, N, D)}, got {shape}")
    if pos_embed.device != x.device:
        raise ValueError(f"pos_embed is on {pos_embed.device}, x on {x.device}")
    if pos_embed.dtype not in _NOISE_DTYPES:
        raise TypeError(f"pos_embed must be float32, float16 or bfloat16, got {pos_embed.dtype}")
    pos_embed = pos_embed.reshape(N, D)  # a view for the model's pos_embed[:, 1:, :] slice
    return pos_embed.contiguous() if pos_embed.stride(-1) != 1 else pos_embed


def _noise_or_seed(noise: torch.Tensor | None, seed: int | torch.Tensor | None,
                   x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | int | None]:
    """(contiguous float noise, None) when noise is given, else (None, the seed the kernel reads)."""
    B, N = x.shape[0], x.shape[1]
    if noise is not None:
        if tuple(noise.shape) != (B, N):
            raise ValueError(f"noise must have shape {(B, N)}, got {tuple(noise.shape)}")
        if noise.device != x.device:
            raise ValueError(f"noise is on {noise.device}, x on {x.device}")
        if noise.dtype not in _NOISE_DTYPES:
            # exact ranks keep argsort(noise) (stable) and fit float32 exactly (N <= 2^24)
            ranks = torch.argsort(torch.argsort(noise, dim=1, stable=True), dim=1)
            noise = ranks.to(torch.float32)
        return noise.contiguous(), None
    if seed is None:
        return None, torch.empty(1, dtype=torch.int64, device=x.device).random_()  # on device: no host sync
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
            raise ValueError(f"a tensor seed must be one int64 element on {x.device}, got {seed.dtype} "
                             f"{tuple(seed.shape)} on {seed.device}")
        return None, seed.reshape(1)
    return None, int(seed) % (1 << 63)  # a plain kernel argument: no tensor, no extra launch
