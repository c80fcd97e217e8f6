"""Test set-up shared by every test module.

Without CUDA, Triton kernels run under the Triton interpreter on CPU tensors; TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The interpreter's own bin folder first on PATH, as in an activated environment: subprocesses then find its
# deepspeed/torchrun, and DeepSpeed's comm op is always built by the same ninja (a second ninja version on PATH
# reads the other's build log as stale and rebuilds the op, ~1 minute each time).
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
# two threads for the in-process tests; one each when the suite runs on parallel workers (pytest -n)
os.environ.setdefault("OMP_NUM_THREADS", "1" if "PYTEST_XDIST_WORKER" in os.environ else "2")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; its CPU twin runs instead")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def id_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 real photos (the bundled sample's) in 3 shards, each image its own class: a label names a sample."""
    from fastmae.data import ShardIndex, bundled_sample_dir, expand_shards
    from fastmae.data.shards import write_shards

    root = tmp_path_factory.mktemp("id_shards")
    index = ShardIndex(expand_shards(bundled_sample_dir()))
    lines = []
    for i in range(48):
        p = root / "src" / f"img{i:02d}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(index.read_image(i))
        lines.append(f"{p} {i}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    write_shards(root / "list.txt", root / "shards", samples_per_shard=16, workers=1, shuffle=False, progress=False)
    return root / "shards"
