"""The fused Triton masking kernel (fastmae.kernels.masking) against its plain-torch reference.

Covers: the noise path bit for bit (both schedules, dtypes, odd shapes, ties/NaN/-0.0, float64
noise, N=1024, strided inputs, the block / grid mask strategies' keys), the Philox path (valid,
reproducible, seed-dependent, chi-square uniform), gradients of x and a trainable pos_embed, errors,
the debug model with masking=triton vs torch, the benchmark script (--cpu-smoke), and an sm_90 compile of every kernel.

Without CUDA these run under the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1),
where every program's in-kernel sort costs ~0.2-0.4 s at N=196..256: a few samples at N=196/256,
small N elsewhere. The interpreter does not bounds-check, so the launchers are also called with
output buffers poisoned with NaN / sentinels and every element is checked to have been written.
With CUDA the same tests run on the GPU (benchmarks/gpu_check.sh runs this file).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from fastmae.kernels import masking as km
from fastmae.kernels import num_kept, random_masking_ref
from fastmae.kernels.masking import random_masking

import fastmae

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _poisoned_outputs(
    B: int, N: int, K: int, D: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_vis / mask filled with NaN and ids_restore with -7: any element the kernel skips shows."""
    return (
        torch.full((B, K, D), float("nan"), dtype=dtype, device=DEVICE),
        torch.full((B, N), float("nan"), dtype=dtype, device=DEVICE),
        torch.full((B, N), -7, dtype=torch.int64, device=DEVICE),
    )


def _assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    """Bitwise equality of (x_vis, mask, ids_restore), with the dtype."""
    for name, g, w in zip(("x_vis", "mask", "ids_restore"), got, want, strict=True):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.equal(g, w), f"{name} differs from the reference"


# ----------------------------------------------------------------------------- noise path


NOISE_CASES = [
    # B, N, D, ratio, x dtype, pos_embed (dtype, shape) or None, block_d
    pytest.param(2, 196, 40, 0.75, F32, None, None, id="N196-K49-fp32"),
    pytest.param(2, 256, 33, 0.75, BF16, (BF16, "1ND"), None, id="N256-K64-bf16-oddD-pos"),
    pytest.param(3, 50, 65, 0.6, F16, (F16, "ND"), None, id="N50-fp16-pos"),
    pytest.param(2, 64, 96, 0.5, BF16, (F32, "1ND"), None, id="bf16-x-fp32-pos-promotes"),
    pytest.param(4, 17, 1, 0.3, F32, None, None, id="D1-N17"),
    pytest.param(2, 37, 40, 0.75, BF16, (BF16, "ND"), 16, id="3-D-chunks-tail"),
]


@pytest.mark.parametrize("schedule", km.SCHEDULES)
@pytest.mark.parametrize("B,N,D,ratio,dtype,pos,block_d", NOISE_CASES)
def test_noise_path_equals_reference(
    B: int, N: int, D: int, ratio: float, dtype: torch.dtype, pos: tuple | None, block_d: int | None, schedule: str
) -> None:
    """Same noise -> bit-identical x_vis, mask and ids_restore; every output element written."""
    x = (torch.randn(B, N, D) * 3).to(dtype).to(DEVICE)
    noise = torch.rand(B, N, device=DEVICE)
    pos_embed = None
    if pos is not None:
        pos_dtype, shape = pos
        pos_embed = torch.randn(1, N, D).to(pos_dtype).to(DEVICE)
        if shape == "ND":
            pos_embed = pos_embed[0]
    want = random_masking_ref(x, ratio, noise=noise, pos_embed=pos_embed)
    _assert_same(random_masking(x, ratio, noise=noise, pos_embed=pos_embed, block_d=block_d, schedule=schedule), want)

    K = num_kept(N, ratio)
    out = _poisoned_outputs(B, N, K, D, want[0].dtype)
    pos2d = None if pos_embed is None else pos_embed.reshape(N, D)
    got = km.masking_fwd(x, K, pos_embed=pos2d, noise=noise, out=out, block_d=block_d, schedule=schedule)
    assert all(g is o for g, o in zip(got, out, strict=True)), "must write into the given buffers"
    _assert_same(got, want)


