"""The loaders with worker processes: torch DataLoader workers, and DALI's feed in spawned worker processes (the
GPU default), which give the batches of the in-process feed; DALI's mixed (nvJPEG) decoding on a GPU. The loaders
in the test process: tests/unit/test_data_loaders.py."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
import torch
from fastmae.data import ShardError, build_loader
from loaderutil import DALI_ONLY
from loaderutil import damaged_shard as _damaged_shard
from loaderutil import labelled_tar as _labelled_tar
from loaderutil import loader_cfg as _cfg
from loaderutil import read_epoch as _epoch


def test_torch_loader_with_workers(ids_shards: Path) -> None:
    gc.collect()  # no DALI pipeline (native threads) may be alive when workers fork: this test runs first
    ref = _epoch(build_loader(_cfg("torch", ids_shards, workers=0), img_size=16, seed=2))
    loader = build_loader(_cfg("torch", ids_shards, workers=2), img_size=16, seed=2)
    for _ in range(2):  # persistent workers across epochs
        loader.set_epoch(0)
        got = _epoch(loader)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, got, strict=True))


# ----------------------------------------------------------------------------- DALI feed in worker processes


@DALI_ONLY
@pytest.mark.parametrize("read", ["global", "stream"])
def test_dali_feed_worker_processes_give_the_same_batches(read: str, ids_shards: Path) -> None:
    """data.feed_workers > 0 (the default on a GPU): DALI's parallel external source runs the feed in spawned
    worker processes; the batches are bit-identical to the threaded feed's, across epochs and a resume."""
    cfg = _cfg("dali", ids_shards, batch=3, read=read, shuffle_buffer=5)
    thread = build_loader(dataclasses.replace(cfg, feed_workers=0), img_size=16, rank=1, world_size=2, seed=7)
    ref = _epoch(thread) + _epoch(thread)
    procs = build_loader(dataclasses.replace(cfg, feed_workers=2), img_size=16, rank=1, world_size=2, seed=7)
    assert procs.feed_workers == 2 and thread.feed_workers == 0
    got = [next(iter(procs))]  # one batch, then the state of a run interrupted there
    state = procs.state_dict()
    got += _epoch(procs) + _epoch(procs)
    resumed = build_loader(dataclasses.replace(cfg, feed_workers=2), img_size=16, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    assert len(got) == len(ref) and len(rest) == len(ref) // 2 - 1
    for (xa, ya), (xb, yb) in zip(got + rest, ref + ref[1:len(ref) // 2], strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    for ld in (thread, procs, resumed):
        ld.close()


@DALI_ONLY
def test_dali_feed_worker_processes_name_bad_samples_and_skip_them(tmp_path: Path) -> None:
    """A worker's ShardError reaches the training process as a ShardError naming shard and key; with
    data.on_error=skip the replaced samples are counted as with the threaded feed."""
    good, garbage = _damaged_shard(tmp_path)
    shard = tmp_path / "000000.tar"
    (tmp_path / "header").mkdir()
    _labelled_tar(tmp_path / "header" / "000000.tar", [("a", good), ("b", good), ("c", good), ("garbage", garbage)])
    stop = build_loader(_cfg("dali", tmp_path / "header", batch=2, drop_last=False, feed_workers=2), img_size=16,
                        mode="eval")
    with pytest.raises(ShardError, match=r"header/000000.tar: garbage: image header unreadable"):
        list(stop)
    stop.close()
    cfg = _cfg("dali", tmp_path, batch=2, drop_last=False, on_error="skip", max_bad_samples=2, feed_workers=2)
    loader = build_loader(cfg, img_size=16, mode="eval")
    for _ in range(2):
        assert [v for _, y in loader for v in y.tolist()] == [0, 1, 3, 3, 5, 5]
        assert sorted(loader.bad_samples) == [f"{shard}:broken", f"{shard}:garbage"]
    loader.close()


@DALI_ONLY
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for DALI's mixed (nvJPEG) decoder; "
                                                          "test_dali_and_torch_agree_on_the_bundled_sample is the "
                                                          "CPU twin")
@pytest.mark.parametrize("feed_workers", [0, 2])
def test_dali_mixed_decoding_matches_the_cpu_twin(ids_shards: Path, feed_workers: int) -> None:
    cfg = _cfg("dali", ids_shards, batch=4, dtype="bfloat16", feed_workers=feed_workers)
    gpu = build_loader(cfg, img_size=32, device="cuda", seed=1)
    cpu = build_loader(cfg, img_size=32, device="cpu", seed=1)
    for (xg, yg), (xc, yc) in zip(gpu, cpu, strict=True):
        assert xg.device.type == "cuda" and xg.dtype == torch.bfloat16 and xc.dtype == torch.float32
        assert torch.equal(yg.cpu(), yc)
        assert (xg.float().cpu() - xc).abs().mean() < 0.05  # nvJPEG vs libjpeg-turbo IDCT, bf16 rounding
    gpu.close()
