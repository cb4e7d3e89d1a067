"""Whether the GPU image's Triton (3.6, torch 2.11's pin) builds the two options config.checked_triton
turns on from 3.9 without spills: every selectable configuration (sm_80 and sm_90) under 3.6's rules
whose build depends on them, the forward's fused-gate product (config.fused_gates) and the backward's
double-buffered streamed K loop (config.double_buffered_backward), switched on and compiled by Triton
3.6, its shared memory within the GPU's limit, no spills in the time loop, W_hh's tiles hoisted
(test_kernels_triton's check_usage). The same child as test_kernels_triton's compile tests, with
Triton 3.6 first on its path. What it found decides config.checked_triton for 3.6.

Triton 3.6 comes from BIRNN_FAST_TRITON36, a directory holding ``pip install --target DIR --no-deps
triton==3.6.0`` (``make triton36`` makes build/triton36 and runs the quick subset); without it these
tests skip. Quick subset: the heaviest builds (test_kernels_triton.quick_configs); -m slow: all.

Also the forward's step-tagged exchange (kernels/forward.py VARIANTS) as the device check builds it on
the GPU image: without spills in its step loop under Triton 3.6 too (a few seconds a build).
"""
import contextlib
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from birnn_fast.kernels import config as kernels  # noqa: E402
import test_kernels_triton as compile_tests  # noqa: E402

TRITON36 = os.environ.get("BIRNN_FAST_TRITON36", "")
CHILD_SCRIPT = compile_tests.__file__
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def as_triton_36():
    """config's rules as they read under Triton 3.6 (the child's), whichever Triton this process has,
    with both options on."""
    saved = kernels.TRITON_VERSION, kernels.checked_triton
    kernels.TRITON_VERSION, kernels.checked_triton = (3, 6), lambda: True
    try:
        yield
    finally:
        kernels.TRITON_VERSION, kernels.checked_triton = saved


def option_dependent(config):
    """Whether the build of config depends on fused_gates or double_buffered_backward (as_triton_36)."""
    fn_name, cell, dtype, precision, BB, BH, NK, BK, resident = config
    if fn_name == "birnn_backward_kernel":
        return not resident and kernels.double_buffered_backward()
    return kernels.fused_gates(cell, dtype, precision, BB, BH, NK * BK, resident, backward=False)


def builds_36(cc, quick):
    """(config, hints) of the option-dependent selectable configurations under 3.6, each unhinted and
    those of test_kernels_triton.hinted_configs hinted; quick: of its quick_configs only."""
    with as_triton_36():
        configs = compile_tests.quick_configs(cc) if quick else list(compile_tests.selectable_configs(cc))
        configs = [config for config in configs if option_dependent(config)]
        hinted = [config for config in compile_tests.hinted_configs(cc) if config in configs]
    return compile_tests.builds(cc, configs, hinted)


def env_36():
    """A child's environment: compiled (not interpreted) Triton, 3.6 first on its path."""
    path = os.pathsep.join(filter(None, [TRITON36, os.environ.get("PYTHONPATH", "")]))
    return dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=path)


