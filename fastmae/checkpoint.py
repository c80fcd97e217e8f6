"""Training checkpoints: DeepSpeed's shards plus fastmae's run state (``fastmae_state.json``, written last as
the completion marker), saved so that a crash never corrupts resume; resume takes the newest complete one. See
docs/failures.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from . import checkpoint_universal as universal
from .config import config_from_dict
from .model import MaskedAutoencoderViT

STATE_FILE = "fastmae_state.json"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir() if _TAG.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def latest_complete(ckpt_dir: str | Path) -> str | None:
    """The tag to resume from: ``latest`` if it is complete, else the newest complete one, else None."""
    d = Path(ckpt_dir)
    latest = d / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if (d / tag / STATE_FILE).is_file():
            return tag
    tags = complete_tags(d)
    return tags[-1] if tags else None


def read_state(ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / tag / STATE_FILE).read_text())


def save(engine: Any, ckpt_dir: str | Path, step: int, state: dict[str, Any], keep_last: int,
         is_main: bool) -> str:
    """Save a DeepSpeed checkpoint for ``step`` with ``state``; mark it complete; prune old ones."""
    import torch.distributed as dist

    d = Path(ckpt_dir)
    tag = tag_for(step)
    if is_main:
        d.mkdir(parents=True, exist_ok=True)
        stale = d / tag
        if stale.exists():  # an incomplete earlier attempt at this step (killed mid-save)
            shutil.rmtree(stale)
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(d), tag=tag, client_state={"fastmae": state}, save_latest=False)
    if dist.is_initialized():
        dist.barrier()  # every rank's shards are on disk
    if is_main:
        _atomic_write(d / tag / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))
        _atomic_write(d / LATEST, tag)
        for old in complete_tags(d)[:-keep_last]:
            shutil.rmtree(d / old, ignore_errors=True)
            universal.remove(d, old)
    if dist.is_initialized():
        dist.barrier()
    return tag


def find_resume(resume: str, ckpt_dir: str | Path) -> tuple[Path, str] | None:
    """Where ``train.resume`` points: ``auto`` = the newest complete checkpoint in ``ckpt_dir`` (or None),
    ``""`` = none, a path = that checkpoint (which must be complete)."""
    if resume == "auto":
        tag = latest_complete(ckpt_dir)
        return (Path(ckpt_dir), tag) if tag else None
    if not resume:
        return None
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete fastmae checkpoint (no {STATE_FILE})")
    return p.parent, p.name


def consolidate(ckpt_path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 model weights (official MAE names) and run state from a checkpoint directory (any ZeRO stage),
    on the CPU, without GPUs or the original number of ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    p = Path(ckpt_path)
    if (p / LATEST).is_file() or not (p / STATE_FILE).is_file():  # a checkpoints/ folder: take its latest
        tag = latest_complete(p)
        if tag is None:
            raise FileNotFoundError(f"no complete fastmae checkpoint in {p}")
        p = p / tag
    state = read_state(p.parent, p.name)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(p.parent), tag=p.name)
    sd = {k.removeprefix("module."): v.float() for k, v in sd.items()}
    # fixed (non-trainable) sin-cos position embeddings are not in ZeRO's fp32 partitions: rebuild them
    cfg = config_from_dict(state["config"])
    with torch.device("cpu"):
        ref = MaskedAutoencoderViT(cfg.model, cfg.mask).state_dict()
    for k in ("pos_embed", "decoder_pos_embed"):
        sd.setdefault(k, ref[k])
    missing = set(ref) - set(sd)
    if missing:
        raise RuntimeError(f"consolidated checkpoint {p} lacks {sorted(missing)}")
    return {k: sd[k] for k in ref}, state


def export(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write one fp32 file ``{"model": state_dict, "config": ..., "step": ...}`` in the official MAE naming
    (``torch.load(out, weights_only=True)["model"]`` loads into ``MaskedAutoencoderViT``)."""
    sd, state = consolidate(ckpt_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "config": state["config"], "step": state["step"], "epoch": state["epoch"]}, out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fastmae.checkpoint",
                                 description="Export a fastmae/DeepSpeed checkpoint to one fp32 file.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="consolidate ZeRO shards into OUT (official MAE parameter names)")
    ex.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a checkpoints/ folder (takes its latest)")
    ex.add_argument("out")
    args = ap.parse_args(argv)
    out = export(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
