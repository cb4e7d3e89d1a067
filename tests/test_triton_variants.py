"""The forward kernel's variants (kernels/forward.py VARIANTS: cheap changes to a step, off by default,
launch options the device check A/Bs): each computes what the default does, every cell, lengths from 1
to T, through the interpreter on a grid of several programs meeting at the barrier; and each compiles
for sm_90 without spills (offline, in a child process)."""
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
from concurrent_interpreter import concurrent_programs  # noqa: E402
from test_kernels_triton import INTERPRETED, SHARED_LIMIT, make_inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant", sorted(kernels_forward.VARIANTS))
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_variant_as_default(cell, variant):
    if INTERPRETED and variant in kernels_forward.COMPILED_ONLY:
        pytest.skip(f"{variant} runs compiled only (the device check compares it with the default)")
    T, B, H, lengths = 4, 5, 40, [4, 1, 3, 2, 4]
    args = make_inputs(cell, T, B, 3, H, lengths)
    config = None
    context = concurrent_programs
    if INTERPRETED:
        # Three programs per direction meeting at the barrier, as on a GPU.
        config = kernels_config.select_config(cell, B, H, torch.float32, "ieee", 6, SHARED_LIMIT[90], False,
                                              stream_tiles=())
    with context():
        expected = kernels_forward.forward(cell, *args.values(), config=config)
    with context():
        actual = kernels_forward.forward(cell, *args.values(), config=config, variants=(variant,))
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unknown_variant():
    args = make_inputs("LSTM", 2, 2, 3, 16, [2, 1])
    with pytest.raises(ValueError, match="unknown variants"):
        kernels_forward.forward("LSTM", *args.values(), variants=("faster",))
    if INTERPRETED:
        with pytest.raises(ValueError, match="compiled only"):
            kernels_forward.forward("LSTM", *args.values(), variants=tuple(kernels_forward.COMPILED_ONLY))


CHILD = r"""
import json, re, sys, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.gpu import sass
from birnn_fast.kernels import config as kernels
for variant, cell, dtype, precision, H, resident in json.loads(sys.argv[2]):
    BB, BH = kernels.RESIDENT_TILE if resident else kernels.STREAM_TILES[0]
    NK, BK = kernels.split_k(H, resident)
    compiled = sass.compile_kernel("birnn_forward_kernel", cell, getattr(torch, dtype), precision, BB, BH, NK, BK,
                                   resident, cc=90, variants=(variant,))
    code = sass.cuobjdump(compiled, "--dump-sass")
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", sass.cuobjdump(compiled, "--dump-resource-usage")))
    print(json.dumps(dict(variant=variant, cell=cell, spills=sass.round_shape(code)["LOOP_SPILLS"],
                          local=int(usage["LOCAL"]), red="REDG" in code)), flush=True)
"""
BUILDS = [(variant, cell, "bfloat16", "ieee", 512, True) for variant in sorted(kernels_forward.VARIANTS)
          for cell in ("LSTM", "GRU")] + [(variant, "LSTM", "float32", "tf32", 1024, False)
                                          for variant in sorted(kernels_forward.VARIANTS)]


def test_variants_compile_without_spills():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", CHILD, ROOT, json.dumps(BUILDS)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == len(BUILDS)
    for record in records:
        assert record["spills"] == 0 and record["local"] == 0, record
        if record["variant"] == "red_arrive":
            assert record["red"], f"red_arrive's SASS has no RED: {record}"
