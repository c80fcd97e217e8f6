"""Checkpoints in and out: official MAE files, fastmae exports and DeepSpeed runs in, timm state dicts out;
Hugging Face ViTMAE checkpoints both ways (fastmae/hf.py); every file is read with ``torch.load(weights_only=True)``
(or safetensors) and any other pickled object is refused with :class:`UnsafeCheckpointError`. CLI:
``python -m fastmae.interop info CKPT``, ``export-timm CKPT OUT.pth``, ``convert CKPT OUT.pth``,
``export-hf CKPT DIR``, ``import-hf DIR_OR_FILE OUT.pth``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from . import hf
from .checkpoint import consolidate
from .config import Config, MaskConfig, ModelConfig, config_from_dict, get_preset
from .layers import sincos_2d
from .model import MaskedAutoencoderViT

# (embed_dim, depth, num_heads) -> timm size name; the official MAE encoders are base/large/huge
TIMM_SIZES: dict[tuple[int, int, int], str] = {
    (192, 12, 3): "tiny",
    (384, 12, 6): "small",
    (768, 12, 12): "base",
    (1024, 24, 16): "large",
    (1280, 32, 16): "huge",
}
# heads per width for checkpoints without a config (official ViTs); decoder heads are 16 officially
HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
CLASSIFIER_PREFIXES = ("fc_norm.", "head.")


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint contains pickled objects other than tensors and plain containers."""


# ----------------------------------------------------------------------------- reading


def safe_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (and ``argparse.Namespace`` allowed); never runs code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()
        glob = [ln.strip() for ln in detail if "GLOBAL" in ln or "global" in ln]
        hint = glob[0] if glob else (detail[0] if detail else "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled Python objects that torch.load(weights_only=True) "
            f"will not rebuild ({hint}). Loading them could run arbitrary code. fastmae reads only tensors "
            "and plain containers; if you trust the file's source, re-save just its weights elsewhere, e.g. "
            "torch.save({'model': obj['model']}, 'clean.pth') in a session you accept the risk in."
        ) from None


def extract_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a loaded checkpoint into (state dict, metadata): ``{"model": sd, ...}`` (official, fastmae),
    ``{"state_dict": sd}`` / ``{"module": sd}`` or a bare state dict. ``module.`` prefixes are removed."""
    if not isinstance(obj, dict):
        raise ValueError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    meta: dict[str, Any] = {}
    sd = obj
    for key in ("model", "state_dict", "module", "model_ema"):
        if key in obj and isinstance(obj[key], dict):
            sd = obj[key]
            meta = {k: v for k, v in obj.items() if k != key}
            break
    tensors = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"no tensors found in the checkpoint (keys: {sorted(sd)[:8]})")
    return tensors, meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a checkpoint file, a fastmae DeepSpeed checkpoint directory or a Hugging Face
    ViTMAE checkpoint (:func:`load_hf`)."""
    p = Path(path)
    if hf.is_hf_checkpoint(p):
        return load_hf(p)
    if p.is_dir():
        sd, state = consolidate(p)
        return sd, {"config": state.get("config"), "step": state.get("step"), "epoch": state.get("epoch")}
    return extract_state_dict(safe_load(p))


