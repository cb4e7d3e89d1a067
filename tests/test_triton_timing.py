"""The forward kernel's TIMING build (%globaltimer stamps per step, benchmarks/gpu/phases.py): off by
default, with no clock read in the default build's SASS; the stamped build compiles for sm_90 without
spills; the interpreter, which has no clock, refuses it with a clear error. Compiles run offline in a
child process without the interpreter (as tests/test_kernels_triton.py's)."""
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from birnn_fast.kernels import config as kernels_config  # noqa: E402
from birnn_fast.kernels import forward as kernels_forward  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.gpu import phases  # noqa: E402

# (cell, dtype, precision, H, resident, timing): the phase stage's resident bf16 H 512 and fp32 TF32
# H 1024 streamed, the GRU's resident; and the default build of the first.
BUILDS = [("LSTM", "bfloat16", "ieee", 512, True, False), ("LSTM", "bfloat16", "ieee", 512, True, True),
          ("LSTM", "float32", "tf32", 1024, False, True), ("GRU", "bfloat16", "ieee", 256, True, True)]
CHILD = r"""
import json, re, sys, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.gpu import sass
from birnn_fast.kernels import config as kernels
for cell, dtype, precision, H, resident, timing in json.loads(sys.argv[2]):
    BB, BH = kernels.RESIDENT_TILE if resident else kernels.STREAM_TILES[0]
    NK, BK = kernels.split_k(H, resident)
    compiled = sass.compile_kernel("birnn_forward_kernel", cell, getattr(torch, dtype), precision, BB, BH, NK, BK,
                                   resident, cc=90, timing=timing)
    code = sass.cuobjdump(compiled, "--dump-sass")
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", sass.cuobjdump(compiled, "--dump-resource-usage")))
    print(json.dumps(dict(timers=code.count("GLOBALTIMER"), spills=sass.round_shape(code)["LOOP_SPILLS"],
                          local=int(usage["LOCAL"]), registers=int(usage["REG"]))), flush=True)
"""


@pytest.fixture(scope="module")
def builds():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", CHILD, ROOT, json.dumps(BUILDS)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_default_build_reads_no_clock(builds):
    assert builds[0]["timers"] == 0, builds[0]


@pytest.mark.parametrize("index", [1, 2, 3], ids=["bf16_resident", "tf32_streamed", "gru_resident"])
def test_timing_build_stamps_without_spills(builds, index):
    record = builds[index]
    assert record["timers"] > 0, record
    assert record["spills"] == 0 and record["local"] == 0, f"the TIMING build spills: {record}"


def test_interpreter_refuses_timing():
    if not kernels_config.interpreted(torch.device("cpu")):
        pytest.skip("the interpreter is not in use")
    T, B, H = 3, 2, 16
    x = torch.randn(T, B, H)
    w = torch.randn(2, 4 * H, H) * 0.2
    b = torch.zeros(2, 4 * H)
    h0 = torch.zeros(2, B, H)
    lengths = torch.full((B,), T)
    config = kernels_config.launch_config("LSTM", B, H, torch.float32, x.device, backward=False)
    buffer = kernels_forward.timing_buffer(config, T, x.device)
    with pytest.raises(ValueError, match="interpreter has none"):
        kernels_forward.forward("LSTM", x, w, w, b, b, h0, h0, lengths, False, config=config, timing=buffer)
    output = kernels_forward.forward("LSTM", x, w, w, b, b, h0, h0, lengths, False, config=config)[0]
    assert torch.isfinite(output).all()


def test_phase_table():
    """Stamps 1 us apart in each phase, steps back to back: every phase 1 us, a step 7 us; unwritten
    steps (-1) left out."""
    steps = 10
    stamps = torch.arange(steps * 8, dtype=torch.int64).view(steps, 8) * 1000
    stamps = stamps - torch.arange(steps)[:, None] * 1000  # each step starts where the last ended
    buffer = stamps.expand(2, 1, 3, steps, 8).clone()
    buffer[0, 0, 0, -1] = -1
    table = phases.phase_table(buffer, steps)
    assert table["step"] == pytest.approx(7.0)
    assert all(table[name] == pytest.approx(1.0) for name in phases.NAMES)
