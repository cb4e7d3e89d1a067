"""The GPU benchmark's report: markdown tables (and a JSON beside them) of the timings, the time per
step against its floors, and the correctness check."""
import json
import os


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    if not bool(actual.isfinite().all()):
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def fmt_ms(value):
    return f"{value:.3f}" if isinstance(value, float) else (value or "")


def fmt_ratio(baseline, ours):
    if isinstance(baseline, float) and isinstance(ours, float) and ours > 0:
        return f"{baseline / ours:.3g}"
    return ""


def fastest(*values):
    numbers = [value for value in values if isinstance(value, float)]
    return min(numbers) if numbers else ""


def table(rows, flashrnn_backends):
    """The timings; 'route' is ours forced onto the cuDNN route, 'dispatched' the faster of ours and the
    route (what the dispatch table written from this run gives)."""
    routed = any(isinstance(row.get("route"), float) for row in rows)
    header = ["case", "cuDNN ms", "ours ms", "cuDNN/ours", "packed ms", "ours len ms", "packed/ours len"]
    if routed:
        header += ["route ms", "cuDNN/dispatched", "route len ms", "packed/dispatched len"]
    for backend in flashrnn_backends:
        header += [f"flashrnn {backend} ms", f"flashrnn {backend}/ours"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["case"], fmt_ms(row["cudnn"]), fmt_ms(row["ours"]), fmt_ratio(row["cudnn"], row["ours"]),
                 fmt_ms(row["packed"]), fmt_ms(row["ours_len"]), fmt_ratio(row["packed"], row["ours_len"])]
        if routed:
            cells += [fmt_ms(row.get("route")), fmt_ratio(row["cudnn"], fastest(row["ours"], row.get("route"))),
                      fmt_ms(row.get("route_len")),
                      fmt_ratio(row["packed"], fastest(row["ours_len"], row.get("route_len")))]
        for backend in flashrnn_backends:
            value = row.get("flashrnn", {}).get(backend)
            cells += [fmt_ms(value), fmt_ratio(value, row["ours"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_table(rows):
    """Microseconds per time step (ms * 1000 / T): ours, forward and forward + backward (two passes over
    the steps), against the floors of step_floors."""
    header = ["case", "ours fwd", "ours fwd+bwd / 2", "barrier floor", "fwd / barrier floor", "launch floor"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    cases = {}
    for row in rows:
        if "floors" in row:
            cases.setdefault(row["case"].rsplit(" ", 1)[0], {})[row["mode"]] = row
    for case, modes in cases.items():
        first = next(iter(modes.values()))
        steps, floors = first["T"], first["floors"]

        def per_step(value, passes=1):
            return value * 1e3 / (passes * steps) if isinstance(value, float) else value

        fwd = per_step(modes["fwd"]["ours"]) if "fwd" in modes else ""
        fwdbwd = per_step(modes["fwdbwd"]["ours"], 2) if "fwdbwd" in modes else ""
        barrier = per_step(floors["barrier"])
        cells = [case, fmt_ms(fwd), fmt_ms(fwdbwd), fmt_ms(barrier), fmt_ratio(fwd, barrier),
                 fmt_ms(per_step(floors["launch"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_table(rows):
    lines = ["| dtype | lengths | tensor | ours rel err | cuDNN rel err (same dtype) | ok |", "|---|---|---|---:|---:|---|"]
    for dtype_key, lengths, name, ours_error, cudnn_error, ok in rows:
        lines.append(f"| {dtype_key} | {lengths} | {name} | {ours_error:.2e} | {cudnn_error:.2e} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def write_report(path, header, checks, rows, flashrnn_backends, notes, check_case):
    text = "\n".join(header) + "\n\n"
    if checks:
        text += "## Correctness (vs cuDNN fp64, B=%d T=%d H=%d)\n\n%s\n\n" % (*check_case, check_table(checks))
    text += "## Timings (median ms; ratios > 1: ours is faster)\n\n" + table(rows, flashrnn_backends) + "\n"
    if any("floors" in row for row in rows):
        text += ("\n## Time per step (median us per time step; floors: the forward's grid only meeting at its "
                 "barrier, and one graph-replayed launch per step; 'fwd / barrier floor' is ours over the "
                 "floor, >= 1)\n\n" + step_table(rows) + "\n")
    if notes:
        text += "\n## Notes\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    with open(os.path.splitext(path)[0] + ".json", "w") as handle:
        json.dump({"header": header, "checks": checks, "rows": rows, "notes": notes}, handle, indent=1)
    return text


def worst(entries):
    """'backend dtype: err' strings -> the largest error per backend and dtype."""
    worst = {}
    for entry in entries:
        key, value = entry.rsplit(": ", 1)
        worst[key] = max(worst.get(key, 0.0), float(value))
    return [f"{key}: {value:.1e}" for key, value in sorted(worst.items())]