def test_noise_ties_signed_zero_inf_nan() -> None:
    """Ties keep index order (stable argsort), -0.0 == +0.0, -inf first, NaN last, as torch on CPU.

    (On CUDA, NaN noise is left out: how torch's CUDA sort places a NaN with its sign bit set is not
    documented, and NaN noise is no real use.)"""
    nan = float("nan") if DEVICE.type == "cpu" else 7.0
    row = [0.0, -0.0, 1, 1, nan, -1, float("inf"), -float("inf"), 0.5, nan]
    row += [-0.0, 0.0, 2, 2, 2, -5, 3, 3, 1, 0]
    noise = torch.tensor([row, [-v for v in row], [float(i % 3) for i in range(20)]], device=DEVICE)
    x = torch.randn(3, 20, 5, device=DEVICE)
    for ratio in (0.5, 0.25):
        _assert_same(random_masking(x, ratio, noise=noise), random_masking_ref(x, ratio, noise=noise))
    noise16 = noise.to(BF16)  # bf16 noise: many more ties
    _assert_same(random_masking(x, 0.5, noise=noise16), random_masking_ref(x, 0.5, noise=noise16))


def test_float64_noise_is_ranked_exactly() -> None:
    """float64 noise whose values collapse in float32 still gives the reference's permutation."""
    base = torch.rand(2, 24, dtype=torch.float64)
    noise = (base.round(decimals=1) + torch.rand(2, 24, dtype=torch.float64) * 1e-12).to(DEVICE)
    assert torch.unique(noise.float()).numel() < noise.numel()  # float32 would merge them
    x = torch.randn(2, 24, 3, device=DEVICE)
    _assert_same(random_masking(x, 0.5, noise=noise), random_masking_ref(x, 0.5, noise=noise))


def test_n1024_vit_h_448() -> None:
    """N=1024 (ViT-H at 448 px): sort padded to 1024, K=256, both paths."""
    x = torch.randn(1, 1024, 8, device=DEVICE)
    noise = torch.rand(1, 1024, device=DEVICE)
    _assert_same(random_masking(x, 0.75, noise=noise), random_masking_ref(x, 0.75, noise=noise))
    x_vis, mask, ids_restore = random_masking(x, 0.75, seed=3)
    assert torch.equal(torch.sort(ids_restore[0]).values, torch.arange(1024, device=DEVICE))
    assert int(mask.sum()) == 1024 - 256


def test_noncontiguous_inputs() -> None:
    """Transposed x (copied), row-strided x and the model's pos_embed[:, 1:, :] slice (used in place)."""
    B, N, D = 2, 30, 12
    noise = torch.rand(B, N, device=DEVICE)
    pos_full = torch.randn(1, N + 1, D, device=DEVICE)
    pos = pos_full[:, 1:, :]  # (1, N, D) view with an offset, like the model's
    x_t = torch.randn(B, D, N, device=DEVICE).transpose(1, 2)  # (B, N, D), unit stride along N
    x_s = torch.randn(B, N + 2, D + 5, device=DEVICE)[:, 1 : N + 1, 2 : D + 2]  # strided rows
    for x in (x_t, x_s):
        assert not x.is_contiguous()
        want = random_masking_ref(x, 0.6, noise=noise, pos_embed=pos)
        _assert_same(random_masking(x, 0.6, noise=noise, pos_embed=pos), want)


# ----------------------------------------------------------------------------- Philox path


