"""Test set-up shared by every test module (tests/unit, tests/integration) and the fixtures several use.

The helper modules in tests/helpers are importable by name (``from dsutil import ...``): their folder goes on
sys.path here, before any test module is imported. Without CUDA, Triton kernels run under the Triton interpreter
on CPU tensors; TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection
time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# The interpreter's own bin folder first on PATH, as in an activated environment: subprocesses then find its
# deepspeed/torchrun, and DeepSpeed's comm op is always built by the same ninja (a second ninja version on PATH
# reads the other's build log as stale and rebuilds the op, ~1 minute each time).
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
# two threads for the in-process tests; one each when the suite runs on parallel workers (pytest -n)
os.environ.setdefault("OMP_NUM_THREADS", "1" if "PYTEST_XDIST_WORKER" in os.environ else "2")

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if TYPE_CHECKING:
    from nodes import Cluster

    from fastmae.model import MaskedAutoencoderViT

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


@pytest.fixture(scope="module")
def ids_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """23 gradient images of assorted sizes in 3 shards, labelled with the unique ``IDS``."""
    from fastmae.data.shards import write_shards
    from loaderutil import IDS
    from loaderutil import gradient as _gradient
    from PIL import Image

    root = tmp_path_factory.mktemp("ids")
    sizes = [(200, 150), (150, 200), (256, 256), (320, 180), (120, 160)]
    lines = []
    for i, lab in enumerate(IDS):
        p = root / "src" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(_gradient(*sizes[i % len(sizes)])).save(p)
        lines.append(f"{p} {lab}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    write_shards(root / "list.txt", root / "shards", samples_per_shard=8, quality=95, workers=1,
                 shuffle=False, progress=False)
    return root / "shards"


@pytest.fixture()
def mae() -> MaskedAutoencoderViT:
    """The small official-like MAE of the checkpoint interop tests, in eval mode."""
    from modelutil import OFFICIAL_LIKE

    from fastmae.model import MaskedAutoencoderViT

    torch.manual_seed(0)
    return MaskedAutoencoderViT(OFFICIAL_LIKE).eval()


# ----------------------------------------------------------------------------- several hosts (marker multinode)
# Both multinode modules share one worker (xdist group "nodes"), hence one cluster and one reference run.


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two hosts as network namespaces with sshd (tests/helpers/nodes.py), removed when the session ends."""
    import nodes

    reason = nodes.missing()
    if reason:
        pytest.skip(f"the multi-node tests make hosts as network namespaces: {reason}")
    with nodes.cluster(2, tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="session")
def hosts_env() -> dict[str, str]:
    """The DeepSpeed environment of the jobs across hosts, without the launcher variables of the surrounding shell."""
    from dsutil import deepspeed_env
    from jobs import without_launcher_vars

    return without_launcher_vars(deepspeed_env())


@pytest.fixture(scope="session")
def one_host(hosts_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The losses of the run every launch across hosts makes (``jobs.HOSTS_ARGS``), from the same 2 ranks on this
    host (torchrun, the machine's own network): step -> loss."""
    from dsutil import once_per_run
    from jobs import HOSTS_ARGS, HOSTS_STEPS, RUNNER, launch, losses, run

    out = once_per_run(tmp_path_factory, "two_ranks_one_host", lambda out: run(
        launch(2, RUNNER, [*HOSTS_ARGS, f"train.output_dir={out}"]), hosts_env))
    got = losses(out)
    assert sorted(got) == list(range(1, HOSTS_STEPS + 1))
    return got
