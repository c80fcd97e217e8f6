"""Checkpoints in and out: official-format round trips, timm export (the tests that need timm are marked ``timm``
and skip without it; each assertion that can run without timm has a twin here), and the reconstruction picture.
The command line (pickled-code refusal, timm export): tests/integration/test_interop_cli.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastmae.kernels import num_kept
from modelutil import OFFICIAL_LIKE
from PIL import Image

from fastmae import interop, visualize
from fastmae.augment import BatchAugment, smooth_one_hot, soft_target_cross_entropy
from fastmae.config import ClassifierConfig, ModelConfig, get_preset
from fastmae.model import MaskedAutoencoderViT
from fastmae.vit import DropPath, build_classifier


def _timm():
    return pytest.importorskip("timm", reason="timm is not installed here (it needs a torchvision matching "
                                              "torch): run in the .venv-timm environment (scripts/dev.sh)")


def in_order_noise(B: int, N: int) -> torch.Tensor:
    """Noise whose argsort is the identity: masking with ratio 0 keeps every token in place."""
    return torch.arange(N, dtype=torch.float32).expand(B, N)


# ----------------------------------------------------------------------------- official format in


def test_official_format_round_trip(mae: MaskedAutoencoderViT, tmp_path: Path) -> None:
    """{"model": sd} with official names (no fastmae config, like mae_visualize_vit_*.pth) loads with the
    architecture inferred from the tensors and gives identical outputs; the encoder-only file (like
    mae_pretrain_vit_*.pth) loads into the classifier with the same features."""
    path = tmp_path / "mae_visualize_like.pth"
    torch.save({"model": mae.state_dict()}, path)
    loaded, meta = interop.load_mae(path)
    assert loaded.config.embed_dim == 192 and loaded.config.num_heads == 3 and loaded.config.depth == 2
    assert loaded.config.decoder_num_heads == 16 and not loaded.norm_pix_loss
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        a = mae(imgs, noise=noise)
        b = loaded(imgs, noise=noise)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)

    enc = tmp_path / "mae_pretrain_like.pth"
    torch.save({"model": {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}},
               enc)
    with pytest.raises(ValueError, match="without the MAE decoder"):
        interop.load_mae(enc)
    sd, meta = interop.load_checkpoint(enc)
    assert interop.checkpoint_kind(sd) == "encoder"
    clf = build_classifier(interop.infer_model_config(sd, meta), 5, global_pool=False).eval()
    missing = clf.load_encoder(sd)
    assert set(missing) == {"head.weight", "head.bias"}  # as the official fine-tuning asserts
    with torch.no_grad():
        latent, _, _ = mae.encode(imgs, 0.0, noise=in_order_noise(2, 16))
        # the classifier embeds with the conv, the MAE (gather_first) with its weights as a linear map: rounding
        torch.testing.assert_close(clf.forward_features(imgs), latent, rtol=1e-5, atol=1e-5)
    gp = build_classifier(interop.infer_model_config(sd, meta), 5, global_pool=True)
    assert set(gp.load_encoder(sd)) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def test_pos_embed_resized_for_another_image_size(mae: MaskedAutoencoderViT) -> None:
    cfg = ModelConfig(**{**vars(OFFICIAL_LIKE), "img_size": 48})
    clf = build_classifier(cfg, 3)
    clf.load_encoder(mae.state_dict())
    assert clf.pos_embed.shape == (1, 1 + 36, 192)
    torch.testing.assert_close(clf.pos_embed[:, 0], mae.pos_embed[:, 0])


# ----------------------------------------------------------------------------- timm out (CPU twins)


def test_drop_path_and_soft_target_loss_semantics() -> None:
    """CPU twin of the timm comparisons: drop path's draws and scaling, the soft-target loss formula."""
    x = torch.randn(8, 5, 4)
    torch.manual_seed(3)
    y = DropPath(0.25).train()(x)
    torch.manual_seed(3)
    keep = x.new_empty(8, 1, 1).bernoulli_(0.75)
    torch.testing.assert_close(y, x * keep / 0.75)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    t = smooth_one_hot(labels, 4, 0.0)
    torch.testing.assert_close(soft_target_cross_entropy(logits, t), torch.nn.functional.cross_entropy(logits, labels))
    t = smooth_one_hot(labels, 4, 0.1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, t),
                               torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))


# ----------------------------------------------------------------------------- timm (marked)


@pytest.mark.timm
def test_timm_export_loads_and_gives_same_features(mae: MaskedAutoencoderViT, tmp_path: Path) -> None:
    timm = _timm()
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict()}, path)
    info = interop.export_timm(path, tmp_path / "timm.pth")
    model = timm.create_model(info["timm_model"], pretrained=False, **info["kwargs"]).eval()
    model.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(imgs)  # (B, 1+N, D) after norm
        latent, _, _ = mae.encode(imgs, 0.0, noise=in_order_noise(2, 16))
    torch.testing.assert_close(feats, latent, rtol=1e-5, atol=1e-5)


