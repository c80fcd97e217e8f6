"""Hugging Face ViTMAE checkpoints both ways: the tensor mapping between the official MAE names (fastmae's) and
``transformers``' ViTMAE, the ``config.json`` fields, and reading / writing the files.

Written folders use the Hub's layout (``vit.encoder.layer.N.attention.attention.query.weight``, ...: the names of
``facebook/vit-mae-*``), which every transformers release with ViTMAE loads; transformers 5 renames them to its
in-memory names (``vit.layers.N.attention.q_proj.weight``, ...) on load. Both namings are read. fastmae's fused
``attn.qkv`` (3D x D, rows q | k | v) is split into query/key/value and concatenated back exactly.

transformers is only needed to write ``config.json`` (``ViTMAEConfig``); reading needs safetensors for
``.safetensors`` files and nothing else: ``pip install 'fastmae[hf]'``. The command line is
``python -m fastmae.interop export-hf | import-hf`` (fastmae/interop.py).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, MaskConfig, ModelConfig, get_preset, preset_names
from .layers import sincos_2d
from .model import MaskedAutoencoderViT

INSTALL_HINT = "pip install 'fastmae[hf]'"
# the eps of every LayerNorm of fastmae's models (fastmae/layers.py, model.py, vit.py; the official MAE's)
LAYER_NORM_EPS = 1e-6
HIDDEN_ACT = "gelu"  # exact (erf) GELU: torch.nn.GELU() in fastmae.layers.Mlp, ACT2FN["gelu"] in transformers
MODEL_TYPE = "vit_mae"
PRETRAINING, ENCODER = "ViTMAEForPreTraining", "ViTMAEModel"
# weight files of a save_pretrained folder, in the order transformers prefers them
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ENCODER_PREFIX = "vit."  # ViTMAEForPreTraining's encoder; a ViTMAEModel has its keys without it

# official (timm) block parameter -> Hub name within a ViTMAE layer; attn.qkv is split into _QKV
_BLOCK = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# transformers 5's in-memory names within a layer -> the Hub's
_V5_NAMES = {"attention.q_proj": _QKV[0], "attention.k_proj": _QKV[1], "attention.v_proj": _QKV[2],
             "attention.o_proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
             "mlp.fc2": "output.dense"}
# official name -> Hub name outside the layers (encoder ones take ENCODER_PREFIX in a ViTMAEForPreTraining)
_ENCODER_TOP = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_DECODER_TOP = {k: f"decoder.{k}" for k in (
    "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
    "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")}
_OFFICIAL_BLOCK = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
# encoder layers: Hub "encoder.layer.N", transformers 5 "layers.N"; decoder layers: Hub "decoder_layers.N",
# transformers 5.x's save_pretrained "decoder_encoder.layer.N"
_HUB_LAYER = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_HUB_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")
# architecture fields a preset fixes (the rest are run settings)
_ARCH_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
_DECODER_FIELDS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")


class HFUnavailableError(ImportError, ValueError):
    """transformers or safetensors, which the Hugging Face interop needs, is not installed (a ValueError too, so
    that the programs that read checkpoints report it as the bad-input error it is)."""


def _require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise HFUnavailableError(f"{what} needs the {module.split('.')[0]} package: {INSTALL_HINT}") from None


# ----------------------------------------------------------------------------- files


def _config_json(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` of a folder (or the one beside a weight file) when it is a Hugging Face one."""
    folder = path if path.is_dir() else path.parent
    f = folder / "config.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and "model_type" in d else None


