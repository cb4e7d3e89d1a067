"""Collects the medians of benchmarks/test_speed.py and prints them as fast-vs-torch pairs at the end,
since pytest-benchmark's own table has no ratio column and cannot show extra_info."""
import pytest
import torch

import cpu_machine

_speed = []
_memory = []


@pytest.fixture
def speed_results():
    """Append (case name, impl, median seconds, extra_info) for the summary."""
    return _speed


@pytest.fixture
def memory_results():
    """Append (case name, {impl: peak bytes}) for the summary."""
    return _memory


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    if _speed:
        medians, info = {}, {}
        for name, impl, median, extra_info in _speed:
            medians.setdefault(name, {})[impl] = median
            info[name, impl] = extra_info
        backends = sorted({extra["backend"] for (_, impl), extra in info.items() if impl == "fast"})
        terminalreporter.section("birnn_fast speed: torch median / fast median (> 1: fast is faster)")
        write(f"fast backend: {', '.join(backends)}; threads: {torch.get_num_threads()}")
        write(f"machine: {cpu_machine.describe(cpu_machine.machine_facts())}")
        write("| case | torch ms | fast ms | speedup | fast tok/s | fast GFLOP/s | torch GFLOP/s |")
        write("|---|---:|---:|---:|---:|---:|---:|")
        for name, pair in medians.items():
            if set(pair) != {"torch", "fast"}:
                continue
            fast, torch_ = info[name, "fast"], info[name, "torch"]
            write(f"| {name} | {pair['torch'] * 1e3:.3f} | {pair['fast'] * 1e3:.3f} | {pair['torch'] / pair['fast']:.2f} | "
                  f"{fast['tokens_per_s']:,.0f} | {fast['gflop_per_s']:.1f} | {torch_['gflop_per_s']:.1f} |")
    if _memory:
        terminalreporter.section("birnn_fast peak memory of one training step (target: fast <= torch)")
        write("| case | torch MiB | fast MiB | fast / torch |")
        write("|---|---:|---:|---:|")
        for name, peaks in _memory:
            write(f"| {name} | {peaks['torch'] / 2**20:.1f} | {peaks['fast'] / 2**20:.1f} | {peaks['fast'] / peaks['torch']:.2f} |")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep the machine facts and the peak-memory results next to the timings, for plot.py and later
    comparisons."""
    output_json["birnn_fast_machine"] = cpu_machine.machine_facts()
    if _memory:
        output_json["birnn_fast_peak_memory"] = [{"case": name, "peak_bytes": peaks} for name, peaks in _memory]
