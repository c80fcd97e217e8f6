#!/usr/bin/env bash
# fastmae developer entry point: set up a virtual environment, run the main job, run the tests.
#   bash scripts/dev.sh setup    create .venv (CPU torch 2.13.0, triton 3.6.0, DALI, DeepSpeed, dev tools)
#   bash scripts/dev.sh train    setup + the main job: DeepSpeed pre-training of the debug preset
#   bash scripts/dev.sh test     setup + the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTMAE_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    # the CPU build of torch first: an open range would pull a multi-GB CUDA build
    "$PY" -c 'import torch' 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
    # triton 3.6.0 is the GPU machines' version; its CPU interpreter needs numpy < 2.4
    "$PY" -m pip install -q 'triton==3.6.0' 'numpy<2.4' -e '.[dali,dev]'
}

case "${1:-}" in
    setup) setup ;;
    train) setup; shift; exec "$VENV/bin/deepspeed" fastmae/train.py --ds_config zero2.json "$@" ;;
    test) setup; shift; "$VENV/bin/ruff" check . && exec "$PY" -m pytest -q "$@" ;;
    *) echo "usage: bash scripts/dev.sh setup|train|test [args...]" >&2; exit 2 ;;
esac
