"""Robustness scoring (fastmae.robustness, the evaluation's --subset and --imagenet-c modes), in process: the shipped
class lists and AlexNet constants against the published values, the 200-class restriction and the CE / mCE
arithmetic on generated shard sets scored by a model whose logits are known per image. The programs on real
ranks: tests/integration/test_eval.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from fastmae.data.constants import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.shards import write_shards
from torch import nn

from fastmae import robustness as rob
from fastmae.config import DataConfig, get_preset
from fastmae.evaluation import main, shard_scorer
from fastmae.vit import build_classifier

REPO = Path(__file__).resolve().parents[2]
STEP = 40  # grey level of image i: i * STEP


class GreyLookup(nn.Module):
    """A 1000-class "classifier" whose logits are a fixed row per image: image i is a flat grey of level
    i * STEP, which it reads back from the normalised pixels."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)  # (images, 1000)
        self.patch_embed = nn.Module()
        self.patch_embed.img_size = 32

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        level = (imgs * std + mean).mean(dim=(1, 2, 3)) * 255.0  # (B,) grey level
        return self.table[(level / STEP).round().long()]


def grey_shards(folder: Path, items: list[tuple[int, int]]) -> str:
    """Shards at ``folder`` of the flat grey images ``(image id, label)``."""
    from PIL import Image

    src = folder.parent / f"{folder.name}_src"
    src.mkdir(parents=True)
    lines = []
    for n, (i, label) in enumerate(items):
        p = src / f"{n}.png"
        Image.new("RGB", (40, 40), (i * STEP,) * 3).save(p)
        lines.append(f"{p} {label}")
    (src / "list.txt").write_text("\n".join(lines) + "\n")
    write_shards(src / "list.txt", folder, samples_per_shard=100, workers=1, shuffle=False, progress=False)
    return str(folder)


DATA = DataConfig(backend="torch", batch_size=4, num_workers=0)


# ----------------------------------------------------------------------------- the shipped data


def test_class_lists_are_the_published_200_classes_and_are_installed() -> None:
    a, r = rob.class_subset("imagenet-a"), rob.class_subset("imagenet-r")
    for s in (a, r):
        assert len(s) == 200 and len(set(s.indices)) == 200 and list(s.indices) == sorted(s.indices)
        assert 0 <= s.indices[0] and s.indices[-1] <= 999
        assert list(s.wnids) == sorted(s.wnids)  # 1k indices are the sorted-wnid order: both ascend together
    # entries of the authors' lists (natural-adv-examples eval.py: thousand_k_to_200; imagenet-r eval.py)
    assert (a.indices[0], a.wnids[0]) == (6, "n01498041")  # stingray, the first of ImageNet-A
    assert (a.indices[-2], a.indices[-1], a.wnids[-1]) == (987, 988, "n12267677")
    assert a.indices[:5] == (6, 11, 13, 15, 17)
    assert (r.indices[0], r.wnids[0]) == (1, "n01443537")  # goldfish
    assert r.indices[:5] == (1, 2, 4, 6, 8) and r.indices[-1] == 988
    assert set(a.indices) != set(r.indices)
    with pytest.raises(ValueError, match="imagenet-a, imagenet-r"):
        rob.class_subset("imagenet-o")
    # the data files are package data, so they are in wheels too
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    globs = re.findall(r'"([^"]+)"', re.search(r"^fastmae = \[(.*)\]$", section, re.M).group(1))
    shipped = {p.relative_to(REPO / "fastmae") for g in globs for p in (REPO / "fastmae").glob(g)}
    for name in ("imagenet_a.txt", "imagenet_r.txt", "alexnet_imagenet_c.txt"):
        assert Path("robustness_data") / name in shipped


