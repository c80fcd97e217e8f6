"""Linear probing of a pre-trained MAE encoder with DeepSpeed, on the official ``main_linprobe.py`` recipe:
``deepspeed fastmae/linprobe.py --ds_config zero2.json --checkpoint PATH [--preset P] [k=v ...]``.
"""

from __future__ import annotations

from fastmae.finetune import main

if __name__ == "__main__":
    raise SystemExit(main(probe=True))
