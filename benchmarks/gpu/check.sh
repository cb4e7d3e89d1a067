#!/usr/bin/env bash
# make gpu-check (on a GPU) / make gpu-selftest (--self-test: CPU, Triton interpreted, tiny sizes).
# Stages, each under `timeout`, all output teed to $OUT/gpu_check.log (OUT defaults to
# benchmarks/results on a GPU, a temporary folder in the self-test):
#   smoke    the environment; a grid twice the SM count must raise, not hang
#   race     the same forward and backward 10 times, bitwise equal
#   pytest   tests/test_triton_gpu.py -m gpu (every cell, fp32/TF32/bf16/fp16, lengths, 2x torch's error),
#            test_triton_precision.py (our error as cuDNN's under each fp32 rule), test_triton_dispatch_gpu.py
#            (the cuDNN route against cuDNN, compiled; the table's engine on this GPU)
#   timings  benchmarks.gpu.run --quick: cuDNN nn.LSTM fp32 and bf16, B 16 and 64, T 512, H 256-1024,
#            fwd and fwd+bwd, lengths against cuDNN + PackedSequence, ours and the cuDNN route, time
#            per step against the barrier floor -> gpu_<date>_<device>.md, and the dispatch table
#            measured here -> dispatch_table.json (copy it to birnn_fast/ to ship it)
#   phases   benchmarks.gpu.phases: the forward kernel's TIMING build, where a step's time goes (wait,
#            load h, products, gate math, stores, arrive) at H 512 B 16 / 64 and H 1024, and the time
#            per step of each of its VARIANTS (launch options: c prefetched, the non-returning arrive,
#            the step-tagged exchange) against the default, each bitwise-compared first; the tagged
#            exchange's TIMING build too; the backward's default against its step-tagged exchange
#   gemms    benchmarks.gpu.references: the launchers' cuBLAS products in IEEE and TF32, ours fp32
#            B 64 H 1024 fwd+bwd with and without the precision rule
#   persist  benchmarks.gpu.references: cuDNN PERSIST_STATIC (fp16, one direction, x2) against cuDNN
#            bidirectional and ours
# Stage limits add up to 8.3 minutes; the timings' own budget ends them sooner.
# Runs from a plain checkout: birnn_fast with kernels/ as birnn_fast.kernels is laid out under /tmp.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-python3}
SELF=""
if [ "${1:-}" = "--self-test" ]; then SELF="--self-test"; fi
if [ -n "$SELF" ]; then
    OUT_DIR=${OUT:-$(mktemp -d /tmp/gpu_selftest.XXXXXX)}
    LIMITS=(120 120 300 300 60 120 120)
    export BIRNN_GPU_CHECK=tiny
else
    OUT_DIR=${OUT:-$ROOT/benchmarks/results}
    LIMITS=(30 40 80 170 125 20 35)
fi
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
: > "$LOG"
SITE=$(mktemp -d /tmp/birnn_site.XXXXXX)
mkdir -p "$SITE/birnn_fast"
ln -s "$ROOT"/birnn_fast/*.py "$ROOT"/birnn_fast/*.json "$SITE/birnn_fast/"
ln -s "$ROOT/kernels" "$SITE/birnn_fast/kernels"
# -P: not the checkout's own birnn_fast/ (without kernels/) from the working directory.
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
SUMMARY=()
FAILED=0
stage() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local verdict=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict="TIMEOUT"; elif [ "$rc" != 0 ]; then verdict="FAILED (rc $rc)"; fi
    [ "$verdict" = ok ] || FAILED=1
    SUMMARY+=("| $name | $verdict | $((SECONDS - started)) s |")
    echo "== $name: $verdict in $((SECONDS - started)) s" | tee -a "$LOG"
}
if [ -n "$SELF" ]; then
    DEVICE_NAME=cpu-selftest
else
    DEVICE_NAME=$($PY -P -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').replace(' ', '-').lower())" 2>/dev/null || echo unknown)
fi
REPORT=$OUT_DIR/gpu_$(date +%Y-%m-%d)_${DEVICE_NAME}.md
stage smoke "${LIMITS[0]}" $PY -P -m benchmarks.gpu.smoke $SELF
stage race "${LIMITS[1]}" $PY -P -m benchmarks.gpu.race $SELF
XDIST=""
if [ -z "$SELF" ] && $PY -P -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
stage pytest "${LIMITS[2]}" $PY -P -m pytest "$ROOT/tests/test_triton_gpu.py" "$ROOT/tests/test_triton_precision.py" \
    "$ROOT/tests/test_triton_dispatch_gpu.py" -m gpu -q -rfEs -p no:cacheprovider $XDIST
if [ -n "$SELF" ]; then
    stage timings "${LIMITS[3]}" $PY -P -m benchmarks.gpu.run --self-test --flashrnn-backends --out "$REPORT" \
        --dispatch-out "$OUT_DIR/dispatch_table.json"
else
    # FlashRNN from .whl/flashrnn-*.whl (carry .whl) when not installed: its Triton backend, then its
    # CUDA one, each case dropped past its own limit (the CUDA backend compiles per shape).
    stage timings "${LIMITS[3]}" $PY -P -m benchmarks.gpu.run --quick --budget-s 145 --warmup-ms 15 --rep-ms 60 \
        --flashrnn-backends triton_fused cuda_fused --flashrnn-timeout-s 45 --out "$REPORT" \
        --dispatch-out "$OUT_DIR/dispatch_table.json"
fi
stage phases "${LIMITS[4]}" $PY -P -m benchmarks.gpu.phases $SELF --append "$REPORT"
stage gemms "${LIMITS[5]}" $PY -P -m benchmarks.gpu.references --stage gemms $SELF --append "$REPORT"
stage persist "${LIMITS[6]}" $PY -P -m benchmarks.gpu.references --stage persist $SELF --append "$REPORT"
{
    echo
    echo "## make gpu-check stages ($(date -u +%Y-%m-%dT%H:%MZ), log: gpu_check.log)"
    echo
    echo "| stage | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$REPORT" "$LOG"
rm -rf "$SITE"
echo "report: $REPORT"
exit $FAILED