def test_alexnet_errors_are_the_published_ones() -> None:
    alex = rob.alexnet_errors()
    assert list(alex) == [*rob.BENCHMARK_CORRUPTIONS, *rob.EXTRA_CORRUPTIONS] and len(rob.BENCHMARK_CORRUPTIONS) == 15
    # hendrycks/robustness README, "AlexNet ImageNet-C Error": the average, then severities 1-5
    assert alex["gaussian_noise"] == (0.69528, 0.82542, 0.93554, 0.98138, 0.99452)
    averages = {"gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
                "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
                "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
                "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840,
                "jpeg_compression": 0.606500, "speckle_noise": 0.845388, "gaussian_blur": 0.787108,
                "spatter": 0.717512, "saturate": 0.658248}
    for name, avg in averages.items():
        assert sum(alex[name]) / 5 == pytest.approx(avg, abs=5e-7), name


# ----------------------------------------------------------------------------- ImageNet-A / -R


def subset_table(cols: tuple[int, ...]) -> tuple[torch.Tensor, list[int], dict[int, dict[int, float]]]:
    """Logits of 6 images, their subset labels, and each image's non-zero logits among the subset's columns."""
    t = torch.zeros(6, 1000)
    t[0, 0], t[0, cols[0]] = 9.0, 5.0  # tench (not in the subset) wins unrestricted; label 0 wins restricted
    t[1, cols[1]] = 3.0
    t[1, [cols[j] for j in range(10, 16)]] = 4.0  # six subset classes above label 1: not even top-5
    t[2, cols[2]], t[2, cols[20]] = 3.0, 4.0  # second: top-5 only
    t[3, cols[3]] = 2.0  # right both ways
    t[4, cols[199]], t[4, 999] = 1.0, 3.0  # class 999 is outside the subset
    t[5, cols[50]] = -1.0  # below 199 zeros
    labels = [0, 1, 2, 3, 199, 50]
    restricted = {i: {j: float(t[i, c]) for j, c in enumerate(cols) if t[i, c] != 0} for i in range(6)}
    return t, labels, restricted


def test_subset_scoring_restricts_the_logits_to_the_200_classes(tmp_path: Path) -> None:
    a = rob.class_subset("imagenet-a")
    table, labels, restricted = subset_table(a.indices)
    model = GreyLookup(table)
    own = grey_shards(tmp_path / "own", list(enumerate(labels)))  # the dataset's folders: 0..199
    in_1k = grey_shards(tmp_path / "in1k", [(i, a.indices[lab]) for i, lab in enumerate(labels)])
    stats = shard_scorer(model, DATA, "cpu", adapt=rob.SubsetLogits(a))(own)
    # by hand: top-1 right for images 0, 3, 4; top-5 also for image 2
    assert stats["count"] == 6 and stats["acc1"] == pytest.approx(50.0) and stats["acc5"] == pytest.approx(400 / 6)
    losses = []
    for i, lab in enumerate(labels):  # cross-entropy over the 200 restricted logits, most of them 0
        z = restricted[i]
        lse = math.log(sum(math.exp(v) for v in z.values()) + (200 - len(z)))
        losses.append(lse - z.get(lab, 0.0))
    assert stats["loss"] == pytest.approx(sum(losses) / 6, rel=1e-6)
    same = shard_scorer(model, DATA, "cpu", adapt=rob.SubsetLogits(a, labels="1k"))(in_1k)
    assert (same["acc1"], same["acc5"], same["count"]) == (stats["acc1"], stats["acc5"], 6)
    assert same["loss"] == pytest.approx(stats["loss"], rel=1e-9)
    plain = shard_scorer(model, DATA, "cpu")(in_1k)  # all 1000 classes: only image 3 is right
    assert plain["acc1"] == pytest.approx(100 / 6)


