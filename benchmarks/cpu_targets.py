"""Issue 14's target table, torch and birnn_fast interleaved in rounds (so that both see the same
load on a shared machine), with the median call of each side and the spread of the per-round ratio.

    python benchmarks/cpu_targets.py [--budget 4] [--threads 2] [--block 4] [--cases tiny-train,...] [--json out.json]
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_targets.py

Prints a markdown table (case, target, torch ms, fast ms, ratio, ratio spread, ISA, commit) and the
machine (cpu_machine.py). Cases come from workloads.py; "varlen" gives birnn_fast `lengths=` and
torch a PackedSequence (packing included in its time).

A round is `--block` calls of torch, then as many of birnn_fast. Alternated call by call
(`--block 1`), a training step of ours pays for page faults that torch's own step causes: torch's
step frees tens of MB, glibc trims its heap, and our next step touches fresh pages (0 faults per
step alone or in a training loop of ours, 500-5600 right after a torch step on a 2-core Zen 4 VM,
4-11 ms of ~80), a cost no user who replaced nn.LSTM pays. In blocks the first call after a switch
still pays it, and the median call does not.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_machine  # noqa: E402
from workloads import Case, Workload  # noqa: E402

TARGETS = {
    "tiny-train": (Case("LSTM", "tiny", 1, "train", "equal"), 2.0),
    "sentiment-infer": (Case("LSTM", "sentiment", 1, "infer", "equal"), 1.1),
    "sentiment-train": (Case("LSTM", "sentiment", 1, "train", "equal"), 1.3),
    "tagging-varlen-infer": (Case("LSTM", "tagging", 1, "infer", "varlen"), 2.0),
    "tagging-varlen-train": (Case("LSTM", "tagging", 1, "train", "varlen"), 3.0),
    "sentiment-varlen-infer": (Case("LSTM", "sentiment", 1, "infer", "varlen"), 2.0),
    "sentiment-varlen-train": (Case("LSTM", "sentiment", 1, "train", "varlen"), 3.0),
    "bf16-infer": (Case("LSTM", "sentiment", 1, "infer", "equal", "bfloat16"), 1.2),
    "bf16-train": (Case("LSTM", "sentiment", 1, "train", "equal", "bfloat16"), 2.0),
    "autocast-infer": (Case("LSTM", "sentiment", 1, "infer", "equal", "autocast"), 1.2),
    "tts-infer": (Case("LSTM", "tts", 1, "infer", "equal"), 1.3),
    "diarization-train": (Case("LSTM", "diarization", 4, "train", "equal"), 1.3),
    "speech-train": (Case("LSTM", "speech", 2, "train", "varlen"), 1.3),
    # No target: the input without a gradient (features, a frozen embedding).
    "sentiment-train-input-no-grad": (Case("LSTM", "sentiment", 1, "train", "equal", input_grad=False), "—"),
    "bf16-train-input-no-grad": (Case("LSTM", "sentiment", 1, "train", "equal", "bfloat16", input_grad=False), "—"),
}


def seconds(function, *args):
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def measure(case, budget, block=1, min_rounds=5, max_rounds=200):
    """Interleaved rounds of `block` calls of torch then of fast: {impl: [[seconds] per round]}
    (no "torch" where it cannot run), and whether autocast was emulated."""
    workload = Workload(case)
    impls = ["torch", "fast"]
    try:
        workload.step("torch")
    except RuntimeError as error:
        print(f"  torch cannot run {case.name} here: {str(error)[:100]}", file=sys.stderr)
        impls = ["fast"]
    workload.step("fast")
    probe = block * sum(seconds(workload.step, impl) for impl in impls)
    rounds = int(min(max_rounds, max(min_rounds, budget / max(probe, 1e-6))))
    times = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            times[impl].append([seconds(workload.step, impl) for _ in range(block)])
    return times, workload.emulated


def median_call(rounds):
    """The median of every call in [[seconds] per round]."""
    return statistics.median(t for round_ in rounds for t in round_)


def round_ratios(torch_rounds, fast_rounds):
    """The 25% and 75% quantiles of torch's median call over ours, round by round."""
    per_round = sorted(statistics.median(t) / statistics.median(f) for t, f in zip(torch_rounds, fast_rounds))
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else per_round * 3
    return quartiles[0], quartiles[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of rounds per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=4, help="consecutive calls of one side per round")
    parser.add_argument("--cases", default=",".join(TARGETS))
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    facts = cpu_machine.machine_facts()
    isa = facts["onednn_isa"]
    print(f"machine: {cpu_machine.describe(facts)}; rounds of {args.block} calls a side\n")
    print("| case | target | torch ms | fast ms | ratio | ratio per round (25-75%) | rounds | oneDNN ISA | commit |")
    print("|---|---:|---:|---:|---:|---|---:|---|---|")
    records = []
    for name in args.cases.split(","):
        case, target = TARGETS[name]
        times, emulated = measure(case, args.budget, args.block)
        fast = median_call(times["fast"])
        label = name + (" (bf16 model: autocast emulated)" if emulated else "")
        if "torch" not in times:
            print(f"| {label} | {target} | n/a | {fast * 1e3:.2f} | n/a | torch cannot run it here | "
                  f"{len(times['fast'])} | {isa} | {facts['commit']} |", flush=True)
            records.append({"case": name, "fast_s": times["fast"]})
            continue
        torch_ = median_call(times["torch"])
        low, high = round_ratios(times["torch"], times["fast"])
        print(f"| {label} | {target} | {torch_ * 1e3:.2f} | {fast * 1e3:.2f} | {torch_ / fast:.2f} | "
              f"{low:.2f}-{high:.2f} | {len(times['fast'])} | {isa} | {facts['commit']} |", flush=True)
        records.append({"case": name, "target": target, "torch_s": times["torch"], "fast_s": times["fast"],
                        "autocast_emulated": emulated})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": facts, "threads": args.threads, "block": args.block, "cases": records}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
