"""The command line the training programs share: ``--ds_config``, ``--preset``, ``--config``, ``--print-config``
(and the deepspeed launcher's ``--local_rank``); each program adds its own arguments."""

from __future__ import annotations

import argparse

DS_CONFIG_HELP = "DeepSpeed JSON: a bundled name (zero0.json, zero1.json, zero2.json, zero3.json) or a path"


def program_parser(prog: str, description: str, preset_default: str, preset_help: str) -> argparse.ArgumentParser:
    """The shared arguments of ``fastmae/train.py``, ``finetune.py`` and ``linprobe.py``; the rest of the command
    line are config overrides (``section.key=value`` or ``--section.key value``)."""
    ap = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=description)
    ap.add_argument("--ds_config", default="zero2.json", help=DS_CONFIG_HELP)
    ap.add_argument("--preset", default=preset_default, help=preset_help)
    ap.add_argument("--config", default=None, help="a config JSON (e.g. config.json of an earlier run); "
                                                   "overrides apply on top")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return ap
