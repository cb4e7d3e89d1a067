"""Issue 34's shape sweep: birnn_fast against torch on every shape of workloads.sweep_cases, torch and
ours interleaved in rounds (as cpu_targets.py), with the page faults and system time per call of
each side beside the times.

    python benchmarks/cpu_sweep.py [--cells LSTM] [--precisions float32] [--modes train,infer]
        [--lengths equal] [--steps 75] [--batches 1,4] [--inputs 512] [--hidden 512,1024]
        [--budget 1.5] [--threads 2] [--block 2] [--clock wall] [--json out.json]
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_sweep.py ...

Each axis takes a comma-separated list (default: the whole axis); the full grid is 5,184 cases, so a
run names the part it measures. Modes: train (input gradient too), train-no-dx (input without
gradient), infer. "varlen" gives ours `lengths=` and torch a PackedSequence (packing included).
Faults and system time come from getrusage over each side's calls (the whole process: OpenMP
threads included).

`--clock cpu` times each call by the process's CPU time instead of the wall clock: with `--threads 1`
(required) a call's CPU time is its own work, unchanged by other processes taking the other cores
or preempting it, so a shared machine still gives the kernels' ratio (not the waits of a loaded one).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_machine  # noqa: E402
import workloads  # noqa: E402
from cpu_targets import median_call, round_ratios  # noqa: E402


def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt, r.ru_stime


def measure(case, budget, block, min_rounds=3, max_rounds=100, clock=time.perf_counter):
    """{impl: {"seconds": [[s] per round], "faults": per call, "system_s": per call}}; no "torch"
    where torch cannot run the case (e.g. its bf16 LSTM without AVX-512)."""
    workload = workloads.Workload(case)
    impls = ["torch", "fast"]
    try:
        workload.step("torch")
    except RuntimeError as error:
        print(f"  torch cannot run {case.name} here: {str(error)[:100]}", file=sys.stderr)
        impls = ["fast"]
    workload.step("fast")
    start = clock()
    for impl in impls:
        workload.step(impl)
    probe = block * (clock() - start)
    rounds = int(min(max_rounds, max(min_rounds, budget / max(probe, 1e-6))))
    results = {impl: {"seconds": [], "faults": 0, "system_s": 0.0} for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            faults, system = usage()
            times = []
            for _ in range(block):
                start = clock()
                workload.step(impl)
                times.append(clock() - start)
            after_faults, after_system = usage()
            results[impl]["seconds"].append(times)
            results[impl]["faults"] += after_faults - faults
            results[impl]["system_s"] += after_system - system
    for impl in impls:
        results[impl]["faults"] /= rounds * block
        results[impl]["system_s"] /= rounds * block
    return results


def axis(text, convert=str):
    return tuple(convert(value) for value in text.split(","))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=axis, default=("LSTM", "GRU", "RNN"))
    parser.add_argument("--precisions", type=axis, default=("float32", "bfloat16"))
    parser.add_argument("--modes", type=axis, default=("train", "train-no-dx", "infer"))
    parser.add_argument("--lengths", type=axis, default=("equal", "varlen"))
    parser.add_argument("--steps", type=lambda text: axis(text, int), default=workloads.SWEEP_STEPS)
    parser.add_argument("--batches", type=lambda text: axis(text, int), default=workloads.SWEEP_BATCHES)
    parser.add_argument("--inputs", type=lambda text: axis(text, int), default=workloads.SWEEP_INPUTS)
    parser.add_argument("--hidden", type=lambda text: axis(text, int), default=workloads.SWEEP_HIDDEN)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of rounds per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=2, help="consecutive calls of one side per round")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time per call (with --threads 1 only)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread's work: it needs --threads 1")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    cases = workloads.sweep_cases(args.cells, args.precisions, args.modes, args.lengths, args.steps, args.batches,
                                  args.inputs, args.hidden)
    facts = cpu_machine.machine_facts()
    print(f"machine: {cpu_machine.describe(facts)}; rounds of {args.block} calls a side; "
          f"{args.clock} clock; {len(cases)} cases\n")
    print("| cell | dtype | mode | lengths | T | B | I | H | torch ms | fast ms | ratio | ratio per round (25-75%) | "
          "faults/call torch / fast | sys ms/call torch / fast |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    records = []
    for case in cases:
        steps, batch, inputs, hidden = workloads.SHAPES[case.shape]
        mode = case.mode if case.input_grad else "train-no-dx"
        results = measure(case, args.budget, args.block, clock=clock)
        fast = results["fast"]
        fast_s = median_call(fast["seconds"])
        head = f"| {case.cell} | {case.precision} | {mode} | {case.lengths} | {steps} | {batch} | {inputs} | {hidden} |"
        record = {"case": case.name, "cell": case.cell, "precision": case.precision, "mode": mode,
                  "lengths": case.lengths, "shape": [steps, batch, inputs, hidden], "results": results}
        records.append(record)
        if "torch" not in results:
            print(f"{head} n/a | {fast_s * 1e3:.2f} | n/a | torch cannot run it | - / {fast['faults']:.0f} | "
                  f"- / {fast['system_s'] * 1e3:.1f} |", flush=True)
            continue
        theirs = results["torch"]
        torch_s = median_call(theirs["seconds"])
        low, high = round_ratios(theirs["seconds"], fast["seconds"])
        record["ratio"] = torch_s / fast_s
        print(f"{head} {torch_s * 1e3:.2f} | {fast_s * 1e3:.2f} | {torch_s / fast_s:.2f} | "
              f"{low:.2f}-{high:.2f} | {theirs['faults']:.0f} / {fast['faults']:.0f} | "
              f"{theirs['system_s'] * 1e3:.1f} / {fast['system_s'] * 1e3:.1f} |", flush=True)
    ratios = [record["ratio"] for record in records if "ratio" in record]
    if ratios:
        below = sum(ratio < 1.0 for ratio in ratios)
        print(f"\n{len(ratios)} cases with torch: ratio min {min(ratios):.2f}, median {statistics.median(ratios):.2f}; "
              f"{below} below 1.0")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": facts, "threads": args.threads, "block": args.block, "clock": args.clock,
                       "cases": records}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
