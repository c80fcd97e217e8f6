"""Hugging Face ViTMAE interop both ways (fastmae/hf.py, ``python -m fastmae.interop export-hf | import-hf``): strict
loads on either side, the same loss, predictions and features for the same noise, the fine-tuning start from an
imported (or a not yet imported) checkpoint, and clear errors. Every model is built here from a config: nothing is
downloaded. Needs transformers and safetensors (``pip install 'fastmae[hf]'``); skipped with a reason without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fastmae import hf, interop
from fastmae.config import config_from_dict, get_preset
from fastmae.finetune import build_model, parse_program_args
from fastmae.model import MaskedAutoencoderViT
from fastmae.recipes import PROBE_DESCRIPTION, PROBE_IGNORED, linprobe_recipe
from fastmae.vit import build_classifier

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install 'fastmae[hf]'")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed: "
                                                                   "pip install 'fastmae[hf]'")


def perturb(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Every parameter moved off its initial value (the initial biases are zeros and the LayerNorms (1, 0): a
    swapped bias or norm would go unnoticed)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def debug_mae(tmp_path: Path, ratio: float = 0.6) -> tuple[MaskedAutoencoderViT, Path]:
    """The debug preset with perturbed weights, saved as a fastmae file whose config has mask.ratio ``ratio``."""
    cfg = get_preset("debug")
    cfg.mask.ratio = ratio
    torch.manual_seed(0)
    mae = perturb(MaskedAutoencoderViT(cfg.model, cfg.mask))
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict(), "config": cfg.to_dict()}, path)
    return mae, path


def hf_config(**kw) -> transformers.ViTMAEConfig:
    """A small ViTMAE (img 32, patch 8, 64 wide, MLP ratio 2) of transformers' own, with ``kw`` on top."""
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                decoder_intermediate_size=64, layer_norm_eps=1e-6, norm_pix_loss=True, mask_ratio=0.5)
    return transformers.ViTMAEConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- export


def test_export_loads_strictly_with_the_same_loss_and_prediction(tmp_path: Path) -> None:
    mae, path = debug_mae(tmp_path)
    out = tmp_path / "hf"
    assert interop.main(["export-hf", str(path), str(out)]) == 0
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    c, m = model.config, mae.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (96, 4, 4, 384)
    assert (c.decoder_hidden_size, c.decoder_num_hidden_layers, c.decoder_num_attention_heads,
            c.decoder_intermediate_size) == (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, 256)
    assert (c.image_size, c.patch_size, c.num_channels, c.mask_ratio, c.norm_pix_loss) == (64, 8, 3, 0.6, True)
    assert (c.layer_norm_eps, c.hidden_act, c.qkv_bias) == (1e-6, "gelu", True)
    # the Hub's names (those of facebook/vit-mae-*), the fused qkv split row-exactly into query | key | value
    stored = safetensors_torch.load_file(out / "model.safetensors")
    qkv = mae.state_dict()["blocks.1.attn.qkv.weight"]
    for i, part in enumerate(("query", "key", "value")):
        assert torch.equal(stored[f"vit.encoder.layer.1.attention.attention.{part}.weight"], qkv[96 * i:96 * (i + 1)])
    assert "decoder.decoder_layers.1.output.dense.bias" in stored
    model.eval()
    imgs, noise = torch.randn(3, 3, 64, 64), torch.rand(3, 64)
    with torch.no_grad():
        loss, pred, mask = mae(imgs, noise=noise)
        ref = model(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, ref.mask) and int(mask[0].sum()) == 64 - 25  # int(64 * (1 - 0.6)) kept
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred, ref.logits, rtol=1e-5, atol=1e-5)


