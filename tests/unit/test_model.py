"""The MAE model against the paper and the official code: embeddings, patches, masking, loss, sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastmae.kernels import random_masking_ref

import fastmae
from fastmae.config import ModelConfig
from fastmae.layers import sincos_2d
from fastmae.model import MaskedAutoencoderViT, kept_ids


def numpy_sincos_2d(dim: int, grid: int) -> np.ndarray:
    """The official formula, written out directly: first half from the w coordinate, second from h."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def test_sincos_matches_numpy_formula_and_is_fixed() -> None:
    for dim, grid in [(64, 4), (768, 14), (1280, 16)]:
        ours = sincos_2d(dim, grid).numpy()
        np.testing.assert_allclose(ours, numpy_sincos_2d(dim, grid), atol=1e-6)
    model = fastmae.create_model("debug")
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    np.testing.assert_allclose(model.pos_embed[0].numpy(), numpy_sincos_2d(96, 8), atol=1e-6)
    assert torch.all(model.pos_embed[0, 0] == 0)  # zero cls slot


def test_patchify_roundtrip_and_layout() -> None:
    model = fastmae.create_model("debug")
    imgs = torch.randn(2, 3, 64, 64)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 64, 8 * 8 * 3)
    torch.testing.assert_close(model.unpatchify(patches), imgs, rtol=0, atol=0)
    # patch (row 1, col 2), pixel (3, 4), channel 1 sits at index (3*8+4)*3+1
    assert patches[0, 1 * 8 + 2, (3 * 8 + 4) * 3 + 1] == imgs[0, 1, 8 + 3, 16 + 4]


def argsort_masking(x: torch.Tensor, ratio: float, noise: torch.Tensor):
    """Independent implementation of the official masking for comparison."""
    B, N, D = x.shape
    K = int(N * (1 - ratio))
    order = torch.argsort(noise, dim=1, stable=True)
    restore = torch.argsort(order, dim=1)
    kept = torch.stack([x[b, order[b, :K]] for b in range(B)])
    mask = torch.ones(B, N)
    for b in range(B):
        mask[b, order[b, :K]] = 0
    return kept, mask, restore


@pytest.mark.parametrize("N,ratio", [(196, 0.75), (64, 0.75), (50, 0.6), (17, 0.9)])
def test_reference_masking_contract(N: int, ratio: float) -> None:
    B, D = 3, 5
    x = torch.randn(B, N, D)
    noise = torch.rand(B, N)
    x_vis, mask, ids_restore = random_masking_ref(x, ratio, noise=noise)
    K = int(N * (1 - ratio))
    assert x_vis.shape == (B, K, D)
    assert torch.all(mask.sum(1) == N - K)
    # ids_restore inverts the shuffle
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(N).expand(B, N))
    # x_vis rows are the kept rows, and the mask is 0 exactly there
    for b in range(B):
        kept = ids_shuffle[b, :K]
        assert torch.equal(x_vis[b], x[b, kept])
        assert torch.all(mask[b, kept] == 0)
    ref = argsort_masking(x, ratio, noise)
    assert torch.equal(x_vis, ref[0]) and torch.equal(mask, ref[1]) and torch.equal(ids_restore, ref[2])
    # pos_embed is added to the gathered rows
    pos = torch.randn(N, D)
    x_vis_p, _, _ = random_masking_ref(x, ratio, noise=noise, pos_embed=pos)
    torch.testing.assert_close(x_vis_p, argsort_masking(x + pos, ratio, noise)[0])


def test_masking_seed_reproducible() -> None:
    model = fastmae.create_model("debug", masking="torch")
    x = torch.randn(4, 64, 8)
    a = model.random_masking(x, 0.75, seed=123)
    b = model.random_masking(x, 0.75, seed=123)
    c = model.random_masking(x, 0.75, seed=124)
    assert torch.equal(a[2], b[2]) and not torch.equal(a[2], c[2])