def test_subset_labels_outside_the_subset_are_refused(tmp_path: Path) -> None:
    a = rob.class_subset("imagenet-a")
    table, _, _ = subset_table(a.indices)
    model = GreyLookup(table)
    too_big = grey_shards(tmp_path / "big", [(0, 3), (1, 200)])
    with pytest.raises(ValueError, match=r"label 200 is outside the 200 classes of imagenet-a.*--labels 1k"):
        shard_scorer(model, DATA, "cpu", adapt=rob.SubsetLogits(a))(too_big)
    not_in_a = grey_shards(tmp_path / "tench", [(0, 6), (1, 0)])  # 0 (tench) is no ImageNet-A class
    with pytest.raises(ValueError, match=r"label 0 is not one of the 200 ImageNet-1k classes of imagenet-a"):
        shard_scorer(model, DATA, "cpu", adapt=rob.SubsetLogits(a, labels="1k"))(not_in_a)
    with pytest.raises(ValueError, match="this model has 10 classes"):
        shard_scorer(GreyLookup(table[:, :10]), DATA, "cpu", adapt=rob.SubsetLogits(a))(too_big)
    with pytest.raises(ValueError, match="labels='bad'"):
        rob.SubsetLogits(a, labels="bad")


def test_the_shard_writers_class_map_must_match_the_subset(tmp_path: Path) -> None:
    a, r = rob.class_subset("imagenet-a"), rob.class_subset("imagenet-r")
    (tmp_path / "classes.json").write_text(json.dumps({w: i for i, w in enumerate(r.wnids)}))  # R's own folders
    rob.check_class_map(str(tmp_path), r, "subset")
    with pytest.raises(ValueError, match=r"does not match imagenet-a with labels='subset'"):
        rob.check_class_map(str(tmp_path), a, "subset")
    (tmp_path / "classes.json").write_text(json.dumps(dict(zip(a.wnids, a.indices, strict=True))))  # 1k labels
    rob.check_class_map(str(tmp_path), a, "1k")
    with pytest.raises(ValueError, match=r"class n01498041 has label 6 there, 0 in .*imagenet_a.txt"):
        rob.check_class_map(str(tmp_path), a, "subset")