def compile_36(pairs, cc):
    """test_kernels_triton's child (that file as a script) on pairs for sm_cc, Triton 3.6 first on its path."""
    env = env_36()
    ids = [compile_tests.config_id(config, hints) for config, hints in pairs]
    return subprocess.Popen([sys.executable, CHILD_SCRIPT, str(cc), "--expect-triton", "3.6", "--options-on", *ids], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def usage_of(request, test_name, quick):
    if not TRITON36:
        pytest.skip("BIRNN_FAST_TRITON36 is not set (make triton36)")
    wanted = {(item.callspec.params["cc"], compile_tests.config_id(item.callspec.params["config"],
                                                                    item.callspec.params["hints"]))
              for item in request.session.items if getattr(item, "originalname", None) == test_name}
    children = {}
    for cc in sorted(compile_tests.SHARED_LIMIT):
        pairs = [pair for pair in builds_36(cc, quick) if (cc, compile_tests.config_id(*pair)) in wanted]
        if pairs:
            children[cc] = compile_36(pairs, cc)
    return compile_tests.collect(children)


@pytest.fixture(scope="module")
def quick_usage_36(request):
    return usage_of(request, "test_triton_36_compiles_without_spills", quick=True)


@pytest.fixture(scope="module")
def full_usage_36(request):
    return usage_of(request, "test_triton_36_every_config_compiles_without_spills", quick=False)


def by_cc(quick):
    return [pytest.param(config, hints, cc, id=f"{compile_tests.config_id(config, hints)}-sm{cc}")
            for cc in sorted(compile_tests.SHARED_LIMIT) for config, hints in builds_36(cc, quick)]


@pytest.mark.parametrize("config,hints,cc", by_cc(quick=True))
def test_triton_36_compiles_without_spills(quick_usage_36, config, hints, cc):
    with as_triton_36():
        compile_tests.check_usage(quick_usage_36, config, hints, cc)


@pytest.mark.slow
@pytest.mark.parametrize("config,hints,cc", by_cc(quick=False))
def test_triton_36_every_config_compiles_without_spills(full_usage_36, config, hints, cc):
    with as_triton_36():
        compile_tests.check_usage(full_usage_36, config, hints, cc)


def test_options_follow_checked_triton():
    """Both options are on from 3.9, off with 3.6 (until its sweep is clean) and any other Triton."""
    for version, expected in (((3, 9), True), ((3, 10), True), ((3, 6), False), ((3, 7), False)):
        saved = kernels.TRITON_VERSION
        kernels.TRITON_VERSION = version
        try:
            assert kernels.double_buffered_backward() == expected, version
            assert kernels.fused_gates("LSTM", torch.bfloat16, "ieee", 16, 16, 512, True, False) == expected, version
        finally:
            kernels.TRITON_VERSION = saved


# The forward's step-tagged exchange as the device check builds it with Triton 3.6 (benchmarks/gpu/phases.py:
# the LSTM in bf16 at H 512 and 1024, in fp32 under TF32 at H 1024, on an H100's 132 SMs, as select_config
# picks under 3.6's rules), each as the JIT launches aligned tensors at H a multiple of 16 (hinted) and
# its TIMING build; the K = 1024 LSTM also unhinted (H not a multiple of 16); the GRU and RNN resident at
# K = 1024, the widest resident tile; the LSTM and GRU in fp32 under TF32 resident at K = 512, the widest
# resident fp32 tile. (cell, dtype, precision, B, H, hints, timing, resident)
TAGGED_BUILDS = [("LSTM", "bfloat16", "ieee", 16, 1024, True, False, True),
                 ("LSTM", "bfloat16", "ieee", 16, 1024, True, True, True),
                 ("LSTM", "bfloat16", "ieee", 16, 1024, False, False, True),
                 ("LSTM", "bfloat16", "ieee", 16, 512, True, False, True),
                 ("LSTM", "bfloat16", "ieee", 16, 512, True, True, True),
                 ("LSTM", "float32", "tf32", 16, 1024, True, False, False),
                 ("LSTM", "float32", "tf32", 16, 1024, True, True, False),
                 ("GRU", "bfloat16", "ieee", 16, 1024, True, False, True),
                 ("RNN_TANH", "bfloat16", "ieee", 16, 1024, True, False, True),
                 ("LSTM", "float32", "tf32", 16, 512, True, False, True),
                 ("GRU", "float32", "tf32", 16, 512, True, False, True)]
TAGGED_CHILD = r"""
import json, re, sys, torch, triton
sys.path.insert(0, sys.argv[1])
from benchmarks.gpu import sass
from birnn_fast.kernels import config as kernels
assert triton.__version__.startswith("3.6."), triton.__version__
for cell, dtype, precision, B, H, hints, timing, _ in json.loads(sys.argv[2]):
    config = kernels.select_config(cell, B, H, getattr(torch, dtype), precision, 132, 227 * 1024)
    compiled = sass.compile_kernel("birnn_forward_kernel", cell, getattr(torch, dtype), precision, *config[:5], cc=90,
                                   hints=hints, fused=config.FUSED, timing=timing, variants=("tagged_exchange",))
    code = sass.cuobjdump(compiled, "--dump-sass")
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", sass.cuobjdump(compiled, "--dump-resource-usage")))
    print(json.dumps(dict(config=str(config), resident=config.RESIDENT, K=config.NK * config.BK,
                          spills=sass.round_shape(code)["LOOP_SPILLS"], local=int(usage["LOCAL"]),
                          registers=int(usage["REG"]))), flush=True)
"""


@pytest.fixture(scope="module")
def tagged_builds_36():
    if not TRITON36:
        pytest.skip("BIRNN_FAST_TRITON36 is not set (make triton36)")
    result = subprocess.run([sys.executable, "-c", TAGGED_CHILD, ROOT, json.dumps(TAGGED_BUILDS)], env=env_36(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == len(TAGGED_BUILDS)
    return records


def tagged_id(build):
    cell, dtype, precision, _, H, hints, timing, _ = build
    return f"{cell}-{dtype}-{precision}-H{H}{'-hinted' if hints else ''}{'-timing' if timing else ''}"


@pytest.mark.parametrize("index", range(len(TAGGED_BUILDS)), ids=[tagged_id(build) for build in TAGGED_BUILDS])
def test_triton_36_tagged_exchange_compiles_without_spills(tagged_builds_36, index):
    """sm_90, Triton 3.6: the tagged forward's step loop without spills (a resident tile's exchange
    addresses are one base and constant offsets: kernels/forward.py PADDED), resident where the device
    check's launch is (K = 1024 included)."""
    record = tagged_builds_36[index]
    assert record["resident"] == TAGGED_BUILDS[index][-1], record
    assert record["spills"] == 0 and record["local"] == 0, f"the tagged build spills under Triton 3.6: {record}"