def test_export_of_an_encoder_only_checkpoint_is_a_vitmae_model(tmp_path: Path) -> None:
    """An official ``mae_pretrain_vit_*.pth``-like file (encoder, no config) -> ``ViTMAEModel``, same latent."""
    mae, _ = debug_mae(tmp_path)
    enc = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain_like.pth"
    torch.save({"model": enc}, path)
    info = interop.export_hf(path, tmp_path / "enc", preset="debug")
    assert (info["class"], info["kind"]) == ("ViTMAEModel", "encoder")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    model, loading = transformers.ViTMAEModel.from_pretrained(tmp_path / "enc", output_loading_info=True)
    assert (loading["missing_keys"], loading["unexpected_keys"]) == (set(), set())
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    with torch.no_grad():
        latent, _, _ = mae.encode(imgs, 0.75, noise=noise)  # exported without a config: mask_ratio 0.75
        ref = model.eval()(pixel_values=imgs, noise=noise).last_hidden_state
    torch.testing.assert_close(latent, ref, rtol=1e-5, atol=1e-5)


def test_fastmae_sincos_layer_norm_and_gelu_are_those_of_transformers() -> None:
    """What export writes into config.json and the position embeddings it stores are transformers' own."""
    from transformers.activations import ACT2FN
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder, ViTMAEEmbeddings

    cfg = get_preset("debug").model
    mae = MaskedAutoencoderViT(cfg)
    hf_cfg = transformers.ViTMAEConfig(**hf.hf_config_fields(cfg, 0.75))
    emb = ViTMAEEmbeddings(hf_cfg)
    emb.initialize_weights()  # transformers' fixed sin-cos (what from_pretrained keeps when a file lacks it)
    torch.testing.assert_close(emb.position_embeddings, mae.pos_embed, rtol=0, atol=1e-7)
    dec = ViTMAEDecoder(hf_cfg, num_patches=mae.num_patches)
    torch.testing.assert_close(dec.decoder_pos_embed, mae.decoder_pos_embed, rtol=0, atol=1e-7)
    clf = build_classifier(cfg, 3, global_pool=True)
    eps = {m.eps for net in (mae, clf) for m in net.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {hf.LAYER_NORM_EPS}
    x = torch.linspace(-4, 4, 101)
    act = next(m for m in mae.modules() if isinstance(m, nn.GELU))
    torch.testing.assert_close(act(x), ACT2FN[hf.HIDDEN_ACT](x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- import


def test_import_of_a_pretraining_model_gives_its_loss(tmp_path: Path) -> None:
    hf_model = perturb(transformers.ViTMAEForPreTraining(hf_config()))
    folder = tmp_path / "hf"
    hf_model.save_pretrained(folder)  # transformers' own writer
    out = tmp_path / "imported.pth"
    assert interop.main(["import-hf", str(folder), str(out)]) == 0
    blob = torch.load(out, weights_only=True)
    cfg = config_from_dict(blob["config"])
    m = cfg.model
    assert (m.embed_dim, m.depth, m.num_heads, m.mlp_ratio, m.decoder_embed_dim, m.decoder_num_heads) == \
        (64, 2, 4, 2.0, 32, 2)
    assert (m.img_size, m.patch_size, m.norm_pix_loss, cfg.mask.ratio) == (32, 8, True, 0.5)
    mae = MaskedAutoencoderViT(m, cfg.mask)
    mae.load_state_dict(blob["model"], strict=True)  # pre-training starts from it
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        loss, pred, mask = mae.eval()(imgs, noise=noise)
        ref = hf_model(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, ref.mask)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred, ref.logits, rtol=1e-5, atol=1e-5)
    # load_mae (reconstructions) reads the folder itself, no import step (it builds the default mask ratio)
    direct, meta = interop.load_mae(folder)
    assert any("pos_embed is not the fixed 2-D sin-cos" in n for n in meta["notes"])  # perturbed above
    with torch.no_grad():
        torch.testing.assert_close(direct(imgs, noise=noise, mask_ratio=0.5)[0], ref.loss, rtol=1e-5, atol=1e-5)
    # transformers 5's in-memory names in a single file (no config.json: architecture from the tensors), and a
    # sharded save_pretrained folder, give the same tensors
    single = tmp_path / "single" / "weights.safetensors"
    single.parent.mkdir()
    safetensors_torch.save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, single)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for source in (single, tmp_path / "sharded"):
        sd, _ = interop.load_checkpoint(source)
        assert sd.keys() == blob["model"].keys() and all(torch.equal(sd[k], blob["model"][k]) for k in sd)


def test_import_of_an_encoder_only_model_starts_fine_tuning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A ``ViTMAEModel`` (Hub default layer_norm_eps 1e-12, mask_ratio 0: every patch kept, shuffled) -> an
    encoder-only file; the linear-probing / fine-tuning start gives HF's cls-token features (permutation
    invariant), from the imported file and from the folder itself; pre-training from it is refused."""
    hf_model = perturb(transformers.ViTMAEModel(hf_config(layer_norm_eps=1e-12, mask_ratio=0.0)))
    folder = tmp_path / "hf_encoder"
    hf_model.save_pretrained(folder)
    out = tmp_path / "encoder.pth"
    assert interop.main(["import-hf", str(folder), str(out)]) == 0
    said = capsys.readouterr().out
    assert "encoder only" in said and "layer_norm_eps=1e-12" in said and "mask_ratio=0.0" in said
    sd = torch.load(out, weights_only=True)["model"]
    assert interop.checkpoint_kind(sd) == "encoder" and not any(k.startswith(("decoder", "mask_token")) for k in sd)
    with pytest.raises(ValueError, match="without the MAE decoder"):
        interop.load_mae(out)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf_model(pixel_values=imgs).last_hidden_state[:, 0]
    for source in (out, folder):
        _, cfg, loaded = parse_program_args("fastmae/linprobe.py", PROBE_DESCRIPTION, linprobe_recipe,
                                            ["--checkpoint", str(source)], PROBE_IGNORED)
        clf, what = build_model(cfg, loaded, probe=True)
        assert what.startswith("encoder checkpoint") and cfg.model.num_heads == 4
        with torch.no_grad():
            feats = clf.eval().forward_features(imgs)[:, 0]
        torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-4)  # eps 1e-6 here, 1e-12 there


# ----------------------------------------------------------------------------- command line


def test_cli_round_trip_and_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mae, path = debug_mae(tmp_path)
    assert interop.main(["export-hf", str(path), str(tmp_path / "hf")]) == 0
    assert interop.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    own = mae.state_dict()
    assert back["model"].keys() == own.keys() and all(torch.equal(back["model"][k], own[k]) for k in own)
    assert back["config"]["model"] == get_preset("debug").to_dict()["model"] and back["config"]["preset"] == "debug"
    assert back["config"]["mask"]["ratio"] == 0.6
    capsys.readouterr()

    def fails(argv: list[str], *words: str) -> None:
        assert interop.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["import-hf", str(empty), str(tmp_path / "x.pth")], str(empty), "not a Hugging Face checkpoint")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    fails(["import-hf", str(bert), str(tmp_path / "x.pth")], str(bert), "'bert'", "not ViTMAE")
    gelu_tanh = tmp_path / "gelu_tanh"
    transformers.ViTMAEForPreTraining(hf_config(hidden_act="gelu_pytorch_tanh")).save_pretrained(gelu_tanh)
    capsys.readouterr()  # transformers' progress bar
    fails(["import-hf", str(gelu_tanh), str(tmp_path / "x.pth")], "hidden_act='gelu_pytorch_tanh'", "'gelu'")
    fails(["import-hf", str(tmp_path / "missing"), str(tmp_path / "x.pth")], "missing", "does not exist")
    clf = tmp_path / "clf.pth"
    torch.save({"model": build_classifier(get_preset("debug").model, 10).state_dict()}, clf)
    fails(["--preset", "debug", "export-hf", str(clf), str(tmp_path / "clf_hf")], str(clf), "classifier",
          "export-timm")
    assert not (tmp_path / "x.pth").exists()
