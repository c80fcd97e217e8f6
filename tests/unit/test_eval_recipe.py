"""Fine-tuning, linear probing and evaluation on CPU, in the test process: the recipe's pieces (layer decay, drop
path, LARS, BatchNorm head, batch augmentations, top-k) and a real learning signal on a two-class synthetic set.
Both programs through DeepSpeed: tests/integration/test_eval.py."""

from __future__ import annotations

import pytest
import torch

from fastmae.augment import BatchAugment, BatchMixup, BatchRandomErasing, smooth_one_hot, soft_target_cross_entropy
from fastmae.config import ClassifierConfig, ConfigError, ModelConfig, get_preset
from fastmae.evaluation import PAD_LABEL, evaluate
from fastmae.finetune import parse_program_args
from fastmae.lars import LARS
from fastmae.optim import build_adamw, param_groups
from fastmae.recipes import finetune_recipe, linprobe_recipe
from fastmae.vit import DropPath, build_classifier, layer_decay_scale, layer_id

TINY = ModelConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                   decoder_depth=1, decoder_num_heads=4)


# ----------------------------------------------------------------------------- recipe pieces


def test_layer_decay_values_match_formula() -> None:
    """lr scale of every parameter = decay ** (depth + 1 - layer), layer 0 = embeddings, depth+1 = head."""
    cfg = get_preset("debug").model  # depth 4
    model = build_classifier(cfg, 10)
    decay, depth = 0.75, cfg.depth
    groups = param_groups(model, 0.05, model.no_weight_decay(), lambda n: layer_decay_scale(n, depth, decay))
    scale_of = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert set(scale_of) == {n for n, p in model.named_parameters()}
    for name, scale in scale_of.items():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            expected = decay ** (depth + 1)
        elif name.startswith("blocks."):
            i = int(name.split(".")[1])
            expected = decay ** (depth - i)
        else:  # fc_norm, head
            expected = 1.0
        assert scale == pytest.approx(expected), name
    assert layer_id("blocks.3.mlp.fc1.weight", depth + 1) == 4 and layer_id("head.weight", depth + 1) == 5
    # the optimizer's groups start at lr * scale, and weight decay skips norms, biases, tokens, pos_embed
    opt = build_adamw(groups, get_preset("debug").optim, 1e-3, torch.device("cpu"))
    for g, src in zip(opt.param_groups, groups, strict=True):
        assert g["lr"] == pytest.approx(1e-3 * src["lr_scale"])
        for n in src["names"]:
            no_wd = n.endswith(".bias") or "norm" in n or n in ("cls_token", "pos_embed")
            assert (g["weight_decay"] == 0.0) == no_wd, n


def test_drop_path_per_sample_and_linear_schedule() -> None:
    dp = DropPath(0.5)
    x = torch.randn(256, 3, 4)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = (y != 0).flatten(1).all(dim=1)
    dropped = (y == 0).flatten(1).all(dim=1)
    assert bool((kept | dropped).all())  # whole samples, never parts
    torch.testing.assert_close(y[kept], x[kept] / 0.5)
    assert 0.3 < kept.float().mean().item() < 0.7
    model = build_classifier(get_preset("debug").model, 10, drop_path=0.3)
    rates = [blk.drop_path1.p for blk in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_lars_step_matches_formula() -> None:
    w = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(torch.randn(5))
    opt = LARS([w, b], lr=0.1, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)
    gw, gb = torch.randn(5, 4), torch.randn(5)
    w0, b0 = w.detach().clone(), b.detach().clone()
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # by hand: trust-ratio-scaled update with weight decay, heavy-ball momentum over two steps
    u1 = gw + 0.01 * w0
    u1 = u1 * (0.001 * w0.norm() / u1.norm())
    w1 = w0 - 0.1 * u1
    u2 = gw + 0.01 * w1
    u2 = u2 * (0.001 * w1.norm() / u2.norm())
    w2 = w1 - 0.1 * (0.9 * u1 + u2)
    torch.testing.assert_close(w.detach(), w2)
    torch.testing.assert_close(b.detach(), b0 - 0.1 * gb - 0.1 * 1.9 * gb)  # 1-D: no decay, no scaling
    z = torch.nn.Parameter(torch.zeros(3, 3))  # zero weight norm: trust ratio 1
    z.grad = torch.randn(3, 3)
    LARS([z], lr=0.1).step()
    torch.testing.assert_close(z.detach(), -0.1 * z.grad)


def test_probe_head_batchnorm_has_no_affine_parameters() -> None:
    model = build_classifier(get_preset("debug").model, 10, global_pool=False, head_bn=True)
    bn = model.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d)
    assert not bn.affine and bn.weight is None and bn.bias is None and bn.eps == 1e-6
    assert [n for n, _ in model.head.named_parameters()] == ["1.weight", "1.bias"]