def load_hf(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in the official MAE names, metadata) of a Hugging Face ``ViTMAEForPreTraining`` or
    ``ViTMAEModel`` checkpoint: a ``save_pretrained`` folder or one ``.safetensors`` / ``.bin`` file. With a
    ``config.json`` the metadata holds the fastmae ``config`` it describes; ``notes`` say what fastmae computes
    differently. Without one the architecture is inferred from the tensors, as for official files."""
    tensors, hf_cfg = hf.read_hf(path, safe_load)
    sd, notes = hf.from_hub(tensors)
    meta: dict[str, Any] = {"notes": notes}
    if hf_cfg is not None:
        m, ratio, more = hf.model_config(hf_cfg)
        hf.check_fits(sd, m)
        meta["config"] = hf.fastmae_config(m, ratio, checkpoint_kind(sd) == "encoder").to_dict()
        meta["notes"] = notes + more
    return sd, meta


def checkpoint_kind(sd: dict[str, torch.Tensor]) -> str:
    """``mae`` (encoder + decoder), ``encoder`` (encoder only) or ``classifier`` (encoder + head)."""
    if "decoder_embed.weight" in sd:
        return "mae"
    if "head.weight" in sd or "head.1.weight" in sd:
        return "classifier"
    if "patch_embed.proj.weight" in sd:
        return "encoder"
    raise ValueError("not a ViT / MAE state dict: no patch_embed.proj.weight")


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def infer_model_config(sd: dict[str, torch.Tensor], meta: dict[str, Any] | None = None,
                       base: ModelConfig | None = None) -> ModelConfig:
    """The MAE architecture of a state dict: from a fastmae ``config`` when present, else from tensor shapes
    (head counts, which shapes do not show, from the official widths or ``base``)."""
    meta = meta or {}
    cfg_d = meta.get("config")
    if isinstance(cfg_d, dict) and isinstance(cfg_d.get("model"), dict):
        return config_from_dict(cfg_d).model
    m = ModelConfig(**vars(base)) if base is not None else ModelConfig()
    w = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    m.embed_dim, m.in_chans, m.patch_size = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    n = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else None
    if n is not None:
        m.img_size = int(round(n**0.5)) * m.patch_size
    m.depth = _count(sd, "blocks")
    m.mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / m.embed_dim
    if base is None or base.embed_dim != m.embed_dim:
        if m.embed_dim not in HEADS_BY_DIM:
            raise ValueError(f"cannot tell the number of heads of a {m.embed_dim}-wide ViT from its weights; "
                             "pass the architecture (--preset) that matches the checkpoint")
        m.num_heads = HEADS_BY_DIM[m.embed_dim]
    if "decoder_embed.weight" in sd:
        dd = int(sd["decoder_embed.weight"].shape[0])
        if base is None or base.decoder_embed_dim != dd:
            if dd % 16:
                raise ValueError(f"cannot tell the decoder's heads ({dd} wide) from weights: --preset")
            m.decoder_num_heads = 16  # every official MAE decoder
        m.decoder_embed_dim = dd
        m.decoder_depth = _count(sd, "decoder_blocks")
    return m


def load_mae(path: str | Path, norm_pix_loss: bool | None = None, base: ModelConfig | None = None,
             attention: str = "auto") -> tuple[torch.nn.Module, dict[str, Any]]:
    """An :class:`~fastmae.model.MaskedAutoencoderViT` with all weights from ``path`` (needs the decoder:
    ``mae_visualize_vit_*.pth``, a fastmae export or run). Returns (model in eval mode, metadata)."""
    sd, meta = load_checkpoint(path)
    kind = checkpoint_kind(sd)
    if kind != "mae":
        raise ValueError(
            f"{path} holds a ViT {kind} without the MAE decoder; reconstructions need encoder and decoder "
            "(official mae_visualize_vit_*.pth, a fastmae export or a fastmae run directory)")
    m = infer_model_config(sd, meta, base)
    if norm_pix_loss is not None:
        m.norm_pix_loss = norm_pix_loss
    elif not isinstance(meta.get("config"), dict):
        m.norm_pix_loss = False  # official mae_visualize_* models were trained on plain pixels
    m.attention = attention
    model = MaskedAutoencoderViT(m)
    own = model.state_dict()
    for k in ("pos_embed", "decoder_pos_embed"):  # fixed sin-cos: rebuilt when absent
        sd.setdefault(k, own[k])
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
    return model.eval(), meta


def build_config_for(sd: dict[str, torch.Tensor], meta: dict[str, Any], preset: str) -> Config:
    """A full fastmae Config whose model section is the checkpoint's architecture."""
    cfg = get_preset(preset)
    cfg.model = infer_model_config(sd, meta, cfg.model)
    return cfg


# ----------------------------------------------------------------------------- timm


def timm_model_name(m: ModelConfig) -> str | None:
    """timm's name for this encoder (``vit_base_patch16_224``, ...) or None when timm has no such model."""
    size = TIMM_SIZES.get((m.embed_dim, m.depth, m.num_heads))
    if size is None or m.mlp_ratio != 4.0:
        return None
    return f"vit_{size}_patch{m.patch_size}_{m.img_size}"


