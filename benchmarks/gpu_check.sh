#!/usr/bin/env bash
# fastmae GPU check: the one script to run on a CUDA machine, in two calls that fit 15 minutes of GPU time.
#
#   bash benchmarks/gpu_check.sh --part 1           # on the GPU machine: correctness, masking kernel, throughput
#   bash benchmarks/gpu_check.sh --part 2           # then: ablations, ViT-H memory, DeepSpeed runs, GPU tests, profile
#   bash benchmarks/gpu_check.sh --part 3           # when minutes remain: the data loaders (DALI when installed)
#   bash benchmarks/gpu_check.sh                    # all parts in one run (--part all)
#   bash benchmarks/gpu_check.sh --cpu-rehearsal    # on a CPU machine: every part, tiny sizes
#   bash benchmarks/gpu_check.sh --prepare-wheels   # with PyPI: fill wheels/ for an offline GPU machine
#   (FASTMAE_CPU_REHEARSAL=1 is the same as --cpu-rehearsal)
#
# Stages, most important first, each time-boxed with `timeout`; a part's stage limits add up to its budget
# (part 1 360 s, part 2 300 s, part 3 120 s; GPU_CHECK_BUDGET_S overrides it). A stage is skipped only when the
# budget is spent or what it needs is missing, and the summary names it with the reason; a failing stage is
# recorded and the next runs. Every stage writes its JSON as soon as each measurement exists, so a stage cut
# short keeps its numbers. torch.compile's cache stays on the machine between calls: part 2 reuses the block
# graphs that part 1 compiled.
#   setup         pip install --no-index --find-links wheels/ (when wheels/ has any) and fastmae itself
#   env           card, driver, torch/CUDA/triton/transformers versions
#  part 1 (<= 360 s)
#   ceilings      device copy bandwidth and bf16 matmul rate (the roofs for the numbers below)
#   correctness   throughput.py --check (TF32 off): attention backends vs fp32 math, the Triton masking kernel vs
#                 the torch reference (from noise and from a seed; the seeded reference vs the CPU's), the
#                 official-style baseline == fastmae on shared weights, graph breaks of the training forward,
#                 one bf16 training step each of ViT-L/H/B
#   kernels       benchmarks/masking_kernel.py (fused masking kernel vs reference, GB/s vs copy bandwidth)
#   throughput    ViT-L/H/B: the training default (compiled per block, bf16 autocast, fp32 gradients, the ZeRO-2
#                 engine), the same w/ [M], official-style and HF ViTMAE; cold compile seconds per preset
#  part 2 (<= 300 s)
#   ablations     ViT-L with each optimisation switched in turn, the rows that compile new graphs last (compile
#                 off / whole step / CUDA graphs, masking, attention, fused AdamW, precision, patch-embedding
#                 order, ZeRO stage / plain torch step), each row written when timed
#   memory_vit_h  ViT-H/14 at micro batch 256 without and with activation checkpointing (eager), vs the estimate
#   deepspeed     20 steps of fastmae/train.py: zero2.json, its default compile, no checkpoint
#   zero3_compile 10 steps of fastmae/train.py: zero3.json, train.compile=blocks, no checkpoint
#   pytest_gpu    the kernel tests, then pytest -m gpu (every GPU-marked test of the repository)
#   profile       profile_step.py on ViT-L (time split w/ [M] vs w/o [M], top kernels, traces)
#  part 3 (<= 120 s)
#   data          benchmarks/data_throughput.py (DALI when it imports, else the torch loader)
# Results: $OUT/<card>-<date>-part<N>.tar.gz + summary.md + gpu_check.log when $OUT is set (three files, for
# machines that return only a few), else benchmarks/results/<card>-<date>-part<N>/.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