def is_hf_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint: a folder with a ``config.json`` of transformers or one of
    its weight files, or a ``.safetensors`` / ``.bin`` file."""
    p = Path(path)
    if p.is_dir():
        return _config_json(p) is not None or any((p / f).is_file() for f in WEIGHT_FILES)
    return p.is_file() and p.suffix in (".safetensors", ".bin")


def _weight_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no weights in {folder}: looked for {', '.join(WEIGHT_FILES)}")


def _read_file(f: Path, torch_load: Callable[[Path], Any]) -> dict[str, torch.Tensor]:
    if f.name.endswith(".index.json"):  # a sharded checkpoint: every shard its weight map names
        shards = sorted(set(json.loads(f.read_text()).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{f} names no weight files (empty weight_map)")
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(_read_file(f.parent / s, torch_load))
        return out
    if f.suffix == ".safetensors":
        st = _require("safetensors.torch", f"reading {f}")
        try:
            return st.load_file(str(f), device="cpu")
        except Exception as e:  # safetensors' own error type: a damaged or truncated file
            raise ValueError(f"cannot read {f} as safetensors: {e}") from None
    obj = torch_load(f)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{f} holds no state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_hf(path: str | Path, torch_load: Callable[[Path], Any]) -> tuple[dict[str, torch.Tensor],
                                                                          dict[str, Any] | None]:
    """(tensors under their Hugging Face names, ``config.json`` or None) of a ``save_pretrained`` folder or a
    single weight file (``torch_load`` reads ``.bin`` files). Refuses a transformers model other than ViTMAE."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    cfg = _config_json(p)
    if cfg is not None and cfg.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{p} is a Hugging Face {cfg.get('model_type')!r} model, not ViTMAE (model_type "
                         f"{MODEL_TYPE!r}: {PRETRAINING} or {ENCODER})")
    tensors = _read_file(_weight_file(p) if p.is_dir() else p, torch_load)
    if not tensors:
        raise ValueError(f"no tensors in {p}")
    return tensors, cfg


# ----------------------------------------------------------------------------- names: fastmae -> Hub


def _to_hub_key(k: str, v: torch.Tensor, enc: str) -> list[tuple[str, torch.Tensor]]:
    if m := _OFFICIAL_BLOCK.match(k):
        group, i, mod, p = m.groups()
        base = f"{enc}encoder.layer.{i}" if group == "blocks" else f"decoder.decoder_layers.{i}"
        if mod == "attn.qkv":  # (3D[, D]) rows q | k | v, each head-major as transformers' projections
            return [(f"{base}.{n}.{p}", t) for n, t in zip(_QKV, v.chunk(3, dim=0), strict=True)]
        if mod in _BLOCK:
            return [(f"{base}.{_BLOCK[mod]}.{p}", v)]
    if k in _ENCODER_TOP:
        return [(enc + _ENCODER_TOP[k], v)]
    if k in _DECODER_TOP:
        return [(_DECODER_TOP[k], v)]
    raise ValueError(f"{k!r} has no Hugging Face ViTMAE equivalent (only MAE encoder and decoder weights do: "
                     "not a classifier head nor the 'encoder w/ [M]' variant's mask token)")


