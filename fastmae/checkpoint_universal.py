"""Resharding a checkpoint for another number of ranks: rank 0 converts it once with DeepSpeed's
``ds_to_universal`` into ``step_N_universal/`` next to it (built in a hidden folder, renamed when complete,
then reused), which an engine with ``load_universal`` loads on any number of ranks. See docs/failures.md.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

SUFFIX = "_universal"
DONE_FILE = "fastmae_universal_done"


def universal_tag(tag: str) -> str:
    return f"{tag}{SUFFIX}"


def is_converted(ckpt_dir: str | Path, tag: str) -> bool:
    return (Path(ckpt_dir) / universal_tag(tag) / DONE_FILE).is_file()


def to_universal(ckpt_dir: str | Path, tag: str, timeout_s: float = 3600.0) -> str:
    """Convert ``ckpt_dir/tag`` to ``ckpt_dir/<tag>_universal`` (reusing a complete earlier conversion) and
    return the universal tag. Raises RuntimeError with the converter's output when it fails."""
    d = Path(ckpt_dir)
    out_tag = universal_tag(tag)
    final = d / out_tag
    if is_converted(d, tag):
        return out_tag
    if final.exists():  # an earlier conversion that did not finish
        shutil.rmtree(final)
    work = d / f".{out_tag}.tmp{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        # the converter writes ``latest_universal`` next to its output folder: inside ``work``, not beside
        # the real checkpoints
        staged = work / out_tag
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(d / tag),
               "--output_folder", str(staged), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if proc.returncode != 0 or not (staged / "zero").is_dir():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"ds_to_universal failed on {d / tag} (exit {proc.returncode}):\n{tail}")
        (staged / DONE_FILE).write_text(tag)
        os.replace(staged, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_tag


def universal_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """``ds_config`` with DeepSpeed told to load universal checkpoints."""
    cfg = copy.deepcopy(ds_config)
    cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def remove(ckpt_dir: str | Path, tag: str) -> None:
    """Delete the universal conversion of ``tag`` (when the checkpoint itself is pruned)."""
    shutil.rmtree(Path(ckpt_dir) / universal_tag(tag), ignore_errors=True)
