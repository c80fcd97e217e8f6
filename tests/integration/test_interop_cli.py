"""Checkpoints in and out through the command line (``python -m fastmae.interop``): a checkpoint with pickled code
is refused, a timm export is written. The same in the test process: tests/unit/test_interop.py."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from modelutil import OFFICIAL_LIKE

from fastmae import interop
from fastmae.config import get_preset
from fastmae.model import MaskedAutoencoderViT
from fastmae.vit import build_classifier

REPO = Path(__file__).resolve().parents[2]


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path, mae: MaskedAutoencoderViT) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.pth"
    torch.save({"model": mae.state_dict(), "payload": Exploit()}, bad)
    with pytest.raises(interop.UnsafeCheckpointError, match="refusing to load .*pickled Python objects"):
        interop.load_checkpoint(bad)
    with pytest.raises(interop.UnsafeCheckpointError):
        interop.load_mae(bad)
    assert not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "fastmae.interop", "info", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "refusing to load" in proc.stderr and not marker.exists()
    # the official training scripts store argparse.Namespace as "args": plain attributes, accepted
    ok = tmp_path / "with_args.pth"
    torch.save({"model": mae.state_dict(), "args": argparse.Namespace(lr=0.1, model="vit")}, ok)
    sd, meta = interop.load_checkpoint(ok)
    assert meta["args"].lr == 0.1 and "decoder_embed.weight" in sd


def test_timm_export_keys_and_names(mae: MaskedAutoencoderViT, tmp_path: Path) -> None:
    sd, num_classes, pool = interop.to_timm(mae.state_dict())
    assert (num_classes, pool) == (0, "token")
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    depth = OFFICIAL_LIKE.depth
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias"} | {f"blocks.{i}.{m}.{p}" for i in range(depth)
                                for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                                for p in ("weight", "bias")}
    assert set(sd) == expected
    for name, preset in (("vit_base_patch16_224", "mae_vit_base_patch16"),
                         ("vit_large_patch16_224", "mae_vit_large_patch16"),
                         ("vit_huge_patch14_224", "mae_vit_huge_patch14")):
        assert interop.timm_model_name(get_preset(preset).model) == name
    assert interop.timm_model_name(get_preset("debug").model) is None
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict()}, path)
    proc = subprocess.run([sys.executable, "-m", "fastmae.interop", "export-timm", str(path), str(tmp_path / "t.pth")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "timm.create_model('vit_base_patch16_224'" in proc.stdout and "embed_dim=192" in proc.stdout
    assert set(torch.load(tmp_path / "t.pth", weights_only=True)) == expected
    # a classifier with global pooling exports fc_norm + head, timm global_pool='avg'
    clf = build_classifier(OFFICIAL_LIKE, 7, global_pool=True)
    _, n, pool = interop.to_timm(clf.state_dict())
    assert (n, pool) == (7, "avg")