def test_subset_command_line_writes_json(tmp_path: Path) -> None:
    cfg = get_preset("debug")
    model = build_classifier(cfg.model, 1000)
    ckpt = tmp_path / "clf.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, ckpt)
    shards = grey_shards(tmp_path / "own", [(i, 7 * i) for i in range(6)])
    out = tmp_path / "r.json"
    assert main(["--checkpoint", str(ckpt), "--preset", "debug", "--backend", "torch", "--num_workers", "0",
                 "--shards", shards, "--subset", "imagenet-r", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    ref = shard_scorer(model.eval(), DATA, "cpu", adapt=rob.SubsetLogits(rob.class_subset("imagenet-r")))(shards)
    assert (rec["mode"], rec["subset"], rec["labels"], rec["count"]) == ("subset", "imagenet-r", "subset", 6)
    assert rec["acc1"] == ref["acc1"] and rec["acc5"] == ref["acc5"]
    assert rec["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--labels", "1k"])  # --labels without --subset


# ----------------------------------------------------------------------------- ImageNet-C


# images wrong of 4 per severity 1..5 (error = wrong / 4)
WRONG = {"gaussian_noise": [0, 1, 2, 3, 4], "contrast": [1, 1, 2, 2, 4], "saturate": [0, 0, 0, 1, 1]}


def test_corruption_errors_and_mce_on_a_generated_imagenet_c(tmp_path: Path) -> None:
    table = torch.zeros(4, 1000)
    for i in range(4):
        table[i, 100 * i + 7] = 5.0  # image i is predicted class 100 i + 7
    root = tmp_path / "imagenet-c"
    for name, wrong in WRONG.items():
        for sev, n_wrong in enumerate(wrong, start=1):
            items = [(i, 100 * i + 7 + (1 if i < n_wrong else 0)) for i in range(4)]
            grey_shards(root / name / str(sev), items)
    (root / "notes").mkdir()
    sets, other = rob.find_imagenet_c(root)
    assert sorted(sets) == sorted(WRONG) and other == ["notes"]
    errors, counts = rob.imagenet_c_errors(sets, shard_scorer(GreyLookup(table), DATA, "cpu"), progress=False)
    assert counts["contrast"] == dict.fromkeys(range(1, 6), 4)
    assert errors["gaussian_noise"] == {1: 0.0, 2: 25.0, 3: 50.0, 4: 75.0, 5: 100.0}
    report = rob.corruption_errors(errors)
    c = report["corruptions"]
    # CE = 100 * sum of the model's errors / sum of AlexNet's (published, severities 1-5)
    ce_gauss = 100 * (0 + .25 + .5 + .75 + 1) / (0.69528 + 0.82542 + 0.93554 + 0.98138 + 0.99452)
    ce_contrast = 100 * (.25 + .25 + .5 + .5 + 1) / (0.64548 + 0.76150 + 0.88874 + 0.97760 + 0.99270)
    ce_saturate = 100 * (.25 + .25) / (0.59342 + 0.65514 + 0.51174 + 0.70834 + 0.82260)
    assert c["gaussian_noise"]["ce"] == pytest.approx(ce_gauss) and c["contrast"]["ce"] == pytest.approx(ce_contrast)
    assert c["gaussian_noise"]["mean_error"] == pytest.approx(50.0)
    assert c["gaussian_noise"]["alexnet_mean_error"] == pytest.approx(88.6428)
    assert c["saturate"]["ce"] == pytest.approx(ce_saturate) and c["saturate"]["in_mce"] is False
    assert report["mce"] == pytest.approx((ce_gauss + ce_contrast) / 2)  # the extra corruption is not in it
    assert report["mce_corruptions"] == 2 and report["mce_complete"] is False
    assert len(report["missing"]) == 13 and "contrast" not in report["missing"] and "fog" in report["missing"]
    text = rob.format_imagenet_c(report)
    assert "mCE PARTIAL over 2 of 15 corruptions" in text and f"{(ce_gauss + ce_contrast) / 2:.2f}" in text
    assert "saturate" in text and "(extra: not in mCE)" in text
    # the command line on the same folder, with a real (random) 1000-class ViT: its JSON follows the same rules
    cfg = get_preset("debug")
    ckpt = tmp_path / "clf.pth"
    torch.save({"model": build_classifier(cfg.model, 1000).state_dict(), "config": cfg.to_dict()}, ckpt)
    out = tmp_path / "c.json"
    assert main(["--checkpoint", str(ckpt), "--preset", "debug", "--backend", "torch", "--num_workers", "0",
                 "--imagenet-c", str(root), "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert (rec["mode"], rec["left_out"], rec["mce_complete"], rec["mce_corruptions"]) == ("imagenet-c", ["notes"],
                                                                                           False, 2)
    alex = {"gaussian_noise": 4.43214, "contrast": 4.26602, "saturate": 3.29124}  # 5 x the published averages
    for name, r in rec["corruptions"].items():
        assert r["images"] == dict.fromkeys("12345", 4)
        assert r["ce"] == pytest.approx(100 * sum(e / 100 for e in r["errors"].values()) / alex[name])
    ces = rec["corruptions"]
    assert rec["mce"] == pytest.approx((ces["gaussian_noise"]["ce"] + ces["contrast"]["ce"]) / 2)


def test_imagenet_c_needs_all_five_severities(tmp_path: Path) -> None:
    for sev in (1, 2, 3, 4):
        (tmp_path / "fog" / str(sev)).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"fog lacks severities \[5\]"):
        rob.find_imagenet_c(tmp_path)
    with pytest.raises(FileNotFoundError, match="no ImageNet-C corruption folder"):
        rob.find_imagenet_c(tmp_path / "fog")
    full = {s: 10.0 for s in range(1, 6)}
    assert rob.corruption_errors({c: full for c in rob.BENCHMARK_CORRUPTIONS})["mce_complete"] is True