def to_hub(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An MAE (encoder + decoder) or encoder state dict in official names -> Hub-named fp32 tensors of a
    ``ViTMAEForPreTraining`` or ``ViTMAEModel``."""
    enc = ENCODER_PREFIX if "decoder_embed.weight" in sd else ""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for name, t in _to_hub_key(k, v, enc):
            out[name] = t.detach().float().contiguous().clone()  # safetensors stores no shared views
    return out


# ----------------------------------------------------------------------------- names: Hub -> fastmae


def _layer_name(k: str) -> tuple[str, str, str] | None:
    """(official block prefix, Hub module within the layer, weight|bias) of a layer tensor, else None."""
    for pattern, group in ((_HUB_LAYER, "blocks"), (_HUB_DECODER_LAYER, "decoder_blocks")):
        if m := pattern.match(k):
            i, mod, p = m.groups()
            return f"{group}.{i}", _V5_NAMES.get(mod, mod), p
    return None


def _join_qkv(qkv: dict[tuple[str, str], dict[str, torch.Tensor]], out: dict[str, torch.Tensor],
              notes: list[str]) -> None:
    """Concatenate each layer's query, key and value into the fused ``attn.qkv`` (zero biases when the
    checkpoint has none: ``qkv_bias=False``, the same function)."""
    no_bias = False
    for (block, p), parts in sorted(qkv.items()):
        if set(parts) != set(_QKV):
            raise ValueError(f"layer {block} lacks {sorted(set(_QKV) - set(parts))} ({p})")
        out[f"{block}.attn.qkv.{p}"] = torch.cat([parts[n] for n in _QKV], dim=0)
        if p == "weight" and (block, "bias") not in qkv:
            out[f"{block}.attn.qkv.bias"] = out[f"{block}.attn.qkv.weight"].new_zeros(parts[_QKV[0]].shape[0] * 3)
            no_bias = True
    if no_bias:
        notes.append("the checkpoint has no query/key/value biases (qkv_bias=false): they are zeros here")


def from_hub(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face ViTMAE tensors (Hub or transformers 5 names, with or without ``vit.``) -> (state dict in
    the official MAE names, notes for the user). Raises ValueError naming keys that are no ViTMAE weights."""
    hub_block = {v: k for k, v in _BLOCK.items()}
    top = {hub: name for name, hub in _ENCODER_TOP.items()} | {hub: name for name, hub in _DECODER_TOP.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for k, v in tensors.items():
        layer = _layer_name(k)
        if layer is not None and layer[1] in _QKV:
            qkv.setdefault((layer[0], layer[2]), {})[layer[1]] = v
        elif layer is not None and layer[1] in hub_block:
            out[f"{layer[0]}.{hub_block[layer[1]]}.{layer[2]}"] = v
        elif k.removeprefix(ENCODER_PREFIX) in top:
            out[top[k.removeprefix(ENCODER_PREFIX)]] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"tensors that are no ViTMAE weights: {sorted(unknown)[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''} (expected {PRETRAINING} or {ENCODER} weights)")
    notes: list[str] = []
    _join_qkv(qkv, out, notes)
    if "patch_embed.proj.weight" not in out:
        raise ValueError("no patch embedding (embeddings.patch_embeddings.projection.weight): not a ViTMAE model")
    return {k: v.float() for k, v in out.items()}, notes + _position_notes(out)


def _position_notes(sd: dict[str, torch.Tensor]) -> list[str]:
    """A note for each position embedding that is not the fixed 2-D sin-cos one (MAE's, and transformers')."""
    notes = []
    for k in ("pos_embed", "decoder_pos_embed"):
        if k in sd:
            n, dim = sd[k].shape[-2] - 1, sd[k].shape[-1]
            grid = round(n**0.5)
            if grid * grid != n or dim % 4 or not torch.allclose(sd[k].reshape(n + 1, dim).float(),
                                                                 sincos_2d(dim, grid), atol=1e-4):
                notes.append(f"{k} is not the fixed 2-D sin-cos position embedding: kept as stored")
    return notes


# ----------------------------------------------------------------------------- config.json


def _square(d: dict[str, Any], key: str) -> int:
    v = d[key]
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ConfigError(f"config.json {key}={v}: fastmae models are square (one {key})")
        v = v[0]
    return int(v)


def _mlp_ratio(d: dict[str, Any], hidden: str, inter: str) -> float:
    ratio = d[inter] / d[hidden]
    if int(d[hidden] * ratio) != d[inter]:  # fastmae's MLP is int(width * model.mlp_ratio) wide
        raise ConfigError(f"config.json {inter}={d[inter]}: no model.mlp_ratio gives it for {hidden}={d[hidden]}")
    return ratio