def timm_kwargs(m: ModelConfig, num_classes: int = 0, global_pool: str = "token") -> dict[str, Any]:
    """Keyword arguments of ``timm.create_model`` that build this architecture under any ViT name."""
    return dict(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim,
                depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_classes=num_classes,
                global_pool=global_pool)


def to_timm(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, str]:
    """The timm ``VisionTransformer`` state dict in ``sd``: encoder keys (and a classifier's ``fc_norm``/
    ``head``), decoder and mask token dropped. Returns (state dict, num_classes, timm global_pool)."""
    keys = ENCODER_PREFIXES + CLASSIFIER_PREFIXES
    out = {k: v.detach().float().clone().contiguous() for k, v in sd.items() if k.startswith(keys)}
    if "head.1.weight" in out:  # linear-probe head: BatchNorm1d(affine=False) + linear; no timm equivalent
        raise ValueError("a linear-probe classifier (BatchNorm head) has no timm equivalent; export the "
                         "pre-trained encoder instead")
    num_classes = int(out["head.weight"].shape[0]) if "head.weight" in out else 0
    pool = "avg" if "fc_norm.weight" in out else "token"
    return out, num_classes, pool


def export_timm(path: str | Path, out: str | Path, preset: str = "mae_vit_large_patch16") -> dict[str, Any]:
    """Write the checkpoint's ViT as a plain timm state dict to ``out``; returns what to call timm with."""
    sd, meta = load_checkpoint(path)
    m = infer_model_config(sd, meta, get_preset(preset).model)
    tsd, num_classes, pool = to_timm(sd)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tsd, out)
    name = timm_model_name(m)
    kwargs = {"num_classes": num_classes, "global_pool": pool}
    if name is None:
        name = "vit_base_patch16_224"
        kwargs = timm_kwargs(m, num_classes, pool)
    return {"out": str(out), "timm_model": name, "kwargs": kwargs}


# ----------------------------------------------------------------------------- Hugging Face


def export_hf(path: str | Path, out: str | Path, preset: str = "mae_vit_large_patch16") -> dict[str, Any]:
    """Write the checkpoint's MAE (or its encoder, when it has no decoder) as a Hugging Face ViTMAE folder
    (``config.json`` + ``model.safetensors``); returns the transformers class that loads it."""
    sd, meta = load_checkpoint(path)
    kind = checkpoint_kind(sd)
    if kind == "classifier":
        raise ValueError(f"{path} holds a fine-tuned classifier: Hugging Face ViTMAE has no classifier head; "
                         "export the pre-trained checkpoint, or this one with export-timm")
    m = infer_model_config(sd, meta, get_preset(preset).model)
    cfg_d = meta.get("config")
    has_cfg = isinstance(cfg_d, dict) and isinstance(cfg_d.get("model"), dict)
    if not has_cfg:
        m.norm_pix_loss = False  # as load_mae: official files with a decoder were trained on plain pixels
    ratio = config_from_dict(cfg_d).mask.ratio if has_cfg else MaskConfig().ratio
    grid = m.img_size // m.patch_size
    sd = dict(sd)
    sd.setdefault("pos_embed", sincos_2d(m.embed_dim, grid).unsqueeze(0))  # fixed: rebuilt when absent
    if kind == "mae":
        sd.setdefault("decoder_pos_embed", sincos_2d(m.decoder_embed_dim, grid).unsqueeze(0))
    arch = hf.save_pretrained(out, sd, m, ratio)
    return {"out": str(out), "class": arch, "kind": kind}


