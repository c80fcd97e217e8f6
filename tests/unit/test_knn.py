"""The weighted k-NN (fastmae.knn, the evaluation's --knn mode), in process: the votes against a hand computation,
the features against the MAE's own encoder on every patch, and the command line end to end on the bundled sample
against an independent brute-force k-NN. The monitor during pre-training on 2 ranks under ZeRO-3:
tests/integration/test_eval.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastmae.data import PAD_LABEL, build_loader, bundled_sample_dir

from fastmae import knn
from fastmae.config import DataConfig, get_preset
from fastmae.evaluation import main
from fastmae.model import MaskedAutoencoderViT
from fastmae.vit import build_classifier

# 6 unit vectors in 2-D: cosine similarities to the query (1, 0) are 1, 0.8, 0.6, 0, -0.6, -1
BANK = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8], [-1.0, 0.0]])
BANK_LABELS = torch.tensor([0, 1, 1, 2, 2, 0])


def test_votes_are_exp_similarity_over_t_of_the_k_nearest() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for t in (0.07, 1.0):
        votes = knn.knn_votes(BANK, BANK_LABELS, q, k=3, temperature=t, num_classes=3)
        # query (1, 0): its 3 nearest are rows 0, 1, 2 (similarities 1, 0.8, 0.6)
        e = [math.exp(1 / t), math.exp(0.8 / t) + math.exp(0.6 / t), 0.0]
        # query (0, 1): rows 3 (similarity 1), 2 and 4 (0.8 each)
        f = [0.0, math.exp(0.8 / t), math.exp(1 / t) + math.exp(0.8 / t)]
        assert votes.dtype == torch.float64
        assert votes[0].tolist() == pytest.approx(e, rel=1e-6)
        assert votes[1].tolist() == pytest.approx(f, rel=1e-6)
    # the weighting decides: at T = 0.07 the single nearest neighbour (class 0) outweighs two of class 1; at
    # T = 1 the majority (class 1) wins
    sharp = knn.knn_votes(BANK, BANK_LABELS, q[:1], 3, 0.07, 3).argmax(1)
    flat = knn.knn_votes(BANK, BANK_LABELS, q[:1], 3, 1.0, 3).argmax(1)
    assert (int(sharp), int(flat)) == (0, 1)
    # query chunks (one query at a time) change nothing; k beyond the bank takes the whole bank
    many = F.normalize(torch.randn(9, 2), dim=1)
    whole = knn.knn_votes(BANK, BANK_LABELS, many, 3, 0.07, 3)
    assert torch.equal(knn.knn_votes(BANK, BANK_LABELS, many, 3, 0.07, 3, max_similarities=6), whole)
    everything = knn.knn_votes(BANK, BANK_LABELS, q[:1], 50, 1.0, 3)
    all_w = [math.exp(s) for s in (1, 0.8, 0.6, 0, -0.6, -1)]
    assert everything[0].tolist() == pytest.approx([all_w[0] + all_w[5], all_w[1] + all_w[2], all_w[3] + all_w[4]])
    with pytest.raises(ValueError, match="must be positive"):
        knn.knn_votes(BANK, BANK_LABELS, q, 0, 0.07, 3)


def test_accuracy_top1_and_top5() -> None:
    # class 0 is right for (1, 0) at T = 0.07, class 2 for (0, 1); (0.8, 0.6) labelled 2 is wrong at top-1
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    stats = knn.knn_accuracy(BANK, BANK_LABELS, q, torch.tensor([0, 2, 2]), k=3, temperature=0.07)
    assert stats["acc1"] == pytest.approx(200 / 3) and stats["acc5"] == 100.0  # 3 classes: top-5 has them all
    assert (stats["count"], stats["bank"]) == (3, 6)


def test_features_are_the_encoders_on_every_patch() -> None:
    """cls / pool of the copied encoder = the MAE's own encoder with nothing masked (cls token, mean of the patch
    tokens after the final norm); the training model's mode is untouched, the copy's restored."""
    cfg = get_preset("debug")
    mae = MaskedAutoencoderViT(cfg.model, cfg.mask).train()
    enc = knn.encoder_copy(mae, cfg.model, "cpu")
    assert mae.training and not enc.training
    imgs = torch.randn(3, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        latent, mask, _ = mae.eval().encode(imgs, 0.0)  # (B, 1+N, D), every patch kept (in a shuffled order)
    assert not mask.any()
    assert torch.allclose(knn.encoder_features(enc, imgs, "cls"), latent[:, 0], atol=1e-5)
    assert torch.allclose(knn.encoder_features(enc, imgs, "pool"), latent[:, 1:].mean(dim=1), atol=1e-5)
    enc.train()
    loader = build_loader(DataConfig(backend="torch", shards=str(bundled_sample_dir("val")), batch_size=8,
                                     num_workers=0), img_size=cfg.model.img_size, mode="eval", labels=True)
    f, lab = knn.extract_features(enc, loader, "cpu", "cls", max_images=10)
    assert enc.training  # restored
    assert f.shape == (16, cfg.model.embed_dim) and torch.allclose(f.norm(dim=1), torch.ones(16))  # 2 batches
    assert (lab != PAD_LABEL).all()


def brute_force_knn(bank: torch.Tensor, bank_labels: list[int], queries: torch.Tensor, labels: list[int], k: int,
                    t: float) -> tuple[float, float]:
    """Top-1 / top-5 (%) of the weighted k-NN, one query and one neighbour at a time."""
    hits1 = hits5 = 0
    for q, label in zip(queries.tolist(), labels, strict=True):
        sims = sorted(((sum(a * b for a, b in zip(q, row, strict=True)), j) for j, row in enumerate(bank.tolist())),
                      reverse=True)
        votes: dict[int, float] = {}
        for s, j in sims[:k]:
            votes[bank_labels[j]] = votes.get(bank_labels[j], 0.0) + math.exp(s / t)
        ranked = sorted(votes, key=votes.get, reverse=True)
        hits1 += ranked[0] == label
        hits5 += label in ranked[:5]
    return 100.0 * hits1 / len(labels), 100.0 * hits5 / len(labels)


def test_knn_command_line_on_the_bundled_sample(tmp_path: Path) -> None:
    """``--knn`` on a debug MAE saved as fastmae exports checkpoints, against a brute-force k-NN over features of
    the MAE's own encoder (nothing masked)."""
    cfg = get_preset("debug")
    mae = MaskedAutoencoderViT(cfg.model, cfg.mask).eval()
    ckpt = tmp_path / "mae_debug.pth"
    torch.save({"model": mae.state_dict(), "config": cfg.to_dict(), "step": 0, "epoch": 0}, ckpt)
    out = tmp_path / "knn.json"
    assert main(["--knn", "--checkpoint", str(ckpt), "--preset", "debug", "--backend", "torch", "--num_workers", "0",
                 "--k", "5", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert (rec["mode"], rec["kind"], rec["k"], rec["temperature"], rec["features"]) == ("knn", "mae", 5, 0.07, "cls")
    assert (rec["bank"], rec["count"]) == (80, 20)

    def features(split: str) -> tuple[torch.Tensor, list[int]]:
        loader = build_loader(DataConfig(backend="torch", shards=str(bundled_sample_dir(split)), num_workers=0),
                              img_size=cfg.model.img_size, mode="eval", labels=True)
        loader.set_epoch(0)
        fs, ls = [], []
        with torch.no_grad():
            for imgs, labels in loader:
                fs.append(F.normalize(mae.encode(imgs, 0.0)[0][:, 0], dim=1))
                ls += labels.tolist()
        return torch.cat(fs), ls

    acc1, acc5 = brute_force_knn(*features("train"), *features("val"), k=5, t=0.07)
    assert rec["acc1"] == pytest.approx(acc1) and rec["acc5"] == pytest.approx(acc5)


def test_encoder_loading_and_option_errors(tmp_path: Path) -> None:
    cfg = get_preset("debug")
    clf = build_classifier(cfg.model, 10)  # global pool: fc_norm, no final token norm
    path = tmp_path / "clf.pth"
    torch.save({"model": clf.state_dict(), "config": cfg.to_dict()}, path)
    with pytest.raises(ValueError, match="use features=pool"):
        knn.load_encoder(path, "debug", features="cls")
    enc, meta = knn.load_encoder(path, "debug", features="pool")
    assert meta["kind"] == "classifier" and enc.global_pool
    assert main(["--knn", "--checkpoint", str(path), "--preset", "debug", "--features", "cls"]) == 1
    for bad in (["--knn", "--subset", "imagenet-a"], ["--knn", "--shards", "x"], ["--train-shards", "x"],
                ["--knn", "--max_batches", "2"]):
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(path), *bad])
    assert main(["--knn", "--checkpoint", str(path), "--preset", "debug", "--features", "pool", "--k", "0"]) == 1