def _check_valid_masking(x: torch.Tensor, K: int, out: tuple[torch.Tensor, ...]) -> None:
    """K distinct kept tokens, ids_restore a permutation that inverts ids_shuffle, x_vis the kept rows."""
    x_vis, mask, ids_restore = out
    B, N, D = x.shape
    assert ids_restore.dtype == torch.int64 and mask.dtype == x.dtype
    ar = torch.arange(N, device=x.device).expand(B, N)
    assert torch.equal(torch.sort(ids_restore, dim=1).values, ar), "ids_restore is not a permutation"
    ids_shuffle = torch.argsort(ids_restore, dim=1)  # (B, N)
    assert torch.equal(torch.gather(ids_restore, 1, ids_shuffle), ar)
    ids_keep = ids_shuffle[:, :K]  # (B, K), distinct since ids_shuffle is a permutation
    assert torch.equal(mask, (ids_restore >= K).to(x.dtype))
    assert torch.equal(mask.sum(1), torch.full((B,), N - K, dtype=x.dtype, device=x.device))
    assert torch.equal(x_vis, torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D)))


def test_philox_valid_masking_n196() -> None:
    """Realistic shape: K=49 distinct kept of 196, everything written (poisoned buffers), D tail;
    both schedules and any block_d give the same masks for the same seed."""
    B, N, D, K = 2, 196, 24, 49
    x = torch.randn(B, N, D, device=DEVICE)
    seed = torch.full((1,), 1234, dtype=torch.int64, device=DEVICE)
    outs = []
    # the seed as a device tensor (seed=None draws one so) or as a plain int kernel argument
    for schedule, block_d, s in (("fused", 16, seed), ("split", 8, seed), ("split", None, 1234), ("fused", None, 1234)):
        out = _poisoned_outputs(B, N, K, D, x.dtype)
        outs.append(km.masking_fwd(x, K, seed=s, out=out, block_d=block_d, schedule=schedule))
        _check_valid_masking(x, K, outs[-1])
    for other in outs[1:]:
        _assert_same(other, outs[0])


@pytest.mark.parametrize("schedule", km.SCHEDULES)
def test_empty_dims(schedule: str) -> None:
    """D=0 still writes mask and ids_restore; B=0 returns empty outputs."""
    x = torch.randn(2, 12, 0, device=DEVICE)
    noise = torch.rand(2, 12, device=DEVICE)
    _assert_same(random_masking(x, 0.5, noise=noise, schedule=schedule), random_masking_ref(x, 0.5, noise=noise))
    x_vis, mask, ids = random_masking(torch.randn(0, 12, 4, device=DEVICE), 0.5, seed=1, schedule=schedule)
    assert x_vis.shape == (0, 6, 4) and mask.shape == (0, 12) and ids.shape == (0, 12)


def test_philox_seeds() -> None:
    """Same seed -> same masks; other seeds differ; sample b depends on (seed, b) only; seed=None
    follows torch.manual_seed."""
    B, N, D = 6, 32, 3
    x = torch.randn(B, N, D, device=DEVICE, dtype=BF16)
    a = random_masking(x, 0.75, seed=7)
    _check_valid_masking(x, num_kept(N, 0.75), a)
    _assert_same(random_masking(x, 0.75, seed=7), a)
    c = random_masking(x, 0.75, seed=8)
    assert not torch.equal(a[2], c[2])
    assert all(not torch.equal(a[2][b], c[2][b]) for b in range(B))  # every sample changes
    assert not torch.equal(a[2][0], a[2][1])  # samples differ from each other
    head = random_masking(x[:3], 0.75, seed=7)  # a smaller batch: the same first samples
    _assert_same(head, tuple(t[:3] for t in a))
    big_seed = random_masking(x, 0.75, seed=2**62 + 12345)
    _check_valid_masking(x, num_kept(N, 0.75), big_seed)

    torch.manual_seed(42)
    d1 = random_masking(x, 0.75)
    d2 = random_masking(x, 0.75)
    torch.manual_seed(42)
    _assert_same(random_masking(x, 0.75), d1)
    assert not torch.equal(d1[2], d2[2])


