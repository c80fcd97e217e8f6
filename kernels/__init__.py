"""fastmae.kernels: hot operations, each with a plain-torch reference of the same signature.

``random_masking_ref`` is the reference; the fused Triton ``random_masking`` lives in
:mod:`fastmae.kernels.masking` and is imported lazily so that importing this package never needs
triton.
"""

from __future__ import annotations

from .masking_ref import num_kept, random_masking_ref

__all__ = ["num_kept", "random_masking_ref", "random_masking", "triton_available"]


def triton_available() -> bool:
    """True when triton imports (the kernel itself also needs CUDA or ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def __getattr__(name: str):
    if name == "random_masking":
        from .masking import random_masking

        return random_masking
    raise AttributeError(f"module 'fastmae.kernels' has no attribute {name!r}")