def test_model_forward_official_shapes_and_same_noise_same_result() -> None:
    model = fastmae.create_model("debug")
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 64)
    loss, pred, mask = model(imgs, noise=noise)
    assert pred.shape == (2, 64, 192) and mask.shape == (2, 64) and loss.ndim == 0
    loss2, pred2, mask2 = model(imgs, noise=noise)
    assert torch.equal(pred, pred2) and torch.equal(mask, mask2) and loss == loss2
    assert torch.equal(mask, random_masking_ref(torch.zeros(2, 64, 1), 0.75, noise=noise)[1])
    # the official positional call forward(imgs, mask_ratio) still works
    _, _, m = model(imgs, 0.5)
    assert torch.all(m.sum(1) == 32)


def test_loss_only_on_masked_patches_and_norm_pix_target() -> None:
    model = fastmae.create_model("debug")
    imgs = torch.randn(2, 3, 64, 64)
    _, pred, mask = model(imgs, noise=torch.rand(2, 64))
    pred = pred.detach()
    base = model.loss(imgs, pred, mask)
    changed = pred + 5.0 * (1 - mask).unsqueeze(-1)  # change only visible positions
    assert torch.equal(model.loss(imgs, changed, mask), base)
    changed_masked = pred + 5.0 * mask.unsqueeze(-1)
    assert model.loss(imgs, changed_masked, mask) != base
    # norm_pix target: per patch zero mean, unit (unbiased) variance
    t = model.target(imgs)
    p = model.patchify(imgs)
    expect = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True, unbiased=True) + 1e-6) ** 0.5
    torch.testing.assert_close(t, expect)
    plain = fastmae.create_model("debug", norm_pix_loss=False)
    assert torch.equal(plain.target(imgs), p)
    # loss equals the hand-written masked MSE
    manual = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(base, manual)


@pytest.mark.parametrize("name,expected_m", [
    ("mae_vit_base_patch16", 86), ("mae_vit_large_patch16", 304), ("mae_vit_huge_patch14", 632),
])
def test_encoder_param_counts_match_paper(name: str, expected_m: float) -> None:
    with torch.device("meta"):
        model = fastmae.create_model(name)
    encoder = sum(p.numel() for n, p in model.named_parameters()
                  if not n.startswith(("decoder", "mask_token")))  # pos_embed counted, as timm's ViT does
    assert abs(encoder / 1e6 - expected_m) / expected_m < 0.01, encoder
    from fastmae.flops import encoder_param_count

    assert encoder_param_count(name) == encoder - model.pos_embed.numel()


def test_attention_backends_agree() -> None:
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 64)
    outs = {}
    for backend in ("math", "sdpa", "auto"):
        torch.manual_seed(1)
        model = fastmae.create_model("debug", attention=backend)
        outs[backend] = model(imgs, noise=noise)[1]
    torch.testing.assert_close(outs["math"], outs["sdpa"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["auto"], outs["sdpa"])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the CPU flash kernel
        torch.manual_seed(1)
        model = fastmae.create_model("debug", attention="sdpa")
        torch.testing.assert_close(model(imgs, noise=noise)[1], outs["math"], rtol=1e-4, atol=1e-5)
    # bf16 agrees within bf16 tolerance
    torch.manual_seed(1)
    model = fastmae.create_model("debug", attention="math").to(torch.bfloat16)
    math_bf16 = model(imgs, noise=noise)[1].float()
    for blk in [*model.blocks, *model.decoder_blocks]:
        blk.attn.backend = "sdpa"
    torch.testing.assert_close(model(imgs, noise=noise)[1].float(), math_bf16, rtol=0.05, atol=0.05)
    with pytest.raises(RuntimeError, match="flash"):
        fastmae.create_model("debug", attention="flash")(imgs)


def test_encoder_with_mask_tokens_variant() -> None:
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 64)
    skip = fastmae.create_model("debug")
    full = fastmae.create_model("debug", encoder_mask_tokens=True)
    lat_skip, mask, _ = skip.encode(imgs, 0.75, noise=noise)
    lat_full, mask_full, _ = full.encode(imgs, 0.75, noise=noise)
    assert lat_skip.shape == (2, 1 + 16, 96) and lat_full.shape == (2, 1 + 64, 96)
    assert torch.equal(mask, mask_full)
    assert skip.tokens_per_encoder_pass() == 17 and full.tokens_per_encoder_pass() == 65
    loss, pred, _ = full(imgs, noise=noise)
    assert pred.shape == (2, 64, 192) and torch.isfinite(loss)
    loss.backward()
    assert full.encoder_mask_token.grad is not None and full.encoder_mask_token.grad.abs().sum() > 0
    assert "encoder_mask_token" not in skip.state_dict()


