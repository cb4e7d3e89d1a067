"""Which backend should run the CPU kernel's per-step products? c[M, N] = a[M, K] @ W^T, W (N, K)
reused every step (N = 4H, K = H or I), one thread, through the AVX2 panel kernel
(csrc/cpu/panel_gemm.h), at::mm (MKL) and oneDNN's brgemm ukernel (at::native::cpublas::brgemm,
whole N or 64-column panels), in float32 and bfloat16.

    python benchmarks/cpu_products.py [--budget 0.1] [--json out.json]

JIT-builds cpu_products.cpp (torch.utils.cpp_extension, ~1 minute) and prints GFLOP/s per case,
with the machine (CPU model, torch's CPU capability, ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS
as set). The results decided csrc/cpu/products.h: see benchmarks/results/cpu_*.md.
"""
import argparse
import json
import os

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = (1, 2, 4, 8, 16, 32, 64)
SHAPES = ((256, 1024), (512, 2048))  # (K, N): H = 256 and 512, N = 4H
BACKENDS = {"float32": ("panel", "mm", "brgemm", "brgemm64"), "bfloat16": ("mm", "brgemm", "brgemm64", "half")}


def load_products():
    """The JIT-built extension: cpu_products.cpp, and the kernel's ISA dispatch (csrc/cpu/isa.cpp),
    which its headers call, with the buffer cache its engine_info reports (csrc/cpu/buffers.cpp)."""
    cpu = os.path.join(HERE, "..", "csrc", "cpu")
    sources = [os.path.join(HERE, "cpu_products.cpp"), os.path.join(cpu, "isa.cpp"), os.path.join(cpu, "buffers.cpp")]
    return load("birnn_fast_cpu_products", sources, extra_cflags=["-O3"], verbose=False)


def machine():
    """The facts every CPU result records: CPU model, ISA ceilings, torch version."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "(unset)"),
            "MKL_ENABLE_INSTRUCTIONS": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "(unset)"),
            "torch": torch.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.1, help="seconds per case")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = load_products()
    facts = machine()
    print(" ".join(f"{key}={value}" for key, value in facts.items()))
    results = []
    for dtype, backends in BACKENDS.items():
        for K, N in SHAPES:
            print(f"\n{dtype} K={K} N={N}: GFLOP/s by rows M")
            print(f"| backend | {' | '.join(f'M={m}' for m in ROWS)} | note |")
            print("|---|" + "---:|" * len(ROWS) + "---|")
            for backend in backends:
                row, note = [], ""
                for m in ROWS:
                    gflops, why = module.product_gflops(backend, dtype, m, K, N, args.budget)
                    row.append(gflops)
                    note = why or note
                    results.append({"dtype": dtype, "K": K, "N": N, "M": m, "backend": backend,
                                    "gflop_per_s": gflops, "note": why})
                cells = " | ".join("-" if value < 0 else f"{value:.1f}" for value in row)
                print(f"| {backend} | {cells} | {note} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": facts, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
