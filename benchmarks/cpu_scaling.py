"""Issue 34's many-core stage: the CPU model and ISA, what birnn_fast's CPU engine runs, then ours
against torch at 1, 2, 4, 8, 16 threads (those the machine has) and at torch's default count, on the
cases of SCALING_CASES, torch and ours interleaved in rounds (cpu_targets.measure).

    python benchmarks/cpu_scaling.py [--budget 1.0] [--threads 1,2,4,8,16] [--cases sentiment-train,...] [--json out.json]

Meant for the GPU machine's 16-core host (make gpu-check's last stage, <= 3 minutes): every figure
so far comes from 2-core machines, where one thread per direction uses every core.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_machine  # noqa: E402
from cpu_targets import measure, median_call, round_ratios  # noqa: E402
from workloads import Case, sweep_shape  # noqa: E402

SCALING_CASES = {
    "sentiment-train": Case("LSTM", "sentiment", 1, "train", "equal"),
    "sentiment-infer": Case("LSTM", "sentiment", 1, "infer", "equal"),
    "bf16-train": Case("LSTM", "sentiment", 1, "train", "equal", "bfloat16"),
    "autocast-infer": Case("LSTM", "sentiment", 1, "infer", "equal", "autocast"),
    "diarization-train": Case("LSTM", "diarization", 4, "train", "equal"),
    "speech-train": Case("LSTM", "speech", 2, "train", "varlen"),
    # Both directions' W_hh (2 x 16 MiB) past half a 32 MiB L3: the directions run in turn (team.h).
    "wide-infer": Case("LSTM", sweep_shape(75, 4, 512, 1024), 1, "infer", "equal"),
    "wide-train": Case("LSTM", sweep_shape(75, 4, 512, 1024), 1, "train", "equal"),
}


def lscpu():
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "lscpu unavailable"
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L2 cache", "L3 cache")
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip().startswith(keep)]
    flags = next((line for line in text.splitlines() if line.startswith("Flags")), "")
    isa = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16") if f" {flag}" in flags]
    return "; ".join(lines + [f"ISA: {' '.join(isa)}"])


def main():
    default_threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of rounds per case and thread count")
    parser.add_argument("--threads", default=",".join(str(n) for n in (1, 2, 4, 8, 16) if n <= cores))
    parser.add_argument("--cases", default=",".join(SCALING_CASES))
    parser.add_argument("--json")
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.threads.split(",")} | {default_threads})
    print(f"lscpu: {lscpu()}")
    print(f"engine: {torch.ops.birnn_fast_cpu.engine_info()}; torch's default threads: {default_threads}")
    print(f"machine: {cpu_machine.describe(cpu_machine.machine_facts())}\n")
    print("| case | threads | torch ms | fast ms | ratio | ratio per round (25-75%) |")
    print("|---|---:|---:|---:|---:|---|")
    records = []
    for name in args.cases.split(","):
        for threads in counts:
            torch.set_num_threads(threads)
            times, emulated = measure(SCALING_CASES[name], args.budget, block=2, min_rounds=3, max_rounds=50)
            fast = median_call(times["fast"])
            label = f"{name}{' (default)' if threads == default_threads else ''}"
            if "torch" not in times:
                print(f"| {label} | {threads} | n/a | {fast * 1e3:.2f} | n/a | torch cannot run it |", flush=True)
                continue
            theirs = median_call(times["torch"])
            low, high = round_ratios(times["torch"], times["fast"])
            print(f"| {label} | {threads} | {theirs * 1e3:.2f} | {fast * 1e3:.2f} | {theirs / fast:.2f} | "
                  f"{low:.2f}-{high:.2f} |", flush=True)
            records.append({"case": name, "threads": threads, "torch_s": times["torch"], "fast_s": times["fast"],
                            "autocast_emulated": emulated})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"lscpu": lscpu(), "default_threads": default_threads, "cases": records}, handle, indent=1)


if __name__ == "__main__":
    main()
