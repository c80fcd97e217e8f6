"""fastmae's precision policy, one definition for the training programs and the benchmarks: ``bf16`` (the
default) autocasts the forward pass over fp32 weights, with fp32 gradients on DeepSpeed's fp32 engine;
``fp32`` is plain fp32; ``fp16`` keeps DeepSpeed's fp16 mode. See docs/training.md (precision).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from .config import PRECISIONS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """The policy of one ``train.precision`` value."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"unknown precision {self.name!r}; valid: {', '.join(PRECISIONS)}")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of matrix products and activations."""
        return _DTYPES[self.name]

    @property
    def autocasts(self) -> bool:
        """Whether the forward pass runs under ``torch.autocast`` over fp32 weights."""
        return self.name == "bf16"

    @property
    def deepspeed(self) -> dict[str, bool]:
        """DeepSpeed's mode switches: ``bf16``/``fp16`` sections' ``enabled``."""
        return {"bf16": False, "fp16": self.name == "fp16"}

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's context: bf16 autocast for ``bf16``, nothing otherwise."""
        if not self.autocasts:
            return contextlib.nullcontext()
        kind = device.type if isinstance(device, torch.device) else torch.device(device).type
        return torch.autocast(device_type=kind, dtype=torch.bfloat16)

    def describe(self) -> str:
        if self.name == "bf16":
            return "bf16 autocast over fp32 weights; gradients accumulated and reduced in fp32"
        if self.name == "fp16":
            return "DeepSpeed fp16 (fp16 weights, fp32 master weights, dynamic loss scaling)"
        return "fp32"