def test_smoothing_mixup_cutmix_and_erasing() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    t = smooth_one_hot(labels, 10, 0.1)
    assert t[0, 0].item() == pytest.approx(0.91) and t[0, 1].item() == pytest.approx(0.01)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    x = torch.randn(4, 3, 16, 16)
    mix = BatchMixup(0.8, 0.0, 1.0, 0.5, 0.1, 10, seed=1)
    lam, _ = BatchMixup(0.8, 0.0, 1.0, 0.5, 0.1, 10, seed=1)._params()
    xm, tm = mix(x, labels)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(tm, lam * t + (1 - lam) * t.flip(0))
    cut = BatchMixup(0.0, 1.0, 1.0, 0.5, 0.0, 10, seed=3)
    xc, tc = cut(x, labels)
    changed = (xc != x).any(dim=1)[0].float().mean().item()  # share of pixels taken from the partner
    assert tc[0, 0].item() == pytest.approx(1 - changed, abs=1e-6)
    assert tc[0, 3].item() == pytest.approx(changed, abs=1e-6)
    erase = BatchRandomErasing(1.0, seed=0)
    xe = erase(x.clone())
    frac = (xe != x).any(dim=1).flatten(1).float().mean(1)
    assert bool(((frac >= 0.015) & (frac <= 0.34)).all())
    # the program's augmentation: padding samples get weight 0, targets are distributions
    aug = BatchAugment(ClassifierConfig(num_classes=10, augment_impl="fastmae"), torch.device("cpu"), 0)
    imgs, targets, w = aug(x.clone(), torch.tensor([1, 2, 3, PAD_LABEL]))
    assert w.tolist() == [1, 1, 1, 0] and imgs.shape == x.shape
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    logits = torch.randn(4, 10)
    ref = -(targets * torch.log_softmax(logits, -1)).sum(-1)
    assert soft_target_cross_entropy(logits, targets, w).item() == pytest.approx(ref[:3].mean().item(), rel=1e-6)


def test_evaluate_top1_top5_ignores_padding() -> None:
    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, 0, :7]  # the "image" carries its logits

    logits = torch.tensor([[9, 8, 7, 6, 5, 4, 3]] * 4, dtype=torch.float32)
    imgs = logits[:, None, None, :].expand(4, 3, 1, 7).clone()
    labels = torch.tensor([0, 3, 6, PAD_LABEL])  # top-1 hit, top-5 hit, miss, padding

    class Loader:
        def set_epoch(self, e: int) -> None:
            pass

        def __iter__(self):
            yield imgs, labels

    stats = evaluate(Fixed(), Loader(), "cpu")
    assert stats["count"] == 3
    assert stats["acc1"] == pytest.approx(100 / 3) and stats["acc5"] == pytest.approx(200 / 3)


