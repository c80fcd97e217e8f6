"""Shard writer and verifier, shard paths, and the pure sampling/augmentation functions (CPU, fast)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fastmae.data import ShardError, ShardIndex, expand_shards
from fastmae.data import shards as shards_mod
from fastmae.data.index import read_index, scan_tar
from fastmae.data.sampling import (
    PAD_LABEL,
    buffer_shuffle,
    center_crop_box,
    epoch_order,
    image_size,
    random_resized_crop_box,
    rank_batch,
    steps_per_epoch,
    stream_order,
)
from PIL import Image


def _jpeg(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet-layout folder: 3 classes, assorted sizes/modes/formats, one corrupt and one truncated JPEG."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    specs = [  # (class, name, mode, format, (w, h))
        ("cat", "rgb_small.JPEG", "RGB", "JPEG", (40, 30)),
        ("cat", "rgb_big.jpg", "RGB", "JPEG", (320, 200)),
        ("cat", "grey.jpg", "L", "JPEG", (100, 120)),
        ("cat", "cmyk.jpg", "CMYK", "JPEG", (90, 70)),
        ("dog", "rgba.png", "RGBA", "PNG", (64, 64)),
        ("dog", "palette.png", "P", "PNG", (50, 80)),
        ("dog", "grey.png", "L", "PNG", (33, 47)),
        ("dog", "tall.bmp", "RGB", "BMP", (30, 200)),
        ("emu", "webp.webp", "RGB", "WEBP", (70, 50)),
        ("emu", "progressive.jpg", "RGB", "JPEG", (150, 100)),
        ("emu", "wide.jpg", "RGB", "JPEG", (400, 60)),
    ]
    for cls, name, mode, fmt, (w, h) in specs:
        (root / cls).mkdir(exist_ok=True)
        arr = rng.integers(0, 256, (h, w, 4 if mode in ("RGBA", "CMYK") else 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGBA" if mode in ("RGBA", "CMYK") else "RGB")
        img = img.convert(mode) if mode not in ("RGBA",) else img
        kw = {"progressive": True} if "progressive" in name else {}
        img.save(root / cls / name, fmt, **kw)
    good = _jpeg(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    noise = bytes(rng.integers(0, 256, 500, dtype=np.uint8))
    (root / "emu" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + noise)
    (root / "emu" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture(scope="module")
def written(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards")
    report = shards_mod.write_shards(source, out, samples_per_shard=4, workers=2, progress=False)
    return out, report


def test_write_skips_and_reports_bad_images(written: tuple[Path, dict]) -> None:
    out, report = written
    skipped = {Path(s["path"]).name for s in report["skipped"]}
    assert skipped == {"corrupt.jpg", "truncated.jpg"}
    assert report["samples"] == 11 and len(report["shards"]) == 3  # 4 + 4 + 3
    assert json.loads((out / "report.json").read_text())["skipped"] == report["skipped"]
    assert json.loads((out / "classes.json").read_text()) == {"cat": 0, "dog": 1, "emu": 2}
    assert not list(out.glob(".*")), "temporary files left behind"


def test_written_samples_are_rgb_jpeg_with_labels(written: tuple[Path, dict], source: Path) -> None:
    out, _ = written
    index = ShardIndex(expand_shards(out))
    assert len(index) == 11
    by_stem: dict[str, tuple[int, tuple[int, int]]] = {}
    for i in range(len(index)):
        with Image.open(io.BytesIO(index.read_image(i))) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()
            assert image_size(index.read_image(i)) == im.size
        by_stem[index.key(i).split("_", 1)[1]] = (index.read_label(i), im.size)
    assert by_stem["cmyk"][0] == 0 and by_stem["rgba"][0] == 1 and by_stem["wide"][0] == 2
    assert by_stem["rgb_big"][1] == (320, 200) and by_stem["tall"][1] == (30, 200)


def test_verify_accepts_written_shards(written: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    out, _ = written
    assert shards_mod.main(["verify", str(out), "--quiet", "--workers", "1"]) == 0
    assert "OK, 11 samples in 3 shards" in capsys.readouterr().out
    for shard in expand_shards(out):  # index written by DALI's wds2idx (or its Python twin) matches the tar
        assert [{k: v[:2] for k, v in s.items()} for s in read_index(shard.with_suffix(".idx"))] == [
            {k: v[:2] for k, v in s.items()} for s in scan_tar(shard)
        ]


def test_index_without_idx_files_matches(written: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = written
    for shard in expand_shards(out):
        (tmp_path / shard.name).write_bytes(shard.read_bytes())  # copy the tars only: ShardIndex scans them
    a, b = ShardIndex(expand_shards(out)), ShardIndex(expand_shards(tmp_path))
    assert [a.key(i) for i in range(len(a))] == [b.key(i) for i in range(len(b))]
    assert all(a.read_image(i) == b.read_image(i) and a.read_label(i) == b.read_label(i) for i in range(len(a)))


def test_bounded_open_files(written: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    from fastmae.data import index as index_mod

    out, _ = written
    ref = ShardIndex(expand_shards(out))
    monkeypatch.setattr(index_mod, "_FD_BUDGET", 1)
    small = ShardIndex(expand_shards(out))
    for i in [0, 5, 10, 1, 9, 4]:  # hops between the 3 shards with one descriptor
        assert small.read_image(i) == ref.read_image(i) and len(small._fds) == 1
    assert index_mod._fd_budget() == 1


def test_resize_and_bytes_per_shard(source: Path, tmp_path: Path) -> None:
    rep = shards_mod.write_shards(
        source, tmp_path, bytes_per_shard=6000, resize=48, workers=1, progress=False, shuffle=False
    )
    index = ShardIndex(expand_shards(tmp_path))
    assert max(min(image_size(index.read_image(i))) for i in range(len(index))) <= 48
    assert len(rep["shards"]) > 1
    for shard in expand_shards(tmp_path):
        n = sum(1 for s in scan_tar(shard))
        assert shard.stat().st_size <= 6000 + n * 1536 + 10240 or n == 1


def test_file_list_source_and_cli(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{source / 'cat' / 'grey.jpg'} 7\n{source / 'dog' / 'grey.png'} 12345\n"
                       f"{source / 'emu' / 'corrupt.jpg'} 3\n")
    out = tmp_path / "out"
    assert shards_mod.main(["write", str(listing), str(out), "--quiet", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 samples" in printed and "corrupt.jpg" in printed
    index = ShardIndex(expand_shards(out))
    assert sorted(index.read_label(i) for i in range(len(index))) == [7, 12345]


def _tar_with(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_verify_names_bad_shard_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _jpeg(np.zeros((16, 16, 3), np.uint8))
    _tar_with(tmp_path / "000000.tar", [("ok.cls", b"1"), ("ok.jpg", good)])
    broken = good[:40] + b"\x00" * 50
    _tar_with(tmp_path / "000001.tar", [("fine.cls", b"0"), ("fine.jpg", good),
                                        ("broken_key.cls", b"2"), ("broken_key.jpg", broken)])
    _tar_with(tmp_path / "000002.tar", [("nolabel.jpg", good)])
    for shard in expand_shards(tmp_path):
        shards_mod.make_index(shard)
    (tmp_path / "000000.idx").write_text("v1.2 1\ncls 1 1 ok.cls jpg 1536 9 ok.jpg\n")  # wrong offsets
    assert shards_mod.main(["verify", str(tmp_path), "--quiet", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / '000001.tar'}: broken_key: image does not decode" in err
    assert f"{tmp_path / '000002.tar'}: nolabel: no .cls component" in err
    assert f"{tmp_path / '000000.tar'}: ok: index 000000.idx does not match" in err
    assert "fine" not in err


def test_verify_catches_truncated_tar(tmp_path: Path) -> None:
    good = _jpeg(np.full((64, 64, 3), 90, np.uint8))
    _tar_with(tmp_path / "000000.tar", [("a.cls", b"1"), ("a.jpg", good)])
    data = (tmp_path / "000000.tar").read_bytes()
    (tmp_path / "000000.tar").write_bytes(data[:700])
    n, problems = shards_mod.verify_shards(str(tmp_path), workers=1, progress=False)
    assert problems and str(tmp_path / "000000.tar") in problems[0]


def test_interrupted_write_leaves_no_final_shard(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_mod, "make_index", boom)
    with pytest.raises(KeyboardInterrupt):
        shards_mod.write_shards(source, tmp_path, samples_per_shard=100, workers=1, progress=False)
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob("*.idx"))


def test_expand_shards_patterns_and_errors(written: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = written
    assert [p.name for p in expand_shards(f"{out}/{{000000..000002}}.tar")] == ["000000.tar", "000001.tar",
                                                                               "000002.tar"]
    assert len(expand_shards(f"{out}/*.tar")) == 3 and len(expand_shards(out / "000001.tar")) == 1
    with pytest.raises(ShardError, match="nowhere/x"):
        expand_shards(tmp_path / "nowhere/x")
    with pytest.raises(ShardError, match=str(tmp_path)):
        expand_shards(tmp_path)  # a directory without shards
    with pytest.raises(ShardError, match="000009"):
        expand_shards(f"{out}/{{000000..000009}}.tar")


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "n,world,batch", [(80, 1, 16), (23, 2, 4), (9, 2, 4), (9, 4, 2), (17, 3, 5), (5, 8, 2)]
)
def test_exact_epoch_plan(n: int, world: int, batch: int) -> None:
    steps = steps_per_epoch(n, world, batch)
    for epoch in range(2):
        order = epoch_order(n, epoch, seed=3, shuffle=True)
        seen: list[int] = []
        for step in range(steps):
            for rank in range(world):
                idx, pad = rank_batch(order, step, rank, world, batch)
                assert 1 <= len(idx) <= batch
                if pad:
                    assert step == steps - 1 and len(idx) == 1
                else:
                    seen.extend(idx.tolist())
        assert sorted(seen) == list(range(n)), "every sample exactly once per epoch"
    assert PAD_LABEL < 0


def test_one_read_per_sample_gives_the_image_and_the_label() -> None:
    from fastmae.data import bundled_sample_dir

    index = ShardIndex(expand_shards(bundled_sample_dir()))
    for i in range(len(index)):
        assert index.read_sample(i) == (index.read_image(i), index.read_label(i))


def test_buffer_shuffle_keeps_every_item_within_its_window() -> None:
    items = np.arange(1000, 2000)
    out = buffer_shuffle(items, 50, np.random.default_rng(1))
    assert sorted(out.tolist()) == items.tolist()
    assert all(out[i] < items[min(i + 50, 999)] or i + 50 > 999 for i in range(1000)), "output i from items[:i+50]"
    assert (out != items).mean() > 0.9 and np.abs(out - items).max() > 25  # really shuffled
    assert np.array_equal(out, buffer_shuffle(items, 50, np.random.default_rng(1)))  # seeded
    assert np.array_equal(buffer_shuffle(items, 1, np.random.default_rng(1)), items)


@pytest.mark.parametrize("world,batch,drop_last", [(1, 4, True), (2, 4, True), (3, 5, False), (2, 6, False)])
def test_stream_order_gives_each_rank_a_run_of_shards(world: int, batch: int, drop_last: bool) -> None:
    sizes = (16, 16, 16, 5, 30, 9, 12)
    starts = np.cumsum((0,) + sizes)
    shard = np.searchsorted(starts, np.arange(starts[-1]), side="right") - 1  # sample -> shard
    n, steps = int(starts[-1]), steps_per_epoch(int(starts[-1]), world, batch, drop_last)
    seqs = []
    for epoch in range(2):
        order = stream_order(sizes, epoch, 3, True, world, batch, drop_last, buffer=6)
        assert sorted(order.tolist()) == list(range(n)), "a permutation"
        assert np.array_equal(order, stream_order(sizes, epoch, 3, True, world, batch, drop_last, buffer=6))
        read: list[int] = []
        runs = []
        for rank in range(world):
            mine = np.concatenate([rank_batch(order, s, rank, world, batch)[0] for s in range(steps)])
            assert not rank_batch(order, steps - 1, rank, world, batch)[1] or not drop_last
            visited = list(dict.fromkeys(shard[mine].tolist()))  # shards in order of first use
            assert len(visited) <= len(mine) // min(sizes) + 2, "a contiguous run of whole shards"
            runs.append(set(visited))
            read += mine.tolist()
        if world > 1:  # ranks share at most the shard at each boundary of their runs
            assert all(len(runs[r] & runs[r + 1]) <= 1 for r in range(world - 1))
        assert len(set(read)) == len(read) and len(read) == (n // (world * batch) * world * batch if drop_last else n)
        seqs.append(order)
    assert not np.array_equal(seqs[0], seqs[1]), "shards and buffers reshuffled every epoch"
    ev = stream_order(sizes, 0, 3, False, world, batch, False, buffer=6)
    first = np.concatenate([rank_batch(ev, s, 0, world, batch)[0] for s in range(steps_per_epoch(n, world, batch))])
    assert sorted(ev.tolist()) == list(range(n)) and np.array_equal(first, np.arange(len(first)))  # in shard order


def test_random_resized_crop_box_statistics() -> None:
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for (w, h) in [(500, 375), (375, 500), (256, 256), (1000, 200)]:
        for _ in range(500):
            x, y, cw, ch = random_resized_crop_box(rng.random(41), w, h, (0.2, 1.0))
            assert 0 <= x and 0 <= y and x + cw <= w and y + ch <= h and cw > 0 and ch > 0
            if (w, h) != (1000, 200):
                areas.append(cw * ch / (w * h))
                ratios.append(cw / ch)
    areas_a = np.array(areas)
    assert areas_a.min() < 0.22 and areas_a.max() > 0.97 and areas_a.min() > 0.19
    assert 0.73 <= min(ratios) and max(ratios) <= 1.36  # 3/4 .. 4/3 up to pixel rounding
    assert center_crop_box(500, 375, 224) == (86, 23, 328, 328)  # 375 * 224 / 256 = 328
    assert center_crop_box(256, 256, 224) == (16, 16, 224, 224)


def test_image_size_matches_pil() -> None:
    arr = np.zeros((37, 53, 3), np.uint8)
    for kw in ({}, {"progressive": True}, {"optimize": True}):
        assert image_size(_jpeg(arr, **kw)) == (53, 37)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    assert image_size(buf.getvalue()) == (53, 37)