REHEARSAL=${FASTMAE_CPU_REHEARSAL:-0}
PREPARE=0
PART=all
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-rehearsal) REHEARSAL=1 ;;
        --prepare-wheels) PREPARE=1 ;;
        --part) PART=${2:-}; shift ;;
        --part=*) PART=${1#--part=} ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (valid: --part 1|2|3|all, --cpu-rehearsal, --prepare-wheels)" >&2; exit 2 ;;
    esac
    shift
done
case "$PART" in
    1|2|3|all) ;;
    *) echo "--part takes 1, 2, 3 or all, not '$PART'" >&2; exit 2 ;;
esac
in_part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
PY=$PYTHON

# ------------------------------------------------------------------ wheels for the offline GPU machine
if [ "$PREPARE" = 1 ]; then
    # DeepSpeed (built here from its source package: pure Python), webdataset and their pure-Python or
    # cp312 needs that the GPU image lacks. The GPU machine's python is 3.12, x86_64.
    set -e
    mkdir -p wheels
    PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    "$PY" -m pip wheel -q --no-deps -w wheels deepspeed==0.19.8
    "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d wheels pydantic hjson webdataset braceexpand \
        annotated-types typing-inspection typing-extensions
    CORE=$(unzip -p wheels/pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
    "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d wheels "pydantic-core==$CORE"
    ls -la wheels
    du -sh wheels
    exit 0
fi

START=$(date +%s)
# each part's budget, which its stage limits (with env) add up to (tests/integration/test_benchmark_runs.py checks it)
PART_BUDGETS=([1]=360 [2]=300 [3]=120)
if [ "$PART" = all ]; then
    DEFAULT_BUDGET=$((PART_BUDGETS[1] + PART_BUDGETS[2] + PART_BUDGETS[3]))
else
    DEFAULT_BUDGET=${PART_BUDGETS[$PART]}
fi
# the rehearsal's CPU is no GPU: its stages get three times the time (a cold CPU compile alone takes ~30 s)
SCALE=1
[ "$REHEARSAL" = 1 ] && SCALE=3
BUDGET=${GPU_CHECK_BUDGET_S:-$((DEFAULT_BUDGET * SCALE))}
if [ "$REHEARSAL" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the same script, on the CPU
    CARD=cpu-rehearsal
else
    CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    CARD=${CARD:-unknown-gpu}
fi
SLUG=$(echo "$CARD" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//;s/-*$//')
STAMP=$(date -u +%Y%m%d-%H%M)
NAME="$SLUG-$STAMP-part$PART"
if [ -n "${OUT:-}" ]; then
    RES=$(mktemp -d)/$NAME
else
    RES=$REPO/benchmarks/results/$NAME
fi
mkdir -p "$RES/logs"
LOG=$RES/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
printf 'stage\texit\tseconds\tnote\n' > "$RES/stages.tsv"
echo "gpu_check: card '$CARD', part $PART, results in $RES, budget ${BUDGET}s, rehearsal=$REHEARSAL, python=$PY"
export PYTHONUNBUFFERED=1
# on a shared 2-core machine two OpenMP threads per process spin against other processes: one is steadier
[ "$REHEARSAL" = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FAILED=0

# stage NAME LIMIT_S CMD...: run CMD under `timeout`, log to logs/NAME.log, record exit code and seconds.
stage() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local now elapsed left t0 rc
    now=$(date +%s)
    elapsed=$((now - START))
    left=$((BUDGET - elapsed))
    if [ "$left" -lt 15 ]; then
        echo "=== [$name] skipped: budget spent (${elapsed}s of ${BUDGET}s)"
        printf '%s\t-\t0\tskipped: budget spent\n' "$name" >> "$RES/stages.tsv"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [$name] limit ${limit}s (elapsed ${elapsed}s): $*"
    t0=$(date +%s)
    if [ "$(type -t "$1")" = function ]; then  # a shell function: run it in a child bash
        export -f "$1"
        timeout -k 10 "$limit" bash -c "$(printf '%q ' "$@")" 2>&1 | tee "$RES/logs/$name.log"
    else
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$RES/logs/$name.log"
    fi
    rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0))
    local note=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="timed out after ${limit}s"; elif [ "$rc" != 0 ]; then note=failed; fi
    [ "$rc" != 0 ] && FAILED=$((FAILED + 1))
    echo "=== [$name] exit $rc in ${took}s ($note)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$note" >> "$RES/stages.tsv"
}

skip() {  # skip NAME REASON
    echo "=== [$1] skipped: $2"
    printf '%s\t-\t0\tskipped: %s\n' "$1" "$2" >> "$RES/stages.tsv"
}

# ------------------------------------------------------------------ setup (installs nothing from outside)
setup() {
    if compgen -G "wheels/*.whl" > /dev/null && [ "$REHEARSAL" = 1 ]; then
        echo "rehearsal: not installing wheels/ here (they are for the GPU machine's Python 3.12):"
        ls wheels/*.whl
    elif compgen -G "wheels/*.whl" > /dev/null; then
        echo "installing $(ls wheels/*.whl | wc -l) wheels from wheels/ (no index)"
        "$PY" -m pip install -q --no-index --find-links wheels/ wheels/*.whl || echo "wheel install failed (continuing)"
    else
        echo "no wheels/ folder: DeepSpeed and webdataset stay as the machine has them"
    fi
    if "$PY" -c "import fastmae, fastmae.kernels, fastmae.data" 2>/dev/null; then
        echo "fastmae already importable: $("$PY" -c 'import fastmae; print(fastmae.__file__)')"
    else
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
            "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/fastmae-site .
        [ -f /tmp/fastmae-site/fastmae/__init__.py ] && export PYTHONPATH=/tmp/fastmae-site:${PYTHONPATH:-}
        "$PY" -c "import fastmae, fastmae.kernels, fastmae.data; print('fastmae installed:', fastmae.__file__)"
    fi
}
# setup runs in this shell (it may set PYTHONPATH); pip --no-index cannot wait on a network
T0=$(date +%s)
setup 2>&1 | tee "$RES/logs/setup.log"
RC=${PIPESTATUS[0]}
[ -f /tmp/fastmae-site/fastmae/__init__.py ] && export PYTHONPATH=/tmp/fastmae-site:${PYTHONPATH:-}
printf 'setup\t%s\t%s\t%s\n' "$RC" $(($(date +%s) - T0)) "$([ "$RC" = 0 ] && echo ok || echo failed)" >> "$RES/stages.tsv"
# the stages that are shell functions run in a child bash: what they read is exported
export PY RES REPO REHEARSAL

env_info() {
    date -u
    nvidia-smi || echo "(no nvidia-smi)"
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}")
for m in ("triton", "transformers", "timm", "deepspeed", "webdataset", "nvidia.dali", "flash_attn", "numpy"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m}: not importable ({type(e).__name__})")
EOF
    git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "(no git)"
}
stage env 20 env_info

if [ "$REHEARSAL" = 1 ]; then  # tiny sizes; no torch.compile ablation (a cold CPU compile takes ~30 s)
    P_ALL=debug; P_L=debug; P_H=debug; P_B=debug; QUICK=(--warmup 1 --repeats 2); BIG_BATCH=4; PROF_BATCH=4
    PROF_STEPS=(--warmup 1 --steps 2 --profile-steps 1)
    ABLATE=fused_optimizer,zero,masking,patch_embed,attention,precision
    FLOPS=(--flops-presets debug); MEM_REPEATS=1
    DS_STEPS=3; DS_BATCH=8; Z3_STEPS=2; Z3_BATCH=8
    Z3_BACKEND=aot_eager  # the same graphs, traced and differentiated, without the CPU's slow code generation
else
    # ViT-L first: the goals are stated for it, and part 2 reuses its compiled blocks
    P_ALL=mae_vit_large_patch16,mae_vit_huge_patch14,mae_vit_base_patch16
    P_L=mae_vit_large_patch16; P_H=mae_vit_huge_patch14; P_B=mae_vit_base_patch16; QUICK=(); BIG_BATCH=256
    PROF_BATCH=64; PROF_STEPS=(--warmup 3 --steps 8 --profile-steps 2)
    ABLATE=fused_optimizer,zero,masking,patch_embed,compile,attention,precision
    FLOPS=(); MEM_REPEATS=3
    # the throughput stage's micro batches (ViT-L 128, ViT-B 256): the training runs reuse its compiled blocks
    DS_STEPS=20; DS_BATCH=128; Z3_STEPS=10; Z3_BATCH=256; Z3_BACKEND=inductor
fi

# ------------------------------------------------------------------ part 1: correctness, kernel, throughput
if in_part 1; then
SMALL=False
[ "$REHEARSAL" = 1 ] && SMALL=True
stage ceilings 20 "$PY" -c "
import json, sys, torch
sys.path.insert(0, 'benchmarks')
import common
d = common.pick_device('auto')
c = common.measure_ceilings(d, small=$SMALL)
json.dump(c, open('$RES/ceilings.json', 'w'), indent=2)
print(json.dumps(c, indent=2))
"

# (the rehearsal runs the masking-kernel comparison under the Triton interpreter, on one small shape)
INTERP=()
[ "$REHEARSAL" = 1 ] && INTERP=(env TRITON_INTERPRET=1)
stage correctness 60 "${INTERP[@]}" "$PY" benchmarks/throughput.py --check --presets "$P_ALL" --out "$RES" \
    --name correctness

if [ "$REHEARSAL" = 1 ]; then
    stage kernels 40 "$PY" benchmarks/masking_kernel.py --help
else
    stage kernels 40 "$PY" benchmarks/masking_kernel.py --out "$RES" --budget-s 25
fi

stage throughput 220 "$PY" benchmarks/throughput.py --presets "$P_ALL" "${QUICK[@]}" "${FLOPS[@]}" \
    --out "$RES" --name throughput
fi  # part 1

# ------------------------------------------------------------------ part 2: ablations, memory, DeepSpeed, tests
if in_part 2; then
stage ablations 90 "$PY" benchmarks/throughput.py --presets "$P_L" --variants fastmae --ablations \
    --ablate "$ABLATE" "${QUICK[@]}" --flops-presets "" --no-count --out "$RES" --name throughput_ablations

# eager: the estimate describes the eager step (a compiled one keeps at most as much), and nothing new compiles
stage memory_vit_h 40 "$PY" benchmarks/throughput.py --presets "$P_H" --variants fastmae --batch-size "$BIG_BATCH" \
    --activation-checkpointing both --compile off --warmup 1 --repeats "$MEM_REPEATS" --interleave off \
    --flops-presets "" --no-count --out "$RES" --name memory_vit_h

# DeepSpeed: short runs of the real program on synthetic data through the launcher; no checkpoint is written
ds_run() {
    # a free rendezvous port: 29500, DeepSpeed's default, may be taken by another job on the machine
    local port
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    if [ "$REHEARSAL" = 1 ]; then  # one rank as a single process: the launcher's interpreters cost CPU seconds
        MASTER_PORT=$port "$PY" fastmae/train.py "$@"
    elif command -v deepspeed > /dev/null; then
        deepspeed --num_gpus 1 --master_port "$port" fastmae/train.py "$@"
    else
        "$PY" -c 'import sys; from deepspeed.launcher.runner import main; sys.argv[0] = "deepspeed"; main()' \
            --num_gpus 1 --master_port "$port" fastmae/train.py "$@"
    fi
}
run_args() {  # run_args PRESET STEPS BATCH: the overrides both runs share
    echo "--preset $1 train.steps=$2 train.log_interval=5 data.backend=synthetic data.batch_size=$3" \
        "train.batch_size=$3 train.output_dir=/tmp/fastmae-ds-run-$STAMP-$1 train.checkpoint_interval=0" \
        "train.checkpoint_at_end=false train.progress=false train.resume="
}
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
    skip deepspeed "deepspeed not importable (place its wheels in wheels/)"
    skip zero3_compile "deepspeed not importable (place its wheels in wheels/)"
else
    # shellcheck disable=SC2046
    stage deepspeed 45 ds_run --ds_config zero2.json $(run_args "$P_L" "$DS_STEPS" "$DS_BATCH")
    # shellcheck disable=SC2046
    stage zero3_compile 45 ds_run --ds_config zero3.json train.compile=blocks "train.compile_backend=$Z3_BACKEND" \
        $(run_args "$P_B" "$Z3_STEPS" "$Z3_BATCH")
fi

# GPU-marked tests and the device-aware kernel tests (they run on CUDA when it is there);
# exit 5 (nothing collected) is not a failure. The rehearsal only collects them.
pytest_gpu() {
    # the kernel tests whole (their CUDA paths), then every test marked gpu elsewhere (e.g. DALI "mixed")
    local files rc rc2
    files=$(grep -l -E "mark\.gpu" tests/unit/test_*.py tests/integration/test_*.py 2>/dev/null |
        grep -v test_kernels.py)
    # shellcheck disable=SC2086
    "$PY" -m pytest -q -rs -p no:cacheprovider ${PYTEST_EXTRA:-} tests/integration/test_kernels.py
    rc=$?
    [ "$rc" = 5 ] && { echo "no kernel tests collected"; rc=0; }
    if [ -n "$files" ]; then
        # shellcheck disable=SC2086
        "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu ${PYTEST_EXTRA:-} $files
        rc2=$?
        [ "$rc2" = 5 ] && { echo "no gpu-marked tests collected"; rc2=0; }
        [ "$rc" = 0 ] && rc=$rc2
    fi
    return $rc
}
if [ "$REHEARSAL" = 1 ]; then
    PYTEST_EXTRA=--co stage pytest_gpu 35 pytest_gpu
else
    stage pytest_gpu 35 pytest_gpu
fi

stage profile 25 "$PY" benchmarks/profile_step.py --preset "$P_L" --batch-size "$PROF_BATCH" "${PROF_STEPS[@]}" \
    --out "$RES/profile"
fi  # part 2

# ------------------------------------------------------------------ part 3: data loaders
if in_part 3; then
if [ "$REHEARSAL" = 1 ]; then
    stage data 30 "$PY" benchmarks/data_throughput.py --help
elif ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
    # no DALI here: still measure the torch (PIL) loader feeding the GPU, beside synthetic
    stage data 100 "$PY" benchmarks/data_throughput.py --backends torch,synthetic --repeats 3 --out "$RES"
else
    stage data 100 "$PY" benchmarks/data_throughput.py --repeats 3 --out "$RES"
fi
fi  # part 3

# ------------------------------------------------------------------ summary and hand-back
"$PY" -c "
import sys
from pathlib import Path
sys.path.insert(0, 'benchmarks')
import common
res = Path('$RES')
(res / 'summary.md').write_text(common.gpu_check_summary(res))
" || echo "summary failed"
TOTAL=$(($(date +%s) - START))
echo "gpu_check finished in ${TOTAL}s with $FAILED failed stage(s); results in $RES"
cat "$RES/stages.tsv" | column -t -s $'\t' 2>/dev/null || cat "$RES/stages.tsv"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$RES/summary.md" "$OUT/summary.md" 2>/dev/null
    tar czf "$OUT/$NAME.tar.gz" -C "$(dirname "$RES")" "$NAME"
    cp "$LOG" "$OUT/gpu_check.log"
    echo "packed $OUT/$NAME.tar.gz ($(du -h "$OUT/$NAME.tar.gz" | cut -f1))"
fi
[ "$FAILED" = 0 ]
