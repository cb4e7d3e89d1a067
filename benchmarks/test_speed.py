"""FastBi{LSTM,GRU,RNN} against torch's bidirectional nn.{LSTM,GRU,RNN} on CPU: fp32, bf16, an fp32
model under autocast(bfloat16), three shapes of real clients (workloads.all_cases), and a sample of
the shape sweep (workloads.sweep_sample; the whole sweep: cpu_sweep.py).

    pytest benchmarks/                                   # ~5 minutes on 2 idle cores (reference backend)
    pytest benchmarks/ --benchmark-max-time=0.3          # shorter: fewer rounds per case (>= 3)
    pytest benchmarks/ --benchmark-json=benchmarks/results/cpu.json && python benchmarks/plot.py
    pytest benchmarks/ --benchmark-disable               # every case once (CI: still runnable)

Each case is one benchmark group holding the pair `torch` / `fast`, so pytest-benchmark's table
reads as pairs; the summary at the end prints the speedups. extra_info carries tokens/s (real
tokens only) and GFLOP/s (useful flops, see workloads.useful_flops). Without the C++ backend built,
`fast` measures the pure-PyTorch reference (birnn_fast warns once). test_peak_memory reports the
peak memory of a training step per side (see peak_memory.py) in the same summary. The JSON and the
summary record the machine (cpu_machine.py): CPU model, torch's and oneDNN's ISA, what birnn_fast's
CPU engine runs, torch version, commit. `make bench-avx2` runs it all under the AVX2 ceiling.
"""
import time

import pytest
import torch

import peak_memory
from birnn_fast import backends
from workloads import SHAPES, Workload, all_cases, rounds_for, sweep_sample

# Parametrized by name, so that the JSON's params stay plain strings.
CASES = {case.name: case for case in all_cases() + sweep_sample()}


@pytest.mark.parametrize("impl", ["torch", "fast"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_speed(benchmark, request, case_name, impl, speed_results):
    case = CASES[case_name]
    # --benchmark-disable (CI) only checks that every case runs: 8 steps of each are enough.
    workload = Workload(case, max_steps=8 if benchmark.disabled else None)
    if impl == "torch" and case.precision == "autocast":
        try:
            workload.step(impl)
        except RuntimeError as error:  # oneDNN's bf16 LSTM needs AVX-512 (avx512_core)
            pytest.skip(f"torch's LSTM under autocast(bfloat16) does not run on this CPU: {str(error)[:120]}")
    benchmark.group = case.name
    dtype = torch.float32 if case.precision == "float32" else torch.bfloat16
    benchmark.extra_info.update(
        cell=case.cell, shape=case.shape, layers=case.layers, mode=case.mode, lengths=case.lengths,
        precision=case.precision, autocast_emulated=workload.emulated,
        tokens=workload.tokens, flops=workload.flops, threads=torch.get_num_threads(),
        backend=backends.select(torch.device("cpu"), dtype) if impl == "fast" else "torch",
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
    if case.precision != "float32":
        assert output.dtype == torch.bfloat16


SCALING = ["sentiment-train", "diarization-train", "speech-train", "wide-train"]


@pytest.mark.parametrize("impl", ["torch", "fast"])
@pytest.mark.parametrize("threads", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("scaling_case", SCALING)
def test_speed_threads(benchmark, request, scaling_case, threads, impl, speed_results):
    """The scaling table: the same case at 1-16 threads, each side at the same count (cpu_scaling.py
    adds torch's default count and the CPU's description)."""
    from cpu_scaling import SCALING_CASES

    case = SCALING_CASES[scaling_case]
    if benchmark.disabled and threads not in (1, 4):
        pytest.skip("--benchmark-disable runs 1 and 4 threads: enough to know the cases still run")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        workload = Workload(case, max_steps=8 if benchmark.disabled else None)
        benchmark.group = f"{case.name}@{threads}threads"
        benchmark.extra_info.update(threads=threads, tokens=workload.tokens, flops=workload.flops,
                                    backend="torch" if impl == "torch" else backends.select(torch.device("cpu"),
                                                                                         torch.float32))
        if benchmark.disabled:
            benchmark(workload.step, impl)
            return
        max_time = float(request.config.getoption("benchmark_max_time"))
        rounds = rounds_for(_seconds(workload.step, impl), max_time)
        benchmark.pedantic(workload.step, args=(impl,), rounds=rounds, iterations=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(tokens_per_s=workload.tokens / median, gflop_per_s=workload.flops / median / 1e9)
        speed_results.append((benchmark.group, impl, median, benchmark.extra_info))
    finally:
        torch.set_num_threads(previous)


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


def test_cpu_products_script_builds_and_runs():
    """benchmarks/cpu_products.py's extension still builds against the kernel's headers and runs
    every backend once (its figures are for the results files, not asserted here)."""
    import cpu_products

    module = cpu_products.load_products()
    for dtype, names in cpu_products.BACKENDS.items():
        for name in names:
            gflops, why = module.product_gflops(name, dtype, 3, 64, 128, 0.001)
            assert gflops > 0 or why, (name, dtype)
