#!/usr/bin/env bash
# The many-core CPU stage of issue 34, for the GPU machine's 16-core host (make gpu-check's last
# stage, <= 3 minutes): the C++ CPU library for the image's torch (the .venv's _C is built for this
# machine's torch and would not load there) -- the one `make cpu-stage-lib` built here and the call
# carried, where it was built from these sources, else built in place there (minutes of the device
# budget) -- then benchmarks/cpu_scaling.py:
# lscpu, engine_info (AMX or not: the packed bf16 path's self-check runs at the first bf16 call),
# ours against torch at 1-16 threads and torch's default count. Writes $OUT/cpu_scaling.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${OUT:-benchmarks/results}
THREADS=${CPU_STAGE_THREADS:-1,2,4,8,16}
CASES=${CPU_STAGE_CASES:-sentiment-train,sentiment-infer,bf16-train,autocast-infer,speech-train,diarization-train,wide-infer,wide-train}
# What _C is built from: its sources and the build script.
sources() { cat $(ls csrc/*.cpp csrc/cpu/* setup.py | sort) | sha256sum | cut -c1-16; }
LIB=birnn_fast/_C.$($PY -c 'import sys; print("cpython-%d%d" % sys.version_info[:2])')-x86_64-linux-gnu.so
if [ "${1:-}" = "--record" ]; then  # make cpu-stage-lib: the sources the library just built came from
    sources > "$LIB.sources"
    exit 0
fi
mkdir -p "$OUT_DIR"
if [ -f "$LIB" ] && [ "$(cat "$LIB.sources" 2>/dev/null)" = "$(sources)" ] && \
        PYTHONPATH=$PWD $PY -P -c "import torch, birnn_fast._C" 2>/dev/null; then
    echo "the carried $LIB (built from these sources)"
else
    MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY setup.py -q build_ext --inplace 2>&1 | grep -vE "^(running|copying|creating|\[[0-9]+/[0-9]+\])" | tail -5
fi
# From the checkout: birnn_fast with its _C, without the Triton kernels (not needed on the CPU).
PYTHONPATH=$PWD $PY -P benchmarks/cpu_scaling.py --budget "${CPU_STAGE_BUDGET:-0.5}" --threads "$THREADS" \
    --cases "$CASES" --json "$OUT_DIR/cpu_scaling.json" | tee "$OUT_DIR/cpu_scaling.md"
