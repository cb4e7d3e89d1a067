"""FastBi{LSTM,GRU,RNN} against torch's bidirectional nn.{LSTM,GRU,RNN} on CPU, fp32.

    pytest benchmarks/                                   # ~5 minutes on 2 idle cores (reference backend)
    pytest benchmarks/ --benchmark-max-time=0.3          # shorter: fewer rounds per case (>= 3)
    pytest benchmarks/ --benchmark-json=benchmarks/results/cpu.json && python benchmarks/plot.py
    pytest benchmarks/ --benchmark-disable               # every case once (CI: still runnable)

Each case is one benchmark group holding the pair `torch` / `fast`, so pytest-benchmark's table
reads as pairs; the summary at the end prints the speedups. extra_info carries tokens/s (real
tokens only) and GFLOP/s (useful flops, see workloads.useful_flops). Without the C++ backend built,
`fast` measures the pure-PyTorch reference (birnn_fast warns once). test_peak_memory reports the
peak memory of a training step per side (see peak_memory.py) in the same summary.
"""
import time

import pytest
import torch

import peak_memory
from birnn_fast import backends
from workloads import SHAPES, Workload, all_cases, rounds_for

# Parametrized by name, so that the JSON's params stay plain strings.
CASES = {case.name: case for case in all_cases()}


@pytest.mark.parametrize("impl", ["torch", "fast"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_speed(benchmark, request, case_name, impl, speed_results):
    case = CASES[case_name]
    workload = Workload(case)
    benchmark.group = case.name
    benchmark.extra_info.update(
        cell=case.cell, shape=case.shape, layers=case.layers, mode=case.mode, lengths=case.lengths,
        tokens=workload.tokens, flops=workload.flops, threads=torch.get_num_threads(),
        backend=backends.select(torch.device("cpu"), torch.float32) if impl == "fast" else "torch",
    )
    if benchmark.disabled:
        output = benchmark(workload.step, impl)
    else:
        # The first call warms up (allocator, oneDNN primitives), a second sizes the rounds, so that
        # a 1-second tagging step gets 3 rounds and a 1-millisecond one hundreds, within max_time;
        # a first call slower than max_time already says 3 rounds.
        max_time = float(request.config.getoption("benchmark_max_time"))
        probe = _seconds(workload.step, impl)
        if probe < max_time:
            probe = _seconds(workload.step, impl)
        rounds = rounds_for(probe, max_time)
        output = benchmark.pedantic(workload.step, args=(impl,), rounds=rounds, iterations=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(tokens_per_s=workload.tokens / median, gflop_per_s=workload.flops / median / 1e9)
        speed_results.append((case.name, impl, median, benchmark.extra_info))
    assert output.shape == (*workload.input.shape[:2], 2 * SHAPES[case.shape][3])


def _seconds(function, *args):
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


@pytest.mark.parametrize("lengths", ["equal", "varlen"])
@pytest.mark.parametrize("shape", ["sentiment", "tagging"])
def test_peak_memory(request, shape, lengths, memory_results):
    """Peak RSS growth of one LSTM training step (1 layer), each side in a fresh process; the target
    is fast <= torch. Reported, not asserted: the reference fallback is not expected to meet it."""
    if request.config.getoption("benchmark_disable") and (shape, lengths) != ("sentiment", "varlen"):
        pytest.skip("--benchmark-disable keeps one memory case: enough to know the script still runs")
    peaks = {impl: peak_memory.measure_in_subprocess("LSTM", shape, 1, lengths, impl) for impl in ("torch", "fast")}
    memory_results.append((f"LSTM-{shape}-L1-train-{lengths}", peaks))
    assert all(peak > 0 for peak in peaks.values())