def import_hf(path: str | Path, out: str | Path, preset: str = "mae_vit_large_patch16") -> list[str]:
    """Write a Hugging Face ViTMAE checkpoint as one fastmae file ``{'model', 'config'}`` (official names, what
    ``convert`` writes); returns the lines that say what was written and what differs."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not hf.is_hf_checkpoint(path):
        raise ValueError(f"{path} is not a Hugging Face checkpoint: expected a save_pretrained folder "
                         f"(config.json, {' or '.join(hf.WEIGHT_FILES[::2])}) or a .safetensors / .bin file")
    sd, meta = load_hf(path)
    kind = checkpoint_kind(sd)
    if isinstance(meta.get("config"), dict):
        cfg = config_from_dict(meta["config"])
    else:  # no config.json: the architecture from the tensors; ViTMAEConfig's defaults for the loss and masking
        m = infer_model_config(sd, meta, get_preset(preset).model)
        m.norm_pix_loss = False
        cfg = hf.fastmae_config(m, MaskConfig().ratio, kind == "encoder")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "config": cfg.to_dict()}, out)
    if kind == "mae":
        what = (f"wrote {out} (encoder + decoder, {hf.PRETRAINING}): pre-training (load_mae), reconstructions, "
                "fine-tuning and linear probing (--checkpoint) start from it")
    else:
        what = (f"wrote {out} (encoder only: {hf.ENCODER} has no decoder): fine-tuning and linear probing "
                f"(--checkpoint) start from it; pre-training and reconstructions need a {hf.PRETRAINING} checkpoint")
    return [what] + [f"note: {n}" for n in meta["notes"]]


# ----------------------------------------------------------------------------- CLI


def _describe(path: str, preset: str) -> str:
    sd, meta = load_checkpoint(path)
    kind = checkpoint_kind(sd)
    m = infer_model_config(sd, meta, get_preset(preset).model)
    n = sum(v.numel() for v in sd.values())
    lines = [f"{path}: {kind}, {len(sd)} tensors, {n / 1e6:.1f} M values",
             f"architecture: img {m.img_size} patch {m.patch_size} dim {m.embed_dim} depth {m.depth} "
             f"heads {m.num_heads}"
             + (f" | decoder {m.decoder_depth} x {m.decoder_embed_dim}" if kind == "mae" else ""),
             f"timm model: {timm_model_name(m) or 'none (custom size; see export-timm kwargs)'}"]
    extra = {k: meta[k] for k in ("step", "epoch", "acc1") if k in meta}
    if extra:
        lines.append(f"metadata: {extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmae.interop",
                                 description="Inspect, convert and export MAE / ViT checkpoints (never runs "
                                             "code from a checkpoint).")
    ap.add_argument("--preset", default="mae_vit_large_patch16",
                    help="architecture used for what weights cannot tell (head counts of unusual widths)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="what a checkpoint holds")
    p.add_argument("checkpoint")
    p = sub.add_parser("export-timm", help="write a timm VisionTransformer state dict")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p = sub.add_parser("convert", help="write one fastmae file {'model', 'config'} (official names)")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p = sub.add_parser("export-hf", help="write a Hugging Face ViTMAE folder (config.json + model.safetensors)")
    p.add_argument("checkpoint")
    p.add_argument("out", help="folder for transformers' from_pretrained")
    p = sub.add_parser("import-hf", help="turn a Hugging Face ViTMAE checkpoint (save_pretrained folder, "
                                         ".safetensors or .bin) into one fastmae file")
    p.add_argument("checkpoint")
    p.add_argument("out")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":
            print(_describe(args.checkpoint, args.preset))
        elif args.cmd == "export-timm":
            info = export_timm(args.checkpoint, args.out, args.preset)
            kw = ", ".join(f"{k}={v!r}" for k, v in info["kwargs"].items())
            print(f"wrote {info['out']}\nload it with:\n"
                  f"  m = timm.create_model({info['timm_model']!r}, {kw})\n"
                  f"  m.load_state_dict(torch.load({info['out']!r}, weights_only=True))")
        elif args.cmd == "export-hf":
            info = export_hf(args.checkpoint, args.out, args.preset)
            print(f"wrote {info['out']} ({info['class']}, {info['kind']})\nload it with:\n"
                  f"  from transformers import {info['class']}\n"
                  f"  model = {info['class']}.from_pretrained({info['out']!r})")
        elif args.cmd == "import-hf":
            print("\n".join(import_hf(args.checkpoint, args.out, args.preset)))
        else:
            sd, meta = load_checkpoint(args.checkpoint)
            cfg = build_config_for(sd, meta, args.preset)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": sd, "config": cfg.to_dict(),
                        **{k: meta[k] for k in ("step", "epoch") if meta.get(k) is not None}}, out)
            print(f"wrote {out} ({checkpoint_kind(sd)})")
    except (UnsafeCheckpointError, ValueError, FileNotFoundError) as e:  # HFUnavailableError is one
        print(f"fastmae.interop: {e}", file=__import__("sys").stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