def test_recipes_and_overrides() -> None:
    cfg = finetune_recipe("mae_vit_base_patch16")
    cls = cfg.cls
    assert (cfg.optim.base_lr, cls.layer_decay, cls.drop_path, cfg.train.epochs) == (5e-4, 0.65, 0.1, 100)
    assert (cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.warmup_epochs, cfg.train.batch_size) == \
        (0.999, 0.05, 5.0, 1024)
    assert (cls.smoothing, cls.mixup, cls.cutmix, cls.reprob, cls.global_pool) == (0.1, 0.8, 1.0, 0.25, True)
    cfg = finetune_recipe("mae_vit_huge_patch14")
    cls = cfg.cls
    assert (cfg.optim.base_lr, cls.layer_decay, cls.drop_path, cfg.train.epochs) == (1e-3, 0.75, 0.2, 50)
    cfg = linprobe_recipe("mae_vit_large_patch16")
    cls = cfg.cls
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs, cfg.train.epochs) == \
        (0.1, 0.0, 10.0, 90)
    assert (cls.global_pool, cls.mixup, cls.cutmix, cls.reprob, cls.smoothing) == (False, 0.0, 0.0, 0.0, 0.0)
    _, cfg, _ = parse_program_args("x", "x", finetune_recipe,
                                   ["--preset", "debug", "cls.mixup=0", "--cls.num_classes", "7", "train.steps=3"])
    assert (cfg.cls.mixup, cfg.cls.num_classes, cfg.train.steps) == (0.0, 7, 3)
    with pytest.raises(ConfigError, match="valid keys in \\[cls\\]"):
        parse_program_args("x", "x", finetune_recipe, ["--preset", "debug", "cls.mixups=0"])
    with pytest.raises(ConfigError, match="augment_impl"):
        parse_program_args("x", "x", finetune_recipe, ["--preset", "debug", "cls.augment_impl=dali"])
    with pytest.raises(ConfigError, match="cls.randaug"):
        parse_program_args("x", "x", finetune_recipe, ["--preset", "debug", "cls.randaug=rand-m12"])
    # keys the program would ignore are refused, naming them
    with pytest.raises(ConfigError, match="mask.ratio is not used by finetune"):
        parse_program_args("fastmae/finetune.py", "x", finetune_recipe, ["--preset", "debug", "mask.ratio=0.5"])
    with pytest.raises(ConfigError, match="model.decoder_depth is not used"):
        parse_program_args("fastmae/finetune.py", "x", finetune_recipe, ["--preset", "debug", "model.decoder_depth=2"])
    from fastmae.recipes import PROBE_IGNORED

    with pytest.raises(ConfigError, match="cls.layer_decay is not used by linprobe"):
        parse_program_args("fastmae/linprobe.py", "x", linprobe_recipe, ["--preset", "debug", "cls.layer_decay=0.5"],
                           PROBE_IGNORED)


# ----------------------------------------------------------------------------- a real learning signal


def two_class_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: horizontal stripes, class 1: vertical stripes, random phase and noise: (n,3,32,32), (n,)."""
    labels = torch.randint(0, 2, (n,), generator=gen)
    coords = torch.arange(32).float()
    phase = torch.rand(n, 1, 1, generator=gen) * 6.28
    rows = torch.sin(coords[None, :, None] * 0.8 + phase).expand(n, 32, 32)
    cols = torch.sin(coords[None, None, :] * 0.8 + phase).expand(n, 32, 32)
    img = torch.where(labels[:, None, None] == 0, rows, cols)
    img = img[:, None].expand(n, 3, 32, 32) + 0.5 * torch.randn(n, 3, 32, 32, generator=gen)
    return img.contiguous(), labels


def test_two_class_synthetic_set_reaches_high_accuracy() -> None:
    """The fine-tuning recipe's pieces (layer decay AdamW, drop path, smoothing, soft-target loss) learn a
    simple two-class task from random init in a few dozen CPU steps."""
    gen = torch.Generator().manual_seed(0)
    model = build_classifier(TINY, 2, global_pool=True, drop_path=0.1)
    groups = param_groups(model, 0.05, model.no_weight_decay(), lambda n: layer_decay_scale(n, TINY.depth, 0.75))
    opt = build_adamw(groups, get_preset("debug").optim, 1e-3, torch.device("cpu"), betas=(0.9, 0.999))
    aug = BatchAugment(ClassifierConfig(num_classes=2, mixup=0, cutmix=0, reprob=0, smoothing=0.1,
                                        augment_impl="fastmae"), torch.device("cpu"), 0)
    model.train()
    for _ in range(40):
        x, y = two_class_images(32, gen)
        x, t, w = aug(x, y)
        loss = soft_target_cross_entropy(model(x), t, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = two_class_images(256, gen)

    class Loader:
        def set_epoch(self, e: int) -> None:
            pass

        def __iter__(self):
            yield x, y

    stats = evaluate(model, Loader(), "cpu")
    assert stats["acc1"] >= 90.0, stats
