"""The dispatch table (birnn_fast/dispatch_table.json) from a hardware run's timings.

run.py calls ``table_from_rows`` on its rows (``--dispatch-out``): per timed case and mode, the
engine with the lower median, ours (triton) against the cuDNN route as the op runs it (columns
``route`` / ``route_len``: ours forced to BIRNN_FAST_BACKEND=cudnn, the backward's recompute
included). Entries of other architectures in the existing table are kept.

Seeding from a results file that predates the route's columns (``python -m
benchmarks.gpu.dispatch_table benchmarks/results/gpu_2026-12-04_h200.md --arch sm_90``): the route's
fwd+bwd is estimated as cuDNN's fwd+bwd plus cuDNN's fwd (the recompute), its forward as cuDNN's
forward; each such entry says ``"estimated": true``.
"""
import argparse
import json
import os
import re
import sys

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ENGINE_OURS = "triton"
RULE = ("per (arch, dtype, cell, lengths, training), the engine with the lower median at each measured (H, B); "
        "other shapes: the nearest measured point (L1 in log2 H, log2 B), ties to ours")


def entry(arch, dtype_key, batch, hidden, lengths, training, ours_ms, route_ms, cell="LSTM", estimated=False):
    engine = "cudnn" if route_ms < ours_ms else ENGINE_OURS
    result = {"arch": arch, "dtype": DTYPES[dtype_key], "cell": cell, "H": hidden, "B": batch, "lengths": lengths,
              "training": training, "engine": engine,
              "ms": {ENGINE_OURS: round(ours_ms, 3), "cudnn": round(route_ms, 3)}}
    if estimated:
        result["estimated"] = True
    return result


def merged(existing, arch, entries, run):
    """``existing``'s entries of other architectures, then ``entries``; ``run`` names where they came from."""
    kept = [item for item in (existing or {}).get("entries", []) if item["arch"] != arch]
    runs = dict((existing or {}).get("runs", {}))
    runs[arch] = run
    return {"run": run, "runs": runs, "rule": RULE, "entries": kept + entries}


def table_from_rows(rows, arch, run, existing=None):
    """The table from run.py's rows (each with dtype, B, H, mode and the ms columns ours, route, ours_len,
    route_len; a column that is not a number is skipped)."""
    entries = []
    for row in rows:
        training = row["mode"] == "fwdbwd"
        for ours_column, route_column, lengths in (("ours", "route", False), ("ours_len", "route_len", True)):
            ours, route = row.get(ours_column), row.get(route_column)
            if isinstance(ours, float) and isinstance(route, float):
                entries.append(entry(arch, row["dtype"], row["B"], row["H"], lengths, training, ours, route))
    return merged(existing, arch, entries, run)


_ROW = re.compile(r"^\| (fp32|bf16|fp16) B=(\d+) T=(\d+) H=(\d+) (fwd|fwdbwd) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| "
                  r"([\d.]+) \| ([\d.]+) \|")


def table_from_results(text, arch, run, existing=None):
    """The table seeded from a results file's timing table (columns cuDNN, ours, packed, ours len)."""
    parsed = {}
    for line in text.splitlines():
        match = _ROW.match(line)
        if match:
            dtype_key, batch, _, hidden, mode = match.groups()[:5]
            cudnn, ours, packed, ours_len = (float(value) for value in match.groups()[5:])
            parsed[(dtype_key, int(batch), int(hidden), mode)] = (cudnn, ours, packed, ours_len)
    entries = []
    for (dtype_key, batch, hidden, mode), (cudnn, ours, packed, ours_len) in parsed.items():
        training = mode == "fwdbwd"
        forward = parsed.get((dtype_key, batch, hidden, "fwd"))
        if training and forward is None:
            continue
        route = cudnn + forward[0] if training else cudnn
        route_len = packed + forward[2] if training else packed
        entries.append(entry(arch, dtype_key, batch, hidden, False, training, ours, route, estimated=True))
        entries.append(entry(arch, dtype_key, batch, hidden, True, training, ours_len, route_len, estimated=True))
    return merged(existing, arch, entries, run)


def write(table, path):
    with open(path, "w") as file:
        json.dump(table, file, indent=1)
        file.write("\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a benchmarks/results/gpu_*.md file")
    parser.add_argument("--arch", required=True, help="its GPU's architecture, e.g. sm_90")
    parser.add_argument("--run", help="how the table names the run (default: the file and its header)")
    parser.add_argument("--out", default=os.path.join("birnn_fast", "dispatch_table.json"))
    args = parser.parse_args(argv)
    with open(args.results) as file:
        text = file.read()
    header = "; ".join(line[2:] for line in text.splitlines()[:6] if line.startswith("- ")
                       and ("device" in line or "torch" in line))
    run = args.run or f"{args.results} ({header})"
    existing = None
    if os.path.exists(args.out):
        with open(args.out) as file:
            existing = json.load(file)
    table = table_from_results(text, args.arch, run, existing)
    write(table, args.out)
    print(f"wrote {args.out}: {len(table['entries'])} entries, "
          f"{sum(item['engine'] == 'cudnn' for item in table['entries'])} to cudnn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
