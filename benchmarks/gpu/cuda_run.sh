#!/usr/bin/env bash
# The device run of the CUDA cluster kernels (issue 31), one script, about 5 minutes (6.5 at most) on
# an H100 / H200: benchmarks/gpu/cuda_check.py's stages under timeouts, all output in
# $OUT/cuda_check.log and the tables in $OUT/cuda_check.md. Needs the cubins built here
# (make cubins; carried as birnn_fast/cubins) and cuda-bindings (on the GPU image). Laid out as
# check.sh does: birnn_fast with kernels/ as birnn_fast.kernels under /tmp.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-python3}
OUT_DIR=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/cuda_check.log
: > "$LOG"
SITE=$(mktemp -d /tmp/birnn_site.XXXXXX)
mkdir -p "$SITE/birnn_fast"
ln -s "$ROOT"/birnn_fast/*.py "$SITE/birnn_fast/"
ln -s "$ROOT/kernels" "$SITE/birnn_fast/kernels"
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OUT=$OUT_DIR
FAILED=0
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv; ls -la "$ROOT/birnn_fast/cubins";
  $PY -P -c "import torch, cuda.bindings; print(torch.__version__, torch.version.cuda, cuda.bindings.__version__)"; } 2>&1 | tee -a "$LOG"
# Stage limits, 6.5 minutes in all: the l2 exchange's stage took its 50 s from correctness (140 ->
# 130), race (30 -> 20), sanitizer (80 -> 60) and timings (110 -> 100).
for stage in "probes 30" "correctness 130" "l2 50" "race 20" "sanitizer 60" "timings 100"; do
    set -- $stage
    echo "== $1 (limit $2 s)" | tee -a "$LOG"
    timeout -k 10 "$2" $PY -P -m benchmarks.gpu.cuda_check --stage "$1" --out "$OUT_DIR/cuda_check.md" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { FAILED=1; echo "== $1: rc $rc" | tee -a "$LOG"; }
done
rm -rf "$SITE"
exit $FAILED
