"""The SASS report (``make sass-report``): per configuration family, what a step of the time loop
waits on, compiled offline for sm_90 as the launcher launches it (fp32 state, divisibility hints as
at H, B, T multiples of 16).

    TRITON_INTERPRET=0 python -m benchmarks.gpu.sass_report --out benchmarks/results/sass_after.md
    TRITON_INTERPRET=0 python -m benchmarks.gpu.sass_report --out tagged.md --kernels forward \
        --variants tagged_exchange --resident-k 1024

(--variants: launch options of kernels/forward.py and backward.py VARIANTS, each kernel those it has;
--resident-k: the resident configurations' K; --kernels: forward, backward or both.)

Columns (sass.round_shape): the chain of dependent global loads a round waits on before its first
matrix product (from the round's start, or from the barrier's poll when the round follows it), all
global loads there, the dependent global loads from the barrier's wait to the program's next arrive
and the loads issued between its arrive and wait, the dependent global loads of a streamed K chunk, CTA barriers (BAR) per step at one round (+ per K chunk where W_hh streams), spill instructions in the
time loop, registers per thread, and a digest of the SASS (the same digest in two reports: the same
code).
"""
import argparse
import datetime
import hashlib
import re
import subprocess
import sys
import time

import torch
import triton

from benchmarks.gpu import sass
from birnn_fast.kernels import config as kernels

FAMILIES = [(fn_name, cell, dtype, precision, resident)
            for fn_name in ("birnn_forward_kernel", "birnn_backward_kernel")
            for cell in ("LSTM", "GRU", "RNN_TANH")
            for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee"))
            for resident in (True, False)
            if cell == "LSTM" or precision != "ieee" or dtype != torch.float32]
RESIDENT_K = 256
CC = 90


def family_config(cell, resident, resident_k=RESIDENT_K):
    if resident:
        return (*kernels.RESIDENT_TILE, *kernels.split_k(resident_k, True), True)
    return (16, 16, kernels.STREAM_NK, kernels.STREAM_BK, False)


def sass_digest(code):
    """A short digest of a cuobjdump --dump-sass, without its header lines (the temporary file's name)."""
    body = "\n".join(line for line in code.splitlines() if line.lstrip().startswith("/*"))
    return hashlib.sha1(body.encode()).hexdigest()[:10]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    parser.add_argument("--variants", default="", help="comma-separated VARIANTS names to switch on")
    parser.add_argument("--resident-k", type=int, default=RESIDENT_K)
    parser.add_argument("--kernels", choices=("forward", "backward", "both"), default="both")
    args = parser.parse_args(argv)
    wanted = [name for name in args.variants.split(",") if name]
    unknown = set(wanted) - set().union(*map(set, sass.KERNEL_VARIANTS.values()))
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "kernels"], capture_output=True, text=True).stdout.strip()
    rows = []
    started = time.perf_counter()
    for fn_name, cell, dtype, precision, resident in FAMILIES:
        if args.kernels != "both" and fn_name != f"birnn_{args.kernels}_kernel":
            continue
        config = family_config(cell, resident, args.resident_k)
        variants = [name for name in wanted if name in sass.KERNEL_VARIANTS[fn_name]]
        compiled = sass.compile_kernel(fn_name, cell, dtype, precision, *config, cc=CC, hints=True, variants=variants)
        code = sass.cuobjdump(compiled, "--dump-sass")
        shape = sass.round_shape(code)
        registers = int(re.search(r"REG:(\d+)", sass.cuobjdump(compiled, "--dump-resource-usage")).group(1))
        variant = f"resident K{args.resident_k}" if resident else "streamed 16x16"
        barriers = shape["BARRIERS"] + (shape["BARRIERS_PER_K_CHUNK"] if resident else 0)
        barrier_text = str(barriers) if resident else f"{barriers} + {shape['BARRIERS_PER_K_CHUNK']} per K chunk"
        dependent = "-" if shape["DEPENDENT_LOADS"] is None else str(shape["DEPENDENT_LOADS"])
        chunk = "-" if resident or shape["K_CHUNK_DEPENDENT_LOADS"] is None else str(shape["K_CHUNK_DEPENDENT_LOADS"])
        loads = "-" if shape["LOADS_BEFORE_MMA"] is None else str(shape["LOADS_BEFORE_MMA"])
        rows.append(f"| {fn_name.split('_')[1]} | {cell} | {sass.SIGNATURE_DTYPES[dtype]}-{precision} | {variant} | "
                    f"{dependent} | {loads} | {shape['WAIT_TO_ARRIVE']} | {shape['ARRIVE_TO_WAIT']} | {chunk} | {barrier_text} | "
                    f"{shape['LOOP_SPILLS']} | "
                    f"{registers} | {sass_digest(code)} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"# SASS report{': ' + args.title if args.title else ''}",
        "",
        f"Kernels at {commit}{' (kernels/ modified)' if dirty else ''}, Triton {triton.__version__}, sm_{CC}, "
        f"{datetime.date.today()}: `make sass-report` ({time.perf_counter() - started:.0f} s"
        f"{', variants ' + ', '.join(wanted) if wanted else ''}). Each configuration "
        "compiled as launched on a grid with a barrier: fp32 state, divisibility-by-16 hints (H, B, T multiples "
        "of 16, aligned tensors), SAVE=True.",
        "",
        "- dependent loads: global-memory round trips in a chain that a round waits on before its first matrix "
        "product (HMMA), counted from the round's start or the barrier's poll before it (scoreboard waits on global "
        "loads issued since the last counted wait); '-': the dot runs on FMA units (fp32 ieee).",
        "- loads: every global load issued there.",
        "- wait -> arrive: dependent global loads from the grid barrier's wait (acquire) to the program's next "
        "arrive (release), through the loop's back edge where needed: the memory round trips on a step's "
        "critical path between two barriers; a static count, which includes the loads of a step's later rounds "
        "(the kernels' `bb != pid_b` branch), which a one-round step does not run.",
        "- loads arrive -> wait: global loads issued between the program's arrive and its wait (the next step's "
        "program-local operands): they overlap the wait instead of lying on the critical path.",
        "- dependent loads per K chunk (W_hh streamed): global-memory round trips a K chunk waits on before its "
        "last matrix product, from the K loop's head; 0 where its operands were loaded during the previous chunk's "
        "products; '-': resident, or the dot runs on FMA units.",
        "- CTA barriers: BAR instructions in one step's code at one round (each poll of the grid barrier adds its own).",
        "- spills: STL / LDL in the time loop.",
        "- SASS: a digest of the kernel's SASS (the same in two reports: the same code).",
        "",
        "| kernel | cell | dtype-dot | W_hh | dependent loads before 1st MMA | loads before 1st MMA | dependent loads "
        "wait -> arrive | loads arrive -> wait | dependent loads per K chunk | CTA barriers per step | loop spills | "
        "registers | SASS |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
        *rows,
        "",
    ])
    with open(args.out, "w") as handle:
        handle.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
