"""Peak memory of one CPU training step (forward + backward), FastBi* vs torch, one fresh process each.

    python benchmarks/peak_memory.py                       # LSTM, sentiment and tagging, 1 layer
    python benchmarks/peak_memory.py --cell GRU --shape tagging --layers 2 --lengths varlen

torch's CPU tensors are invisible to tracemalloc, so this reads the kernel's own count: the process's
peak resident set (VmHWM) during one step, minus its resident set just before it. The peak is reset
through /proc/self/clear_refs after a warm-up step, so that one-time library state (oneDNN, thread
pools) is not charged to the step. glibc's mmap threshold is pinned to one page in the child, so that
every tensor larger than a page is mmapped and returned to the kernel when freed. With a higher
threshold, tensors below it come from glibc's heap, whose pages stay resident after the warm-up step
and are reused by the measured one: they would not count. At 128 KiB that hid most of the per-step
tensors of torch's PackedSequence path (sentiment with lengths: 26.9 MiB seen, 33.0 MiB at one page).
"""
import argparse
import gc
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_here(cell, shape, layers, lengths, impl):
    """Bytes the peak RSS rises above the pre-step RSS during one training step, and the method used."""
    sys.path.insert(0, HERE)
    from workloads import Case, Workload

    workload = Workload(Case(cell, shape, layers, "train", lengths))
    before_warmup = _status_kib("VmRSS")
    workload.step(impl)
    workload.modules[impl].zero_grad(set_to_none=True)
    workload.input.grad = None
    gc.collect()
    if _reset_peak():
        baseline, method = _status_kib("VmRSS"), "VmHWM after clear_refs"
    else:
        # No reset: the warm-up step's peak stands, library state included; an overestimate.
        baseline, method = before_warmup, "VmHWM since before the warm-up step"
    output = workload.step(impl)
    peak = _status_kib("VmHWM") - baseline
    del output
    return peak * 1024, method


def measure_in_subprocess(cell, shape, layers, lengths, impl):
    """Peak bytes of one training step of `impl` ("fast" or "torch"), measured in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096")
    command = [sys.executable, os.path.abspath(__file__), "--child", cell, shape, str(layers), lengths, impl]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=5, metavar=("CELL", "SHAPE", "LAYERS", "LENGTHS", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--cell", default="LSTM", choices=["LSTM", "GRU", "RNN"])
    parser.add_argument("--shape", nargs="+", default=["sentiment", "tagging"])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lengths", nargs="+", default=["equal", "varlen"], choices=["equal", "varlen"])
    args = parser.parse_args()
    if args.child:
        cell, shape, layers, lengths, impl = args.child
        peak, method = measure_here(cell, shape, int(layers), lengths, impl)
        print(json.dumps({"peak_bytes": peak, "method": method}))
        return
    print("| case | torch peak MiB | fast peak MiB | fast / torch |")
    print("|---|---:|---:|---:|")
    for shape in args.shape:
        for lengths in args.lengths:
            peaks = {impl: measure_in_subprocess(args.cell, shape, args.layers, lengths, impl) for impl in ("torch", "fast")}
            print(f"| {args.cell}-{shape}-L{args.layers}-train-{lengths} | {peaks['torch'] / 2**20:.1f} | "
                  f"{peaks['fast'] / 2**20:.1f} | {peaks['fast'] / peaks['torch']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
