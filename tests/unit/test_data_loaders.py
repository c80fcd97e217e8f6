"""The DALI (CPU twin) and torch loaders in the test process: shapes, labels, normalisation, crops and flips,
exact epochs with 1 and 2 ranks, resume, determinism, agreement between the two backends, bad samples, and
RandAugment (fine-tuning). Loaders with worker processes: tests/integration/test_data_loader_workers.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from fastmae.data import (
    PAD_LABEL,
    ShardError,
    SyntheticLoader,
    build_loader,
    bundled_sample_dir,
    dali_available,
)
from fastmae.data.loader import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.randaug import parse_policy, timm_available
from loaderutil import DALI_ONLY, IDS, NO_DALI
from loaderutil import damaged_shard as _damaged_shard
from loaderutil import gradient as _gradient
from loaderutil import loader_cfg as _cfg
from loaderutil import read_epoch as _epoch
from PIL import Image

BACKENDS = [
    "torch",
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason=NO_DALI)),
]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_dtypes_labels(backend: str, ids_shards: Path) -> None:
    loader = build_loader(_cfg(backend, ids_shards, batch=5, drop_last=False), img_size=32)
    assert loader.backend == backend and loader.num_samples == 23 and len(loader) == 5
    batches = _epoch(loader)
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    for x, y in batches:
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.dtype == torch.int64 and y.shape == (len(x),)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(IDS)
    assert loader.epoch == 1 and loader.batch_in_epoch == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalisation_crops_and_flips(backend: str, ids_shards: Path) -> None:
    loader = build_loader(_cfg(backend, ids_shards, batch=8), img_size=32, seed=1)
    areas, flips = [], []
    for _ in range(4):
        for x, _y in loader:
            pix = x * STD + MEAN  # back to [0, 1]
            assert float(pix.min()) > -0.03 and float(pix.max()) < 1.03
            assert torch.allclose(pix[:, 2], torch.full_like(pix[:, 2], 128 / 255), atol=0.03)  # flat channel
            r, g = pix[:, 0], pix[:, 1]
            # R spans the crop's x-range, G its y-range (as fractions of the image)
            areas += ((r.amax((1, 2)) - r.amin((1, 2))) * (g.amax((1, 2)) - g.amin((1, 2)))).tolist()
            flips += (r[:, :, 0].mean(1) > r[:, :, -1].mean(1)).tolist()
    a = np.array(areas)
    assert a.min() > 0.12 and a.max() < 1.02
    assert a.min() < 0.35 and a.max() > 0.75, "crops should span the 0.2-1.0 area range"
    assert 0.25 < np.mean(flips) < 0.75, "about half the crops flipped"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_centre_crop_no_flip(backend: str, ids_shards: Path) -> None:
    loader = build_loader(_cfg(backend, ids_shards, batch=6), img_size=32, mode="eval")
    first = _epoch(loader)
    assert torch.cat([y for _, y in first]).tolist() == IDS  # sequential, unshuffled
    for x, _ in first:
        r = (x * STD + MEAN)[:, 0]
        assert bool((r[:, :, 0].mean(1) < r[:, :, -1].mean(1)).all()), "no flips in eval"
    again = _epoch(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_drops_the_last_incomplete_batch(backend: str, ids_shards: Path) -> None:
    """23 samples, 2 ranks x 4: 2 full steps a rank per epoch, 7 samples not read, others each epoch; every
    batch full and no sample twice. The same data in eval mode is read whole."""
    loaders = [build_loader(_cfg(backend, ids_shards, batch=4), img_size=16, rank=r, world_size=2, seed=5)
               for r in range(2)]
    assert [len(ld) for ld in loaders] == [2, 2]
    dropped = []
    for _ in range(3):
        labels = []
        for ld in loaders:
            got = [y for _, y in ld]
            assert [len(y) for y in got] == [4, 4]
            labels += torch.cat(got).tolist()
        assert len(set(labels)) == 16 and set(labels) <= set(IDS)
        dropped.append(frozenset(IDS) - set(labels))
    assert len(set(dropped)) == 3, "each epoch leaves out other samples"
    for _ in loaders[0]:  # a state taken after the last full batch: the epoch is done, dropped samples too
        state = loaders[0].state_dict()
    assert state["samples_in_epoch"] == 23
    other = build_loader(_cfg(backend, ids_shards, batch=1), img_size=16, seed=5)
    other.load_state_dict(state)  # a smaller global batch does not pick up the dropped samples
    assert (other.epoch, other.start_sample, other.batch_in_epoch) == (state["epoch"] + 1, 0, 0)
    ev = build_loader(_cfg(backend, ids_shards, batch=4), img_size=16, mode="eval")
    assert sorted(torch.cat([y for _, y in ev]).tolist()) == sorted(IDS)
    # a dataset smaller than one global batch is read whole (one short batch per rank), not refused
    tiny = [build_loader(_cfg(backend, ids_shards, batch=12), img_size=16, rank=r, world_size=2) for r in range(2)]
    assert [len(ld) for ld in tiny] == [1, 1] and not tiny[0].drop_last
    assert sorted(v for ld in tiny for _, y in ld for v in y.tolist()) == sorted(IDS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("read", ["global", "stream"])
@pytest.mark.parametrize("world,batch", [(1, 4), (2, 4), (2, 8)])
def test_exact_epochs_across_ranks(backend: str, read: str, ids_shards: Path, world: int, batch: int) -> None:
    cfg = _cfg(backend, ids_shards, batch=batch, drop_last=False, read=read, shuffle_buffer=5)
    loaders = [build_loader(cfg, img_size=16, rank=r, world_size=world, seed=5) for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1
    orders = []
    for epoch in range(2):
        labels = []
        for ld in loaders:
            ld.set_epoch(epoch)
            got = [y for _, y in ld]
            assert len(got) == len(ld)
            labels.append(torch.cat(got).tolist())
        flat = [v for part in labels for v in part if v != PAD_LABEL]
        assert sorted(flat) == sorted(IDS), f"epoch {epoch}: every sample exactly once across ranks"
        if world == 2:
            assert not set(labels[0]) & set(labels[1]) - {PAD_LABEL}
        orders.append(flat)
    assert orders[0] != orders[1], "epochs are reshuffled"


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_when_a_rank_runs_out(backend: str, ids_shards: Path) -> None:
    # 23 samples, 2 ranks x 11: two full steps (44 > 23) ... last step holds 1 sample: rank 1 gets a pad
    loaders = [build_loader(_cfg(backend, ids_shards, batch=11, drop_last=False), img_size=16, rank=r,
                            world_size=2)
               for r in range(2)]
    out = [torch.cat([y for _, y in ld]).tolist() for ld in loaders]
    assert len(out[0]) == 12 and len(out[1]) == 12 and out[1].count(PAD_LABEL) == 1
    assert sorted(v for part in out for v in part if v != PAD_LABEL) == sorted(IDS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("read", ["global", "stream"])
def test_resume_continues_with_the_remaining_samples(backend: str, read: str, ids_shards: Path) -> None:
    cfg = _cfg(backend, ids_shards, batch=3, read=read, shuffle_buffer=5)
    full = build_loader(cfg, img_size=16, rank=1, world_size=2, seed=7)
    full.set_epoch(3)
    ref = _epoch(full) + _epoch(full)  # epoch 3 and 4
    part = build_loader(cfg, img_size=16, rank=1, world_size=2, seed=7)
    part.set_epoch(3)
    seen = []
    for x, y in part:
        seen.append((x.clone(), y.clone()))
        if len(seen) == 2:
            break
    state = part.state_dict()
    assert state["epoch"] == 3 and state["batch_in_epoch"] == 2
    resumed = build_loader(cfg, img_size=16, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    rest = _epoch(resumed) + _epoch(resumed)
    both = seen + rest
    assert len(both) == len(ref)
    for (xa, ya), (xb, yb) in zip(both, ref, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    part_rest = _epoch(part)  # the interrupted loader itself also continues where it stopped
    assert [y.tolist() for _, y in part_rest] == [y.tolist() for _, y in ref[2:len(part)]]
    with pytest.raises(ValueError, match="seed"):
        build_loader(cfg, img_size=16, seed=8).load_state_dict(state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("read", ["global", "stream"])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("new_world,new_batch", [(1, 5), (3, 2)])
def test_resume_on_another_layout_sees_every_sample_once(backend: str, read: str, ids_shards: Path, new_world: int,
                                                         new_batch: int, drop_last: bool) -> None:
    """2 ranks x micro 3 stop after 2 batches; 1 rank x 5 or 3 ranks x 2 finish the epoch with exactly the
    samples not yet consumed (with drop_last: the full global batches of them), then run the next epoch (a
    streamed order goes on in the layout the epoch began with)."""
    old = [build_loader(_cfg(backend, ids_shards, batch=3, drop_last=drop_last, read=read, shuffle_buffer=5),
                        img_size=16, rank=r, world_size=2, seed=7) for r in range(2)]
    seen: list[int] = []
    states = []
    for ld in old:
        ld.set_epoch(4)
        for i, (_, y) in enumerate(ld):
            seen += y.tolist()
            if i == 1:
                break
        states.append(ld.state_dict())
    assert states[0]["samples_in_epoch"] == states[1]["samples_in_epoch"] == 12
    new = [build_loader(_cfg(backend, ids_shards, batch=new_batch, drop_last=drop_last, read=read,
                             shuffle_buffer=5), img_size=16, rank=r, world_size=new_world, seed=7)
           for r in range(new_world)]
    rest, nxt = [], []
    for ld in new:
        ld.load_state_dict(states[0])
        assert ld.epoch == 4 and ld.start_sample == 12
        rest += [v for _, y in ld for v in y.tolist()]
        assert ld.epoch == 5 and ld.start_sample == 0 and ld.batch_in_epoch == 0
        nxt += [v for _, y in ld for v in y.tolist()]
    rest = [v for v in rest if v != PAD_LABEL]
    nxt = [v for v in nxt if v != PAD_LABEL]
    glob = new_world * new_batch
    if drop_last:  # full global batches of the 11 samples left, then of the 23 of the next epoch; none twice
        assert len(rest) == 11 // glob * glob and len(set(seen + rest)) == len(seen + rest)
        assert set(seen + rest) <= set(IDS) and set(seen).isdisjoint(rest)
        assert len(nxt) == 23 // glob * glob and len(set(nxt)) == len(nxt) and set(nxt) <= set(IDS)
    else:
        assert sorted(seen + rest) == sorted(IDS)  # the interrupted epoch: every sample exactly once
        assert sorted(nxt) == sorted(IDS)
    done = build_loader(_cfg(backend, ids_shards, batch=new_batch, drop_last=drop_last, read=read,
                             shuffle_buffer=5), img_size=16, world_size=new_world, seed=7)
    done.load_state_dict({**states[0], "samples_in_epoch": 23})  # a finished epoch resumes at the next one
    assert (done.epoch, done.start_sample) == (5, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism(backend: str, ids_shards: Path) -> None:
    a = _epoch(build_loader(_cfg(backend, ids_shards), img_size=16, seed=11))[:3]
    b = _epoch(build_loader(_cfg(backend, ids_shards), img_size=16, seed=11))[:3]
    c = _epoch(build_loader(_cfg(backend, ids_shards), img_size=16, seed=12))[:3]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


@pytest.mark.skipif(not dali_available(), reason=NO_DALI)
def test_dali_and_torch_agree_on_the_bundled_sample() -> None:
    cfg = _cfg("torch", "", batch=16, workers=0)
    ref = _epoch(build_loader(cfg, img_size=64, seed=3))
    dali = _epoch(build_loader(dataclasses.replace(cfg, backend="dali"), img_size=64, seed=3))
    assert len(ref) == len(dali) == 5
    for (xa, ya), (xb, yb) in zip(ref, dali, strict=True):
        assert torch.equal(ya, yb)  # same samples, same order
        # same crops and flips; the decoders and resamplers differ slightly
        assert float((xa - xb).abs().mean()) < 0.02
    imgs = torch.cat([x for x, _ in ref])
    assert abs(float(imgs.mean())) < 0.6 and 0.6 < float(imgs.std()) < 1.5  # ImageNet-normalised photographs


def test_bundled_sample_and_errors(tmp_path: Path) -> None:
    assert len(list(bundled_sample_dir().glob("*.tar"))) == 2
    assert len(list(bundled_sample_dir("val").glob("*.tar"))) == 1
    loader = build_loader(_cfg("auto", ""), img_size=16)
    assert loader.backend == ("dali" if dali_available() else "torch") and loader.num_samples == 80
    val = build_loader(_cfg("torch", bundled_sample_dir("val")), img_size=16, mode="eval")
    assert sorted(torch.cat([y for _, y in val]).tolist()) == sorted(list(range(10)) * 2)
    with pytest.raises(ShardError, match="no_such_dir"):
        build_loader(_cfg("torch", tmp_path / "no_such_dir"), img_size=16)
    with pytest.raises(ShardError, match=str(tmp_path)):
        build_loader(_cfg("torch", tmp_path), img_size=16)
    with pytest.raises(ValueError, match="mode"):
        build_loader(_cfg("torch", ""), img_size=16, mode="test")


def test_synthetic_backend() -> None:
    loader = build_loader(_cfg("synthetic", "", batch=4, synthetic_size=10), img_size=16, world_size=2)
    assert isinstance(loader, SyntheticLoader) and loader.backend == "synthetic" and loader.num_samples == 10
    batches = list(loader)
    assert len(batches) == len(loader) == 1 and batches[0][0].shape == (4, 3, 16, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_label_raises_naming_the_key(backend: str, tmp_path: Path) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    Image.fromarray(_gradient(40, 30)).save(buf, "JPEG")
    with tarfile.open(tmp_path / "000000.tar", "w") as tf:
        for key, cls in (("good", b"1"), ("odd_label", b"x7")):
            for ext, data in (("cls", cls), ("jpg", buf.getvalue())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    loader = build_loader(_cfg(backend, tmp_path, batch=2), img_size=16)
    with pytest.raises(ShardError, match="odd_label.cls is not an integer"):
        list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_image_error_names_the_key(backend: str, tmp_path: Path) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    Image.fromarray(_gradient(80, 60)).save(buf, "JPEG")
    good = buf.getvalue()
    bad = good[:300] + b"\x00" * 200 + good[500:600]  # written by hand: the writer would have skipped it
    with tarfile.open(tmp_path / "000000.tar", "w") as tf:
        for key, data in (("a", good), ("b", good), ("broken", bad), ("c", good)):
            for ext, payload in (("cls", b"1"), ("jpg", data)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    loader = build_loader(_cfg(backend, tmp_path, batch=2), img_size=16, mode="eval")
    with pytest.raises(ShardError, match="broken") as info:
        list(loader)
    assert "fastmae.data.shards verify" in str(info.value)


def _hand_tar(path: Path, keys: list[str]) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    Image.fromarray(_gradient(40, 30)).save(buf, "JPEG")
    with tarfile.open(path, "w") as tf:
        for key in keys:
            for ext, data in (("cls", b"1"), ("jpg", buf.getvalue())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_instead_of_a_jpeg_names_the_key(backend: str, tmp_path: Path) -> None:
    """Bytes that are no image at all (the header walk and PIL both fail): a ShardError naming the key."""
    import io
    import tarfile

    _hand_tar(tmp_path / "000000.tar", ["a"])
    with tarfile.open(tmp_path / "000000.tar", "a") as tf:
        for ext, data in (("cls", b"1"), ("jpg", b"\xff\xd8\xff\xe0 not a JPEG " * 3)):
            info = tarfile.TarInfo(f"garbage.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    loader = build_loader(_cfg(backend, tmp_path, batch=2), img_size=16, mode="eval")
    with pytest.raises(ShardError, match="000000.tar: garbage"):
        list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_index_is_refused_at_start(backend: str, tmp_path: Path) -> None:
    """An index that no longer matches its shard (rewritten with more samples, or cut short) stops the loader
    at start, naming the index, the shard and the command that rebuilds it."""
    from fastmae.data.index import make_index

    shard = tmp_path / "000000.tar"
    _hand_tar(shard, ["a", "b"])
    make_index(shard)
    build_loader(_cfg(backend, tmp_path, batch=2), img_size=16, mode="eval")  # a matching index is fine
    _hand_tar(shard, ["a", "b", "c", "d", "e", "f"])  # rewritten after indexing
    with pytest.raises(ShardError, match=r"000000.idx does not match .*000000.tar.*rewritten.*shards index"):
        build_loader(_cfg(backend, tmp_path, batch=2), img_size=16, mode="eval")
    make_index(shard)
    from fastmae.data import ShardIndex

    last_jpg = int(ShardIndex([shard]).img_off[-1])
    with open(shard, "r+b") as f:  # cut short after indexing, inside the last sample
        f.truncate(last_jpg + 10)
    with pytest.raises(ShardError, match=r"000000.idx does not match .*truncated"):
        build_loader(_cfg(backend, tmp_path, batch=2), img_size=16, mode="eval")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_truncated_during_the_run_names_the_key(backend: str, tmp_path: Path) -> None:
    """A shard cut short while a run reads it: the short read is an error naming the shard and the key."""
    from fastmae.data import ShardIndex

    shard = tmp_path / "000000.tar"
    _hand_tar(shard, ["a", "b", "c", "last"])
    loader = build_loader(_cfg(backend, tmp_path, batch=2), img_size=16, mode="eval")
    index = ShardIndex([shard])
    with open(shard, "r+b") as f:
        f.truncate(int(index.img_off[3]) + 10)  # inside the last sample's JPEG
    with pytest.raises(ShardError, match=r"000000.tar: last.jpg: short read, 10 of \d+ bytes"):
        list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_label_is_an_error_for_classification(backend: str, tmp_path: Path) -> None:
    """A sample without .cls: label 0 for pre-training (unlabelled shards), an error naming the shard and
    key when the program needs labels (fine-tuning, linear probing, evaluation), before anything is read."""
    import io
    import tarfile

    _hand_tar(tmp_path / "000000.tar", ["a", "b"])
    with tarfile.open(tmp_path / "000000.tar", "a") as tf:
        buf = io.BytesIO()
        Image.fromarray(_gradient(40, 30)).save(buf, "JPEG")
        info = tarfile.TarInfo("unlabelled.jpg")
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))
    got = torch.cat([y for _, y in build_loader(_cfg(backend, tmp_path, batch=3), img_size=16, mode="eval")])
    assert sorted(got.tolist()) == [0, 1, 1]
    with pytest.raises(ShardError, match=r"000000.tar: unlabelled has no .cls label \(1 of 3 samples"):
        build_loader(_cfg(backend, tmp_path, batch=3), img_size=16, mode="eval", labels=True)


# ----------------------------------------------------------------------------- RandAugment (fine-tuning)


RANDAUG = "rand-m9-mstd0.5-inc1"


def _check_randaug(plain: list, aug: list) -> int:
    """Same samples, shapes, dtype and value range as without RandAugment; returns how many images changed."""
    changed = 0
    for (xp, yp), (xa, ya) in zip(plain, aug, strict=True):
        assert torch.equal(yp, ya)  # the same samples in the same order
        assert xa.shape == xp.shape and xa.dtype == torch.float32
        pix = xa * STD + MEAN  # RandAugment works on uint8: still ImageNet-normalised [0, 255]
        assert float(pix.min()) > -0.01 and float(pix.max()) < 1.01
        changed += int(((xa - xp).abs().flatten(1).amax(1) > 1e-3).sum())
    return changed


@pytest.mark.skipif(not dali_available(), reason=NO_DALI)
def test_dali_randaugment_augments_deterministically_and_resumes(ids_shards: Path) -> None:
    cfg = _cfg("dali", ids_shards, batch=8, drop_last=False)
    plain = _epoch(build_loader(cfg, img_size=32, seed=4))
    full = build_loader(cfg, img_size=32, seed=4, randaug=RANDAUG)
    assert full.randaug_info.startswith(f"{RANDAUG} via DALI auto_aug")
    ref = [_epoch(full), _epoch(full)]  # epochs 0 and 1 on one pipeline
    changed = _check_randaug(plain, ref[0])
    # p=0.5 per op and an identity op in the suite: most images change, a few draw no op twice
    assert 23 // 3 <= changed < 23, changed
    # the same seed gives the same augmented batches; a resumed loader (a rebuilt pipeline) continues exactly
    again = build_loader(cfg, img_size=32, seed=4, randaug=RANDAUG)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref[0], _epoch(again), strict=True))
    again.load_state_dict({"epoch": 1, "batch_in_epoch": 1})
    rest = _epoch(again)
    assert len(rest) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(ref[1][1:], rest, strict=True))
    # with op probability 0 every sample takes the identity path: exactly the images without RandAugment
    never = _epoch(build_loader(cfg, img_size=32, seed=4, randaug="rand-m9-n2-p0"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, never, strict=True))


@pytest.mark.skipif(timm_available(), reason="timm imports here: the next test runs timm's RandAugment")
def test_torch_randaugment_without_timm_is_a_clear_error(ids_shards: Path) -> None:
    with pytest.raises(ImportError, match="timm"):
        build_loader(_cfg("torch", ids_shards), img_size=32, randaug=RANDAUG)


@pytest.mark.timm
@pytest.mark.skipif(not timm_available(), reason="timm (with a matching torchvision) does not import here")
def test_torch_randaugment_with_timm(ids_shards: Path) -> None:
    cfg = _cfg("torch", ids_shards, batch=8, drop_last=False)
    plain = _epoch(build_loader(cfg, img_size=32, seed=4))
    ld = build_loader(cfg, img_size=32, seed=4, randaug=RANDAUG)
    assert ld.randaug_info.startswith(f"{RANDAUG} via timm")
    aug = _epoch(ld)
    assert 23 // 3 <= _check_randaug(plain, aug) < 23
    again = build_loader(cfg, img_size=32, seed=4, randaug=RANDAUG)
    again.load_state_dict({"epoch": 0, "batch_in_epoch": 1})  # per-sample seeds: resumes exactly too
    assert all(torch.equal(a[0], b[0]) for a, b in zip(aug[1:], _epoch(again), strict=True))


def test_randaug_policy_and_errors(ids_shards: Path) -> None:
    p = parse_policy(RANDAUG)
    assert (p.n, p.m, p.mstd, p.increasing, p.prob) == (2, 9.0, 0.5, True, 0.5)
    assert parse_policy("rand-n3-m7-mstd101").mstd == float("inf")
    for bad in ("auto-m9", "rand-m11", "rand-q2", "rand-mx"):
        with pytest.raises(ValueError, match="randaug"):
            parse_policy(bad)
    with pytest.raises(ValueError, match="mode='train' only"):
        build_loader(_cfg("torch", ids_shards), img_size=32, mode="eval", randaug=RANDAUG)
    with pytest.raises(ValueError, match="synthetic"):
        build_loader(_cfg("synthetic", ""), img_size=32, randaug=RANDAUG)


def test_normalisation_constants_are_made_once_per_device() -> None:
    """No per-batch host-to-device copy: the mean/std tensors are built once per device and reused."""
    from fastmae.data.base import IMAGENET_MEAN, IMAGENET_STD, _mean_std, normalize_uint8

    cpu = torch.device("cpu")
    assert _mean_std(cpu)[0] is _mean_std(cpu)[0] and _mean_std(cpu)[1] is _mean_std(cpu)[1]
    imgs = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    want = (imgs.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    torch.testing.assert_close(normalize_uint8(imgs, torch.float32), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_error_skip_replaces_bad_samples_deterministically(backend: str, tmp_path: Path) -> None:
    """data.on_error=skip: a damaged JPEG body (found by the decoder) and a damaged header each give their place
    to the next readable sample, are counted once per run (resumable), and past max_bad_samples the run stops."""
    good, garbage = _damaged_shard(tmp_path)
    shard = tmp_path / "000000.tar"
    cfg = _cfg(backend, tmp_path, batch=2, drop_last=False, on_error="skip", max_bad_samples=2)
    loader = build_loader(cfg, img_size=16, mode="eval")
    for _ in range(2):  # the same replacements every epoch; each bad sample counted once
        assert [v for _, y in loader for v in y.tolist()] == [0, 1, 3, 3, 5, 5]
        assert sorted(loader.bad_samples) == [f"{shard}:broken", f"{shard}:garbage"]
    state = loader.state_dict()
    assert sorted(state["bad_samples"]) == sorted(loader.bad_samples)
    again = build_loader(cfg, img_size=16, mode="eval")
    again.load_state_dict(state)
    assert [v for _, y in again for v in y.tolist()] == [0, 1, 3, 3, 5, 5] and len(again.bad_samples) == 2
    tight = build_loader(dataclasses.replace(cfg, max_bad_samples=1), img_size=16, mode="eval")
    with pytest.raises(ShardError, match="2 samples could not be read or decoded on rank 0, more than "
                                         "data.max_bad_samples=1"):
        list(tight)
    with pytest.raises(ValueError, match="on_error"):
        build_loader(dataclasses.replace(cfg, on_error="ignore"), img_size=16)


# ----------------------------------------------------------------------------- DALI decoder settings and memory


@DALI_ONLY
def test_dali_decoder_settings_are_checked_and_kept(ids_shards: Path) -> None:
    """The nvJPEG settings reach the loader (used by the GPU's "mixed" decoder only; the CPU twin is unchanged)."""
    loader = build_loader(_cfg("dali", ids_shards, hw_decoder_load=0.75, preallocate_width_hint=640,
                               preallocate_height_hint=480), img_size=16)
    assert loader.decoder == {"hw_decoder_load": 0.75, "preallocate_width_hint": 640, "preallocate_height_hint": 480}
    assert build_loader(_cfg("dali", ids_shards), img_size=16).decoder == {"hw_decoder_load": 0.9}
    with pytest.raises(ValueError, match="hw_decoder_load=1.5"):
        build_loader(_cfg("dali", ids_shards, hw_decoder_load=1.5), img_size=16)


@DALI_ONLY
def test_dali_gpu_memory_enters_the_memory_estimate(ids_shards: Path) -> None:
    from fastmae.data.dali_pipeline import NVJPEG_DEVICE_PADDING, dali_gpu_bytes

    from fastmae.config import ModelConfig
    from fastmae.memory import estimate_memory

    # ViT-B batch 256 at 224 px, 4 decoder threads: 3 uint8 batches out + 2 queued batches of crop windows
    # (0.6 of 500 x 375 x 3) and resized crops + 16 MiB nvJPEG padding per thread
    got = dali_gpu_bytes(256, 224, 4, {"hw_decoder_load": 0.9})
    assert got == 3 * 256 * 150528 + 2 * 256 * (337500 + 150528) + 4 * NVJPEG_DEVICE_PADDING
    hinted = dali_gpu_bytes(256, 224, 4, {"hw_decoder_load": 0.5, "preallocate_width_hint": 1000,
                                          "preallocate_height_hint": 800})
    assert hinted > got  # bigger windows + the hardware decoder's buffers for half the batch
    assert build_loader(_cfg("dali", ids_shards), img_size=16).gpu_memory_bytes() == 0  # the CPU twin: none
    est = dataclasses.replace(estimate_memory(ModelConfig(), 0.75, 256), loader=got)
    assert est.total == est.model_states + est.weight_copies + est.activations + got
    assert "+ data loader 0.4 = " in est.describe()
