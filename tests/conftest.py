"""Test set-up shared by every test module.

Without CUDA, Triton kernels run under the Triton interpreter on CPU tensors; TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; its CPU twin runs instead")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
