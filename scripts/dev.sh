#!/usr/bin/env bash
# fastmae developer entry point: set up virtual environments, run the main job, run the tests.
#   bash scripts/dev.sh setup       create .venv (CPU torch 2.13.0, triton 3.6.0, DALI, DeepSpeed, trackers,
#                                   remote-shard clients, dev tools with an S3-compatible test server)
#   bash scripts/dev.sh train ...   setup + the main job: DeepSpeed pre-training of the debug preset
#   bash scripts/dev.sh test ...    setup + ruff + the whole test suite in .venv and, beside it at a lower
#                                   priority, the timm interop tests in .venv-timm and the kernel tests under
#                                   the newest Triton in .venv-triton (what CI runs); extra arguments go to the
#                                   main suite's pytest
#   bash scripts/dev.sh test-timm   only the timm interop tests (.venv-timm)
#   bash scripts/dev.sh test-triton only the kernel tests under the newest Triton (.venv-triton)
set -euo pipefail
cd "$(dirname "$0")/.."
# Python keeps the byte code of what it imports: with PYTHONDONTWRITEBYTECODE set (some shells and CI images set
# it) every process would compile torch's and DeepSpeed's sources again, `import fastmae.train, deepspeed` taking
# ~10 CPU seconds instead of ~5 on 2 cores, in each of the suite's ranks, launchers and benchmark runs
unset PYTHONDONTWRITEBYTECODE
VENV=${FASTMAE_VENV:-.venv}
TIMM_VENV=${FASTMAE_TIMM_VENV:-.venv-timm}
TRITON_VENV=${FASTMAE_TRITON_VENV:-.venv-triton}
PY="$VENV/bin/python"

# --no-compile everywhere: pip would byte-compile every module of torch and the rest at install (about 40 CPU
# seconds per torch build); Python compiles what is imported, once, on first import
setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    # the CPU build of torch first: an open range would pull a multi-GB CUDA build
    "$PY" -c 'import torch' 2>/dev/null || "$PY" -m pip install -q --no-compile torch==2.13.0
    # triton 3.6.0 is the GPU machines' version; its CPU interpreter needs numpy < 2.4
    # s3fs pins botocore (through aiobotocore) and boto3 must match it: the tested trio, or pip backtracks into
    # an s3fs that wants an fsspec the index does not have
    "$PY" -m pip install -q --no-compile 'triton==3.6.0' 'numpy<2.4' 's3fs==2026.9.0' 'boto3==1.43.117' 'moto[server]==5.2.5' \
        -e '.[dali,dev,track,remote,hf]'
}

# timm needs torchvision, which does not import beside the CPU torch 2.13.0 build; torch 2.14.1 and
# torchvision 0.29.1 install together (a CUDA build that runs on the CPU) but want triton 3.8, so the
# timm interop tests get an environment of their own.
timm_deps() {
    [ -x "$TIMM_VENV/bin/python" ] || python3 -m venv "$TIMM_VENV"
    "$TIMM_VENV/bin/python" -c 'import timm, torchvision' 2>/dev/null || "$TIMM_VENV/bin/python" -m pip install -q --no-compile \
        torch==2.14.1 torchvision==0.29.1 timm==1.0.31 'numpy<2.4' pytest pytest-timeout deepspeed pillow tqdm
}

setup_timm() {
    timm_deps
    "$TIMM_VENV/bin/python" -m pip install -q --no-compile --no-deps -e .
}

test_timm() {
    setup_timm
    # only the files that hold timm-marked tests: collecting the whole suite there costs a dozen CPU seconds
    # shellcheck disable=SC2046
    "$TIMM_VENV/bin/pytest" -q -p no:cacheprovider -m timm $(grep -rlE "mark\.timm" tests --include='test_*.py')
}

# the newest Triton (what an unpinned install of the newest torch brings) runs the kernel tests under its
# interpreter, which is stricter than 3.6's; CPU torch 2.13.0 beside it
NEWEST_TRITON=3.9.0
triton_deps() {
    [ -x "$TRITON_VENV/bin/python" ] || python3 -m venv "$TRITON_VENV"
    "$TRITON_VENV/bin/python" -c "import sys, triton; sys.exit(triton.__version__ != '$NEWEST_TRITON')" 2>/dev/null ||
        "$TRITON_VENV/bin/python" -m pip install -q --no-compile torch==2.13.0 "triton==$NEWEST_TRITON" 'numpy<2.4' pytest \
            pytest-timeout pytest-xdist psutil pillow tqdm
}

setup_triton() {
    triton_deps
    "$TRITON_VENV/bin/python" -m pip install -q --no-compile --no-deps -e .
}

test_triton() {
    setup_triton
    "$TRITON_VENV/bin/pytest" -q -p no:cacheprovider -n "${FASTMAE_TEST_WORKERS:-2}" tests/integration/test_kernels.py
}

case "${1:-}" in
    setup) setup ;;
    train) setup; shift; exec "$VENV/bin/deepspeed" fastmae/train.py --ds_config zero2.json "$@" ;;
    # two workers by default (FASTMAE_TEST_WORKERS): most tests wait on process start-up, not on the cores
    test)
        shift
        # the timm and newest-Triton environments' dependencies install while .venv does (pip mostly waits on the
        # disk and the network), not while the suite runs: unpacking their torch builds beside the suite's ranks
        # slowed it by a third on 2 cores; the project goes into them afterwards, one pip at a time
        side_log=$(mktemp)
        (timm_deps && triton_deps) > "$side_log" 2>&1 &
        side=$!
        rc=0
        setup || rc=$?
        if ! wait "$side"; then
            echo "setting up .venv-timm / .venv-triton failed:" >&2
            cat "$side_log" >&2
            rc=1
        fi
        rm -f "$side_log"
        [ "$rc" = 0 ] || exit "$rc"
        "$VENV/bin/ruff" check .
        # the timm and newest-Triton tests run beside the main suite at a lower priority: they take the cores while
        # its ranks wait on start-up, sockets and timeouts, and yield them when the suite's processes want them
        side_log=$(mktemp)
        (nice -n 10 bash scripts/dev.sh side-tests) > "$side_log" 2>&1 &
        side=$!
        rc=0
        "$VENV/bin/pytest" -q -n "${FASTMAE_TEST_WORKERS:-2}" --dist loadgroup --durations=25 "$@" || rc=$?
        side_rc=0
        wait "$side" || side_rc=$?
        echo "--- timm interop tests (.venv-timm) and kernel tests under Triton $NEWEST_TRITON (.venv-triton):"
        cat "$side_log"
        rm -f "$side_log"
        [ "$side_rc" = 0 ] || { echo "the timm / newest-Triton tests failed (exit $side_rc)" >&2; [ "$rc" != 0 ] || rc=$side_rc; }
        exit "$rc" ;;
    # (what `test` runs beside the main suite; alone: test-timm and test-triton)
    side-tests)
        rc=0
        test_timm || rc=$?
        test_triton || rc=$?
        exit "$rc" ;;
    test-timm) test_timm ;;
    test-triton) test_triton ;;
    *) echo "usage: bash scripts/dev.sh setup|train|test|test-timm|test-triton [args...]" >&2; exit 2 ;;
esac