def test_official_parameter_names() -> None:
    names = set(fastmae.create_model("debug").state_dict())
    for n in ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
              "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight",
              "decoder_embed.weight", "mask_token", "decoder_pos_embed", "decoder_blocks.1.attn.qkv.weight",
              "decoder_norm.weight", "decoder_pred.weight", "decoder_pred.bias"]:
        assert n in names, n


def test_initialisation_as_official() -> None:
    torch.manual_seed(0)
    model = fastmae.create_model("mae_vit_base_patch16", depth=1, decoder_depth=1)
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert torch.all(model.norm.weight == 1)
    assert abs(model.cls_token.std().item() - 0.02) < 0.003
    # xavier_uniform on the patch-embed weight viewed as a (D, 3*p*p) linear
    w = model.patch_embed.proj.weight
    bound = (6 / (w.shape[0] + w[0].numel())) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_create_model_errors_list_valid_names() -> None:
    with pytest.raises(fastmae.ConfigError, match="valid arguments: .*decoder_depth"):
        fastmae.create_model("debug", decoder_layers=3)
    with pytest.raises(fastmae.ConfigError, match="valid presets: mae_vit_base_patch16"):
        fastmae.create_model("vit_base")
    with pytest.raises(fastmae.ConfigError, match="img_size=100 is not divisible by model.patch_size=16"):
        MaskedAutoencoderViT(ModelConfig(img_size=100))


def test_gather_first_patch_embedding_equals_the_official_conv_order() -> None:
    """Gathering the visible pixel patches and embedding them with the conv's weights as a linear map gives the
    official conv-then-gather numbers (same state dict, same masks; fp32 to rounding, bf16 autocast close), with
    a quarter of the patch-embedding FLOPs at ratio 0.75."""
    torch.manual_seed(0)
    conv = fastmae.create_model("debug", masking="torch", patch_embed_order="embed_first")
    lin = fastmae.create_model("debug", masking="torch", patch_embed_order="gather_first")
    lin.load_state_dict(conv.state_dict(), strict=True)
    assert lin.gather_first and not conv.gather_first
    imgs = torch.randn(4, 3, 64, 64)
    for kw in ({"noise": torch.rand(4, 64)}, {"mask_seed": 123}):
        out = []
        for m in (conv, lin):
            m.zero_grad(set_to_none=True)
            loss, pred, mask = m(imgs, **kw)
            loss.backward()
            out.append((loss, pred, mask, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        (la, pa, ma, ga), (lb, pb, mb, gb) = out
        assert torch.equal(ma, mb)
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
        assert ga.keys() == gb.keys() and "patch_embed.proj.weight" in ga
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la = conv(imgs, mask_seed=5)[0]
        lb = lin(imgs, mask_seed=5)[0]
    assert abs(float(la) - float(lb)) <= 0.02 * abs(float(la))
    # kept_ids is the reference's ids_shuffle[:, :K]
    noise = torch.rand(5, 49)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    _, _, ids_restore = random_masking_ref(torch.zeros(5, 49, 1), 0.75, noise=noise)
    assert torch.equal(kept_ids(ids_restore, 12), ids_shuffle[:, :12])
    from fastmae.flops import mae_flops

    assert mae_flops(lin.config).patch_embed * 4 == mae_flops(conv.config).patch_embed
    # the "w/ [M]" variant embeds every patch whatever the order
    assert not fastmae.create_model("debug", encoder_mask_tokens=True, patch_embed_order="gather_first").gather_first
