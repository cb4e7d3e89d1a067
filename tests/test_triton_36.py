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
"""
import contextlib
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


def compile_36(pairs, cc):
    """test_kernels_triton's child (that file as a script) on pairs for sm_cc, Triton 3.6 first on its path."""
    path = os.pathsep.join(filter(None, [TRITON36, os.environ.get("PYTHONPATH", "")]))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=path)
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