@pytest.mark.timm
def test_timm_classifier_both_ways(tmp_path: Path) -> None:
    """A fastmae fine-tuned classifier (avg pool + fc_norm) is a timm model with global_pool='avg' and back."""
    timm = _timm()
    torch.manual_seed(0)
    clf = build_classifier(OFFICIAL_LIKE, 7, global_pool=True).eval()
    tsd, n, pool = interop.to_timm(clf.state_dict())
    t = timm.create_model("vit_base_patch16_224", pretrained=False,
                          **interop.timm_kwargs(OFFICIAL_LIKE, n, pool)).eval()
    t.load_state_dict(tsd, strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x), clf(x), rtol=1e-5, atol=1e-5)
    # timm -> fastmae: a timm ViT's weights load as they are
    t2 = timm.create_model("vit_base_patch16_224", pretrained=False,
                           **interop.timm_kwargs(OFFICIAL_LIKE, 7, "token")).eval()
    back = build_classifier(OFFICIAL_LIKE, 7, global_pool=False).eval()
    back.load_state_dict(t2.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), t2(x), rtol=1e-5, atol=1e-5)


@pytest.mark.timm
def test_drop_path_and_loss_match_timm() -> None:
    _timm()
    from timm.layers import DropPath as TimmDropPath
    from timm.loss import SoftTargetCrossEntropy

    x = torch.randn(16, 5, 8)
    torch.manual_seed(1)
    a = DropPath(0.3).train()(x)
    torch.manual_seed(1)
    b = TimmDropPath(0.3).train()(x)
    assert torch.equal(a, b)
    logits, t = torch.randn(6, 4), torch.softmax(torch.randn(6, 4), -1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, t), SoftTargetCrossEntropy()(logits, t))


@pytest.mark.timm
def test_batch_augment_uses_timm_mixup_and_erasing() -> None:
    _timm()
    from timm.data import Mixup

    aug = BatchAugment(ClassifierConfig(num_classes=10, augment_impl="auto"), torch.device("cpu"), 0)
    assert aug.impl == "timm" and isinstance(aug.mix, Mixup)
    x = torch.randn(8, 3, 16, 16)
    imgs, targets, w = aug(x.clone(), torch.arange(8))
    assert imgs.shape == x.shape and bool((w == 1).all())
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    # same label targets as fastmae's smoothing when mixing is off
    plain = BatchAugment(ClassifierConfig(num_classes=10, mixup=0, cutmix=0, reprob=0), torch.device("cpu"), 0)
    _, t, _ = plain(x, torch.arange(8))
    torch.testing.assert_close(t, smooth_one_hot(torch.arange(8), 10, 0.1))
    # RandAugment for loaders with a per-sample PIL hook
    from fastmae.augment import randaugment_hook

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = randaugment_hook("rand-m9-mstd0.5-inc1", 64)(im)
    assert isinstance(out, Image.Image) and out.size == (64, 64)


# ----------------------------------------------------------------------------- reconstruction picture


def test_visualize_png_size_and_blanked_masked_patches(tmp_path: Path) -> None:
    cfg = get_preset("debug")  # 64 px, patch 8: 64 patches
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(cfg.model, cfg.mask)
    ckpt = tmp_path / "mae.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, ckpt)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (70 + 10 * i, 90, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "grid.png"
    seed, ratio, scale = 5, 0.75, 2
    assert visualize.main(["--checkpoint", str(ckpt), "--folder", str(folder), "--num", "2", "--mask_ratio",
                           str(ratio), "--seed", str(seed), "--scale", str(scale), "--out", str(out)]) == 0
    png = np.asarray(Image.open(out).convert("RGB"))
    panel, p = 64 * scale, 8 * scale
    caption = visualize.caption_for(True, ratio, seed, ckpt.name)  # norm_pix_loss model: 2 caption lines
    assert len(caption) == 2
    width, height, boxes = visualize.layout(2, panel, len(caption))
    assert png.shape == (height, width, 3)
    # the mask, independently: the permutation argsort(noise) keeps its first num_kept patches
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(seed))
    keep = num_kept(64, ratio)
    for r in range(2):
        masked_ids = set(torch.argsort(noise[r])[keep:].tolist())
        (ox, oy), (mx, my) = boxes[r][0], boxes[r][1]
        n_blank = 0
        for idx in range(64):
            i, j = divmod(idx, 8)
            orig = png[oy + i * p:oy + (i + 1) * p, ox + j * p:ox + (j + 1) * p]
            shown = png[my + i * p:my + (i + 1) * p, mx + j * p:mx + (j + 1) * p]
            if idx in masked_ids:
                assert bool((shown == visualize.BLANK).all()), f"row {r} patch {idx} should be blank"
                n_blank += 1
            else:
                assert np.array_equal(shown, orig), f"row {r} patch {idx} should show the original"
        assert n_blank == 64 - keep == 48
    # an encoder-only checkpoint cannot draw reconstructions: a clear error, exit 1
    enc = tmp_path / "enc.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask"))}},
               enc)
    assert visualize.main(["--checkpoint", str(enc), "--folder", str(folder), "--out", str(out)]) == 1