def test_philox_known_answers() -> None:
    """The torch Philox4x32-10 that the reference masks with gives Random123's known-answer vectors."""
    from fastmae.kernels.masking_ref import philox4x32

    cases = [((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822,
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        got = philox4x32(key, *(torch.tensor([c]) for c in counter))
        assert tuple(int(g) for g in got) == want
        got_t = philox4x32(torch.tensor(key), *(torch.tensor([c]) for c in counter))  # the key as a tensor
        assert tuple(int(g) for g in got_t) == want


@pytest.mark.parametrize("schedule", km.SCHEDULES)
@pytest.mark.parametrize("B,N,D,dtype,pos", [(2, 196, 24, BF16, True), (3, 64, 5, F32, False), (4, 17, 3, F16, True)])
def test_seeded_kernel_equals_seeded_reference(schedule: str, B: int, N: int, D: int, dtype: torch.dtype,
                                               pos: bool) -> None:
    """With a seed (an int kernel argument or an int64 device tensor) the kernel's in-register Philox keys and
    the torch reference's give the same masks, order and values bit for bit: both backends mask identically."""
    x = torch.randn(B, N, D, device=DEVICE, dtype=dtype)
    pe = torch.randn(1, N, D, device=DEVICE, dtype=dtype) if pos else None
    for seed in (7, 2**62 + 12345, torch.tensor(1234, device=DEVICE)):
        want = random_masking_ref(x, 0.75, seed=seed, pos_embed=pe)
        got = random_masking(x, 0.75, seed=seed, pos_embed=pe, schedule=schedule)
        _assert_same(got, want)
    with pytest.raises(ValueError, match="one int64 element"):
        random_masking(x, 0.75, seed=torch.tensor(3.0, device=DEVICE))


def test_philox_keep_frequency_uniform() -> None:
    """Chi-square: over 128 samples (fixed seed) every position is kept with frequency K/N."""
    B, N, ratio = 128, 16, 0.75
    K = num_kept(N, ratio)
    x = torch.zeros(B, N, 1, device=DEVICE)
    _, mask, ids_restore = random_masking(x, ratio, seed=20240601)
    counts = (1 - mask).sum(0).double().cpu()  # (N,) kept per position
    assert int(counts.sum()) == B * K
    expected = B * K / N
    stat = float(((counts - expected) ** 2 / expected).sum())
    try:
        from scipy.stats import chi2

        threshold = float(chi2.ppf(0.999, N - 1))
    except ImportError:  # chi-square 0.999 quantile, 15 degrees of freedom
        threshold = 37.697
    assert stat < threshold, f"keep counts {counts.tolist()} not uniform: chi2={stat:.1f} >= {threshold:.1f}"
    # the order inside x_vis is random too: its first row is not biased to low token indices
    ids_first = torch.argsort(ids_restore, dim=1)[:, 0].double()
    assert abs(float(ids_first.mean()) - (N - 1) / 2) < 1.5


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize(
    "x_dtype,pos_dtype",
    [(F32, F32), (BF16, F32), (BF16, BF16), (F16, F16)],
    ids=["fp32", "bf16-x-fp32-pos", "bf16", "fp16"],
)
def test_backward_matches_reference(x_dtype: torch.dtype, pos_dtype: torch.dtype) -> None:
    """grad x and grad of a trainable pos_embed equal the reference's autograd."""
    B, N, D, ratio = 3, 20, 37, 0.5
    x = torch.randn(B, N, D, device=DEVICE).to(x_dtype).requires_grad_()
    pos = torch.randn(1, N, D, device=DEVICE).to(pos_dtype).requires_grad_()
    noise = torch.rand(B, N, device=DEVICE)
    w = torch.randn(B, num_kept(N, ratio), D, device=DEVICE)

    got = random_masking(x, ratio, noise=noise, pos_embed=pos)
    (got[0].float() * w).sum().backward()
    gx, gp = x.grad, pos.grad
    x.grad = pos.grad = None
    want = random_masking_ref(x, ratio, noise=noise, pos_embed=pos)
    (want[0].float() * w).sum().backward()
    assert gx.dtype == x_dtype and gp.dtype == pos_dtype and gp.shape == pos.shape
    assert torch.equal(gx, x.grad)  # a pure scatter: exact
    torch.testing.assert_close(gp, pos.grad, rtol=1e-2 if pos_dtype != F32 else 1e-6, atol=1e-5)


def test_backward_without_pos_and_only_pos() -> None:
    """x-only gradient (MAE's case: frozen pos_embed) and pos-only gradient."""
    B, N, D = 2, 40, 9
    x = torch.randn(B, N, D, device=DEVICE, requires_grad=True)
    pos = torch.randn(N, D, device=DEVICE)
    x_vis, _, ids_restore = random_masking(x, 0.75, seed=11, pos_embed=pos)
    g = torch.randn_like(x_vis)
    x_vis.backward(g)
    K = x_vis.shape[1]
    kept = ids_restore < K  # (B, N)
    want = torch.zeros_like(x)
    want[kept] = torch.gather(g, 1, ids_restore.clamp(max=K - 1).unsqueeze(-1).expand(-1, -1, D))[kept]
    assert torch.equal(x.grad, want)

    x2 = torch.randn(B, N, D, device=DEVICE)
    pos2 = torch.randn(1, N, D, device=DEVICE, requires_grad=True)
    x_vis2, _, _ = random_masking(x2, 0.75, seed=11, pos_embed=pos2)
    x_vis2.backward(g)
    torch.testing.assert_close(pos2.grad[0], want.sum(0))


def test_backward_launchers_write_every_element() -> None:
    """grad_x (zeros at masked rows included) and grad_pos fully written into poisoned buffers."""
    B, N, D, K = 3, 23, 19, 7
    noise = torch.rand(B, N, device=DEVICE)
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    g = torch.randn(B, K, D, device=DEVICE)
    gx = km.masking_bwd(g, ids_restore, D, F32, out=torch.full((B, N, D), float("nan"), device=DEVICE))
    gp = km.pos_embed_grad(g, ids_restore, D, F32, out=torch.full((N, D), float("nan"), device=DEVICE))
    want = torch.zeros(B, N, D, device=DEVICE)
    kept = ids_restore < K
    want[kept] = torch.gather(g, 1, ids_restore.clamp(max=K - 1).unsqueeze(-1).expand(-1, -1, D))[kept]
    assert torch.equal(gx, want)
    torch.testing.assert_close(gp, want.sum(0))
    for splits in (2, 3):  # batch split into partial sums (the GPU default), last split partly empty
        torch.testing.assert_close(km.pos_embed_grad(g, ids_restore, D, F32, splits=splits), want.sum(0))


# ----------------------------------------------------------------------------- errors


def test_errors() -> None:
    """Clear errors for bad shapes, ratios and devices."""
    x = torch.randn(2, 16, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        random_masking(x[0], 0.5)
    with pytest.raises(ValueError, match="keeps 0 of 16"):
        random_masking(x, 0.99)
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(x, 0.5, noise=torch.rand(2, 15, device=DEVICE))
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        random_masking(x, 0.5, pos_embed=torch.rand(16, 5, device=DEVICE))
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        random_masking(x.double(), 0.5)
    with pytest.raises(ValueError, match="power of two"):
        random_masking(x, 0.5, block_d=24)
    with pytest.raises(ValueError, match="unknown masking kernel schedule"):
        random_masking(x, 0.5, schedule="magic")
    with pytest.raises(ValueError, match="at most"):
        random_masking(torch.empty(1, km.MAX_TOKENS + 1, 1, device=DEVICE), 0.5)


def test_plain_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors without TRITON_INTERPRET: a clear error, not a crash."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        random_masking(torch.randn(2, 16, 4), 0.5)


# ----------------------------------------------------------------------------- model


def _debug_pair(order: str = "gather_first") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The debug preset with triton and torch masking, same weights."""
    torch.manual_seed(0)
    m_tri = fastmae.create_model("debug", masking="triton", patch_embed_order=order).to(DEVICE)
    m_ref = fastmae.create_model("debug", masking="torch", patch_embed_order=order).to(DEVICE)
    m_ref.load_state_dict(m_tri.state_dict())
    return m_tri, m_ref


@pytest.mark.parametrize("order", ["gather_first", "embed_first"])
def test_model_same_loss_as_torch_backend(order: str) -> None:
    """Same noise -> identical loss, mask and gradients with masking=triton and masking=torch (the kernel
    gathers pixel patches with gather_first, tokens + positions with embed_first)."""
    m_tri, m_ref = _debug_pair(order)
    imgs = torch.randn(3, 3, 64, 64, device=DEVICE)
    noise = torch.rand(3, m_tri.patch_embed.num_patches, device=DEVICE)
    loss_t, pred_t, mask_t = m_tri(imgs, noise=noise)
    loss_r, pred_r, mask_r = m_ref(imgs, noise=noise)
    assert torch.equal(mask_t, mask_r)
    assert torch.equal(pred_t, pred_r)
    assert torch.equal(loss_t, loss_r)
    loss_t.backward()
    loss_r.backward()
    grads_r = dict(m_ref.named_parameters())
    for name, p in m_tri.named_parameters():
        if p.grad is not None or grads_r[name].grad is not None:
            # exact on CPU; cuDNN/cuBLAS backward may reorder sums between the two instances on GPU
            torch.testing.assert_close(p.grad, grads_r[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_model_trains_with_triton_masking() -> None:
    """A few AdamW steps on a fixed batch with in-kernel (seeded) masks: loss finite and decreasing."""
    m_tri, _ = _debug_pair()
    imgs = torch.randn(4, 3, 64, 64, device=DEVICE)
    opt = torch.optim.AdamW(m_tri.parameters(), lr=2e-3)
    losses = []
    for step in range(6):
        loss, _, mask = m_tri(imgs, mask_seed=1000 + step)
        assert int(mask.sum()) == 4 * (m_tri.patch_embed.num_patches - num_kept(64, m_tri.mask_ratio))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    again = m_tri(imgs, mask_seed=1005)[2]
    assert torch.equal(again, mask)  # the mask is a function of the seed


@pytest.mark.parametrize("pattern", ["block", "grid"])
def test_mask_patterns_through_the_kernel(pattern: str) -> None:
    """block / grid keys go through the kernel's noise path: the reference's outputs bit for bit (fp32 keys),
    and the debug model with masking=triton masks, predicts and scores as with masking=torch."""
    from fastmae.kernels.mask_patterns import pattern_keys

    N, K = 196, 49
    keys = pattern_keys(pattern, 2, N, K, seed=21, device=DEVICE)
    x = torch.randn(2, N, 24, device=DEVICE)
    pos = torch.randn(N, 24, device=DEVICE)
    _assert_same(random_masking(x, 0.75, noise=keys, pos_embed=pos), random_masking_ref(x, 0.75, noise=keys,
                                                                                         pos_embed=pos))
    m_tri, m_ref = _debug_pair()
    m_tri.mask_strategy = m_ref.mask_strategy = pattern
    imgs = torch.randn(2, 3, 64, 64, device=DEVICE)
    seed = torch.tensor([5], device=DEVICE)
    got, want = m_tri(imgs, mask_seed=seed), m_ref(imgs, mask_seed=seed)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# ----------------------------------------------------------------------------- benchmark script


def _load_benchmark() -> ModuleType:
    """benchmarks/masking_kernel.py as a module (under another name: ``kernels`` is a PyPI package's)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "masking_kernel.py"
    spec = importlib.util.spec_from_file_location("fastmae_benchmark_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit path")
def test_benchmark_needs_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    """Without CUDA the benchmark says so and exits with code 2."""
    assert _load_benchmark().main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine gpu_check.sh runs the real benchmark")
def test_benchmark_cpu_smoke(tmp_path: Path) -> None:
    """The benchmark script end to end on CPU (interpreter, tiny shape): correct, table, JSON."""
    import json

    bench = _load_benchmark()
    assert bench.main(["--cpu-smoke", "--shapes", "vit_l", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["correctness_errors"] == []
    variants = {(r["variant"], r["pass"]) for r in result["rows"]}
    assert {(v, p) for v in ("fused", "reference") for p in ("fwd", "fwd+bwd")} <= variants


# ----------------------------------------------------------------------------- GPU compile without a GPU

_AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # real @triton.jit functions, compiled for the GPU target
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastmae.kernels import masking as km

target = GPUTarget("cuda", 90, 32)  # H100


def compile_(fn, sig, constexprs, num_warps):
    for k in constexprs:
        sig[k] = "constexpr"
    aligned = {i for i, (k, v) in enumerate(sig.items()) if v.startswith("*") or k.startswith(("stride", "D"))}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options={"num_warps": num_warps})
    assert kernel.asm["cubin"], fn.__name__


i32 = "i32"
fwd = dict(x_ptr="*bf16", pos_ptr="*bf16", noise_ptr="*fp32", seed_ptr="*i64", seed="i64", out_ptr="*bf16",
           mask_ptr="*bf16", ids_restore_ptr="*i64", N=i32, K=i32, D=i32, stride_xb=i32, stride_xn=i32, stride_pn=i32,
           stride_noise_b=i32, stride_ob=i32, stride_ok=i32)
for use_noise, from_ptr in ((False, False), (False, True), (True, False)):
    compile_(km._masking_fwd_kernel, dict(fwd), dict(NP=256, LOG2_NP=8, BLOCK_K=64, BLOCK_D=256, HAS_POS=True,
             USE_NOISE=use_noise, SEED_FROM_PTR=from_ptr, BF16_RNE=False), 8)
compile_(km._masking_sort_kernel, dict(noise_ptr="*fp32", seed_ptr="*i64", seed="i32", mask_ptr="*bf16",
         ids_restore_ptr="*i64", ids_keep_ptr="*i32", N=i32, K=i32, stride_noise_b=i32),
         dict(NP=256, LOG2_NP=8, USE_NOISE=False, SEED_FROM_PTR=False), 4)
compile_(km._gather_rows_kernel, dict(x_ptr="*bf16", pos_ptr="*fp32", ids_keep_ptr="*i32", out_ptr="*fp32", K=i32,
         D=i32, stride_xb=i32, stride_xn=i32, stride_pn=i32, stride_ob=i32, stride_ok=i32),
         dict(BLOCK_K=64, BLOCK_D=128, HAS_POS=True, BF16_RNE=False), 4)
bwd = dict(gvis_ptr="*fp32", ids_restore_ptr="*i64", gx_ptr="*bf16", N=i32, K=i32, D=i32, stride_gb=i32, stride_gk=i32)
compile_(km._masking_bwd_kernel, dict(bwd), dict(BLOCK_N=64, BLOCK_D=128, BF16_RNE=False), 4)
pos = dict(gvis_ptr="*bf16", ids_restore_ptr="*i64", partial_ptr="*fp32", B=i32, N=i32, K=i32, D=i32, stride_gb=i32,
           stride_gk=i32, B_PER_SPLIT=i32)
compile_(km._pos_grad_kernel, pos, dict(BLOCK_N=32, BLOCK_D=128), 4)
print("compiled for sm_90")
"""


def test_kernels_compile_for_h100() -> None:
    """Every kernel compiles to an sm_90 cubin (Triton's bundled ptxas, no GPU needed).

    The interpreter skips the compiler, so this is what catches what only the compiler rejects
    (non-constexpr globals, layout or type errors) before a GPU machine sees the code."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's bundled ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled for sm_90" in proc.stdout
