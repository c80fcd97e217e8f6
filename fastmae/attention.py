"""Multi-head self-attention with one backend switch, ``model.attention``: ``flash`` (the flash_attn package),
``sdpa`` (torch's ``scaled_dot_product_attention``), ``math`` (the explicit-softmax reference) or ``auto``.
The parameter names are those of timm's ``Attention``, so official checkpoints load whichever backend runs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .config import ATTENTION_BACKENDS


@functools.cache
def flash_attn_available() -> bool:
    """True when the flash_attn package imports with its CUDA extension."""
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_qkvpacked_func  # noqa: F401
    except Exception:
        return False
    return True


BACKENDS = ATTENTION_BACKENDS  # model.attention's choices


def _flash_function():
    """flash_attn's packed-QKV function, or None when the package does not import."""
    if not flash_attn_available():
        return None
    from flash_attn import flash_attn_qkvpacked_func

    return flash_attn_qkvpacked_func


def resolve_attention_backend(backend: str, device: torch.device | str, dtype: torch.dtype,
                              flash_available: bool | None = None) -> str:
    """The backend that actually runs for ``backend`` on ``device`` with activations of ``dtype``
    (``flash_available``: whether flash_attn imports; looked up when None)."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if flash_available is None:
        flash_available = flash_attn_available()
    flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_available
    if backend == "auto":
        return "flash" if flash_ok else "sdpa"
    if backend == "flash" and not flash_ok:
        raise RuntimeError(
            "attention backend 'flash' needs the flash_attn package, a CUDA device and bf16/fp16 "
            f"activations (device={device.type}, dtype={dtype}, flash_attn importable={flash_available}); "
            "use model.attention=sdpa (torch's built-in FlashAttention-2 on CUDA) or auto"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: auto, flash, sdpa, math")
    return backend


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention on (B, H, T, hd) tensors: explicit softmax in the input dtype."""
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, T)
    attn = attn.softmax(dim=-1)
    return attn @ v  # (B, H, T, hd)


class Attention(nn.Module):
    """timm-compatible multi-head self-attention (qkv with bias, output projection)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        # the flash_attn package is looked up here, once, never inside forward: forward is traced by
        # torch.compile, and an import (or a cached lookup) there would break the graph in every block
        self._flash = _flash_function()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hd)
        # device and dtype are static to torch.compile (guards), so this choice is made at trace time
        backend = resolve_attention_backend(self.backend, x.device, qkv.dtype, self._flash is not None)
        if backend == "flash":
            out = self._flash(qkv).reshape(B, T, C)  # (B, T, H, hd) -> (B, T, C)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
            if backend == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                out = attention_math(q, k, v)
            out = out.transpose(1, 2).reshape(B, T, C)
        return self.proj(out)
