"""Speedup bars (torch median / fast median per case) from a pytest-benchmark JSON, and the same
numbers as a markdown table on stdout.

    pytest benchmarks/ --benchmark-json=benchmarks/results/cpu.json
    python benchmarks/plot.py [benchmarks/results/cpu.json] [--out benchmarks/results/cpu_speedup.png]

Needs matplotlib (`pip install matplotlib`), for this script only; the benchmarks themselves do not.
"""
import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load_pairs(path):
    """{case: {"torch": median s, "fast": median s}}, in the JSON's order, and the fast backends seen."""
    with open(path) as handle:
        report = json.load(handle)
    pairs, backends = {}, set()
    for bench in report["benchmarks"]:
        impl = bench.get("params", {}).get("impl")
        if impl not in ("torch", "fast"):
            continue
        pairs.setdefault(bench["group"], {})[impl] = bench["stats"]["median"]
        if impl == "fast":
            backends.add(bench.get("extra_info", {}).get("backend", "?"))
    pairs = {case: pair for case, pair in pairs.items() if set(pair) == {"torch", "fast"}}
    return pairs, sorted(backends), report


def machine_line(report):
    """The machine a run recorded (benchmarks/cpu_machine.py), on one or two lines for the chart."""
    facts = report.get("birnn_fast_machine")
    if not facts:
        return report.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    ceilings = " ".join(f"{name}={facts[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                                             "ATEN_CPU_CAPABILITY") if facts.get(name))
    return (f"{facts['cpu']}, torch {facts['torch']} ({facts['torch_cpu_capability']}), oneDNN ISA "
            f"{facts['onednn_isa']}, commit {facts['commit']}{', ' + ceilings if ceilings else ''}\n"
            f"birnn_fast CPU engine: {facts['birnn_fast_cpu']}")


def markdown(pairs, report):
    lines = ["| case | torch median ms | fast median ms | torch / fast |", "|---|---:|---:|---:|"]
    for case, pair in pairs.items():
        lines.append(f"| {case} | {pair['torch'] * 1e3:.3f} | {pair['fast'] * 1e3:.3f} | {pair['torch'] / pair['fast']:.2f} |")
    memory = report.get("birnn_fast_peak_memory")
    if memory:
        lines += ["", "| training step | torch peak MiB | fast peak MiB | fast / torch |", "|---|---:|---:|---:|"]
        for entry in memory:
            peaks = entry["peak_bytes"]
            lines.append(f"| {entry['case']} | {peaks['torch'] / 2**20:.1f} | {peaks['fast'] / 2**20:.1f} | "
                         f"{peaks['fast'] / peaks['torch']:.2f} |")
    return "\n".join(lines)


def plot(pairs, backends, report, out):
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = list(pairs)
    speedups = [pairs[case]["torch"] / pairs[case]["fast"] for case in cases]
    figure, axes = plt.subplots(figsize=(10, 0.32 * len(cases) + 1.5))
    colors = ["tab:green" if speedup >= 1 else "tab:red" for speedup in speedups]
    # Bars grow from parity on a log axis, so 0.5x and 2x are equally long, to either side.
    axes.barh(range(len(cases)), [speedup - 1 for speedup in speedups], left=1.0, color=colors)
    axes.set_xscale("log")
    low, high = min(speedups + [1.0]), max(speedups + [1.0])
    axes.set_xlim(low / 1.5, high * 1.5)
    # Plain ticks at round speedups: the log axis would otherwise label its minor ticks "2x10^0".
    ticks = [tick for tick in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8) if low / 1.5 <= tick <= high * 1.5]
    axes.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    axes.set_yticks(range(len(cases)), cases, fontsize=7)
    axes.invert_yaxis()
    axes.axvline(1.0, color="black", linewidth=0.8)
    for row, speedup in enumerate(speedups):
        axes.text(speedup, row, f" {speedup:.2f}x", va="center", fontsize=7)
    axes.set_xlabel("speedup over torch (torch median / fast median), log scale")
    axes.set_title(f"birnn_fast vs torch on CPU (fast backend: {', '.join(backends)})\n{machine_line(report)}",
                   fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", default=os.path.join(HERE, "results", "cpu.json"))
    parser.add_argument("--out", help="PNG path (default: next to the JSON, <name>_speedup.png)")
    args = parser.parse_args()
    pairs, backends, report = load_pairs(args.json)
    if not pairs:
        raise SystemExit(f"{args.json} holds no torch/fast pairs: was it written by `pytest benchmarks/ --benchmark-json=...`?")
    out = args.out or os.path.splitext(args.json)[0] + "_speedup.png"
    print(f"fast backend: {', '.join(backends)}")
    print(f"machine: {machine_line(report)}\n")
    print(markdown(pairs, report))
    try:
        plot(pairs, backends, report, out)
    except ImportError as error:
        raise SystemExit(f"the plot needs matplotlib ({error}); pip install matplotlib") from error
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