def _checked(d: dict[str, Any]) -> list[str]:
    """Refuse what fastmae's blocks cannot compute; notes on what they compute slightly differently."""
    act = d.get("hidden_act", HIDDEN_ACT)
    if act != HIDDEN_ACT:
        raise ConfigError(f"config.json hidden_act={act!r}: fastmae's blocks use exact GELU only "
                          f"(hidden_act={HIDDEN_ACT!r})")
    if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]):
        raise ConfigError(f"config.json head_dim={d['head_dim']}: fastmae needs heads x head_dim = hidden_size")
    eps = d.get("layer_norm_eps", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        return [f"config.json layer_norm_eps={eps}: fastmae's LayerNorms use {LAYER_NORM_EPS} (the official MAE's); "
                "outputs differ at the rounding level"]
    return []


def model_config(d: dict[str, Any]) -> tuple[ModelConfig, float, list[str]]:
    """(fastmae architecture, mask ratio, notes) from a ViTMAE ``config.json``."""
    try:
        notes = _checked(d)
        m = ModelConfig(
            img_size=_square(d, "image_size"), patch_size=_square(d, "patch_size"), in_chans=int(d["num_channels"]),
            embed_dim=int(d["hidden_size"]), depth=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]), decoder_embed_dim=int(d["decoder_hidden_size"]),
            decoder_depth=int(d["decoder_num_hidden_layers"]),
            decoder_num_heads=int(d["decoder_num_attention_heads"]),
            mlp_ratio=_mlp_ratio(d, "hidden_size", "intermediate_size"), norm_pix_loss=bool(d["norm_pix_loss"]))
        decoder_ratio = _mlp_ratio(d, "decoder_hidden_size", "decoder_intermediate_size")
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r} (a ViTMAEConfig field)") from None
    if decoder_ratio != m.mlp_ratio:
        raise ConfigError(f"config.json: the decoder's MLP ratio ({decoder_ratio}) differs from the encoder's "
                          f"({m.mlp_ratio}); fastmae has one model.mlp_ratio")
    ratio = float(d.get("mask_ratio", MaskConfig().ratio))
    if not 0.0 < ratio < 1.0:
        notes.append(f"config.json mask_ratio={ratio} is outside fastmae's (0, 1): mask.ratio={MaskConfig().ratio}")
        ratio = MaskConfig().ratio
    return m, ratio, notes


def hf_config_fields(m: ModelConfig, mask_ratio: float) -> dict[str, Any]:
    """The ``ViTMAEConfig`` arguments of a fastmae architecture (every one that changes the computation)."""
    return dict(
        hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio), image_size=m.img_size, patch_size=m.patch_size,
        num_channels=m.in_chans, decoder_hidden_size=m.decoder_embed_dim,
        decoder_num_hidden_layers=m.decoder_depth, decoder_num_attention_heads=m.decoder_num_heads,
        decoder_intermediate_size=int(m.decoder_embed_dim * m.mlp_ratio), mask_ratio=mask_ratio,
        norm_pix_loss=m.norm_pix_loss, layer_norm_eps=LAYER_NORM_EPS, hidden_act=HIDDEN_ACT, qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def fastmae_config(m: ModelConfig, mask_ratio: float, encoder_only: bool) -> Config:
    """A fastmae Config for an imported architecture: the preset of the same architecture (so that
    ``--preset auto`` of fine-tuning finds its recipe), else ``custom``."""
    fields = _ARCH_FIELDS + (() if encoder_only else _DECODER_FIELDS)
    name = next((n for n in preset_names()
                 if all(getattr(get_preset(n).model, f) == getattr(m, f) for f in fields)), None)
    cfg = get_preset(name) if name else Config()
    cfg.model, cfg.mask.ratio = m, mask_ratio
    return cfg


def check_fits(sd: dict[str, torch.Tensor], m: ModelConfig) -> None:
    """Raise ValueError unless ``sd`` holds exactly the tensors of ``MaskedAutoencoderViT(m)`` (its encoder
    part for an encoder-only ``sd``), shapes included."""
    with torch.device("meta"):
        own = MaskedAutoencoderViT(m).state_dict()
    if "decoder_embed.weight" not in sd:
        own = {k: v for k, v in own.items() if k in _ENCODER_TOP or k.startswith("blocks.")}
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        raise ValueError(f"the weights do not fit the architecture of config.json: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}, other shapes {wrong[:4]}")


# ----------------------------------------------------------------------------- writing


def save_pretrained(out: str | Path, sd: dict[str, torch.Tensor], m: ModelConfig, mask_ratio: float) -> str:
    """Write ``out/config.json`` + ``out/model.safetensors``: a ``ViTMAEForPreTraining`` for an MAE state dict,
    a ``ViTMAEModel`` for an encoder-only one. Returns the class name that loads it (``from_pretrained``)."""
    transformers = _require("transformers", "export-hf")
    st = _require("safetensors.torch", "export-hf")
    arch = PRETRAINING if "decoder_embed.weight" in sd else ENCODER
    tensors = to_hub(sd)
    cfg = transformers.ViTMAEConfig(**hf_config_fields(m, mask_ratio), architectures=[arch])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    st.save_file(tensors, str(out / WEIGHT_FILES[0]), metadata={"format": "pt"})
    return arch
