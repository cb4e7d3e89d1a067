"""GPU benchmark: FastBiLSTM (Triton backend) against cuDNN's nn.LSTM(bidirectional=True), cuDNN on a
PackedSequence, and FlashRNN (when importable), one layer, I = H. From the repository root:

    python -m benchmarks.gpu.run --quick --budget-s 240 --out $OUT/gpu.md     # ~3-4 minutes
    python -m benchmarks.gpu.run --budget-s 1500                              # the full grid
    python -m benchmarks.gpu.run --B 64 --T 512 --H 768 --dtypes bf16 --modes fwdbwd
    python -m benchmarks.gpu.run --quick --list                               # print the grid only
    python -m benchmarks.gpu.run --self-test --out /tmp/gpu.md                # no GPU: every code path
                                                                              # on CPU, tiny shapes

Runs from a plain checkout (no pip install): the repo root goes on sys.path and `kernels/` is
registered as `birnn_fast.kernels` (cases.import_birnn_fast).

What is timed (timing.py: median of CUDA-event times of single calls, after warm-up calls that absorb
Triton/JIT compilation):
- fwd: a forward pass under torch.no_grad();
- fwdbwd: forward, then backward of a fixed random cotangent, every gradient set to None first
  (input, weights and biases all get gradients);
- "ours" / "cuDNN": equal lengths, (T, B, I) input;
- "ours len" / "packed": lengths uniform in [T/4, T] (fixed seed): FastBiLSTM(x, lengths=) against
  pack_padded_sequence -> nn.LSTM -> pad_packed_sequence, packing included as a user pays it;
- "route" / "route len": ours forced onto the cuDNN route (birnn_fast.dispatch.forcing("cudnn")):
  torch's RNN inside our op, as the dispatch runs it, the backward's recompute included; the dispatch
  table (--dispatch-out) takes, per case and mode, the faster of ours and the route;
- "flashrnn <backend>" (flashrnn.py), run after the other columns within the budget;
Ratios are baseline / ours: > 1 means ours is faster.
- Time per step: ours in microseconds per time step (fwd / T; fwd+bwd / 2T, two passes over the
  steps) against the floors of timing.step_floors.

Before timing, one case per dtype (B=16, T=64, H=256) checks outputs, final states and gradients
against an fp64 reference (cuDNN in fp64) with the same weights, and reports cuDNN's own error in
the same dtype next to ours (flash-attention's rule: ours should be within ~2x of it).
"""
import argparse
import contextlib
import copy
import datetime
import os
import sys
import time
import traceback

import torch

from benchmarks.gpu import cases, timing
from benchmarks.gpu.cases import DTYPE_NAMES, ROOT, SEED
from benchmarks.gpu.flashrnn import FlashRNNWorker, flashrnn_path, flashrnn_phase
from benchmarks.gpu.report import fmt_ms, relative_error, worst, write_report

CHECK_CASE = (16, 64, 256)  # B, T, H
# Below these relative errors ours passes whatever cuDNN's own error is (cuDNN may be exact-ish in fp32).
CHECK_FLOOR = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}


def check_dtype(birnn_fast, dtype_key):
    """Errors of ours and of cuDNN in `dtype` against cuDNN in fp64, same weights and inputs."""
    dtype = getattr(torch, DTYPE_NAMES[dtype_key])
    batch, steps, hidden = CHECK_CASE
    reference, ours = cases.build_pair(birnn_fast, hidden, torch.float64)
    cudnn = torch.nn.LSTM(hidden, hidden, bidirectional=True).to(timing.DEVICE, dtype)
    cudnn.load_state_dict(reference.state_dict())
    ours = ours.to(dtype)
    generator = torch.Generator(device=timing.DEVICE).manual_seed(SEED + 2)
    x64 = torch.randn(steps, batch, hidden, device=timing.DEVICE, dtype=torch.float64, generator=generator)
    cotangent64 = torch.randn(steps, batch, 2 * hidden, device=timing.DEVICE, dtype=torch.float64, generator=generator)
    lengths = cases.make_lengths(steps, batch)

    def run(module, x, cotangent, with_lengths, is_ours):
        x = x.detach().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        if with_lengths:
            if is_ours:
                output, (h_n, c_n) = module(x, lengths=lengths)
            else:
                from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

                packed_output, (h_n, c_n) = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
                output, _ = pad_packed_sequence(packed_output, total_length=steps)
        else:
            output, (h_n, c_n) = module(x)
        output.backward(cotangent)
        return {"output": output, "h_n": h_n, "c_n": c_n, "grad_input": x.grad,
                "grad_weight_hh": module.weight_hh_l0.grad, "grad_weight_ih_reverse": module.weight_ih_l0_reverse.grad}

    rows = []
    for with_lengths in (False, True):
        try:
            expected = run(reference, x64, cotangent64, with_lengths, False)
        except RuntimeError as error:
            # Should cuDNN refuse fp64 RNNs, torch's CPU LSTM computes the same reference.
            print(f"  fp64 reference on {timing.DEVICE} failed ({timing.describe(error)}); computing it on CPU")
            cpu = run(copy.deepcopy(reference).cpu(), x64.cpu(), cotangent64.cpu(), with_lengths, False)
            expected = {name: value.to(timing.DEVICE) for name, value in cpu.items()}
        theirs = run(cudnn, x64.to(dtype), cotangent64.to(dtype), with_lengths, False)
        mine = run(ours, x64.to(dtype), cotangent64.to(dtype), with_lengths, True)
        for name in expected:
            ours_error = relative_error(mine[name], expected[name])
            cudnn_error = relative_error(theirs[name], expected[name])
            ok = ours_error <= max(2 * cudnn_error, CHECK_FLOOR[dtype_key])
            rows.append((dtype_key, "lengths" if with_lengths else "equal", name, ours_error, cudnn_error, ok))
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B {16,64}, T 512, H {256,512,1024}, fp32 + bf16")
    parser.add_argument("--B", type=int, nargs="+", help="batch sizes (overrides the grid)")
    parser.add_argument("--T", type=int, nargs="+", help="sequence lengths (overrides the grid)")
    parser.add_argument("--H", type=int, nargs="+", help="hidden sizes, I = H (overrides the grid)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPE_NAMES), help="(overrides the grid)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new case after this many seconds (the running one finishes)")
    parser.add_argument("--out", help="markdown report (default benchmarks/results/gpu_<date>.md; a .json beside it)")
    parser.add_argument("--warmup-ms", type=float, default=50.0)
    parser.add_argument("--rep-ms", type=float, default=200.0, help="time spent on timed calls per cell (3..200 calls)")
    parser.add_argument("--no-varlen", action="store_true", help="skip the lengths= / PackedSequence columns")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--flashrnn-backends", nargs="*", default=["triton_fused", "cuda_fused"],
                        help="FlashRNN backends to time, in this order (none given: skip FlashRNN); triton_fused "
                             "compiles in seconds, cuda_fused (FlashRNN's default, fastest) with nvcc per shape")
    parser.add_argument("--flashrnn-share", type=float, default=0.35,
                        help="fraction of --budget-s kept for FlashRNN, which runs after the other columns")
    parser.add_argument("--flashrnn-timeout-s", type=float, default=150.0,
                        help="kill a FlashRNN case (compile included) after this long and drop that backend")
    parser.add_argument("--no-tf32", action="store_true", help="forbid TF32 in torch's fp32 matmuls and cuDNN")
    parser.add_argument("--dispatch-out", help="write the dispatch table measured here (birnn_fast/dispatch_table.json's "
                        "format, this GPU's architecture replacing its entries) to this path")
    parser.add_argument("--no-route", action="store_true", help="skip the cuDNN route's columns")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing cells")
    parser.add_argument("--self-test", action="store_true",
                        help="no GPU needed: tiny shapes on CPU, Triton interpreted, FlashRNN's pure-PyTorch backend")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.self_test:
        _self_test_setup(args)
    grid = cases.grid(args)
    if args.list:
        for case in grid:
            print("%s B=%d T=%d H=%d" % case)
        print(f"{len(grid)} cases x {len(args.modes)} modes")
        return 0
    started = time.perf_counter()
    if not args.self_test and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (the CPU suite is `pytest benchmarks/`)")
        return 2
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    date = datetime.datetime.now().strftime("%Y-%m-%d_%H%M")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu_{date}.md")
    # The ops must not quietly fall back to the reference: an unusable Triton backend raises instead.
    os.environ.setdefault("BIRNN_FAST_BACKEND", "triton")
    birnn_fast = cases.import_birnn_fast()
    from birnn_fast import backends

    if args.self_test:
        # CPU tensors go to the ops' CPU kernels: the Triton ones (interpreted) take the C++ ones'
        # place for this process, as in the tests (tests/conftest.py use_backend("triton")).
        global _SELF_TEST_LIBRARY
        # The dispatch itself, so that the route's columns run the cuDNN route's code (torch's CPU RNN).
        from birnn_fast import dispatch

        dispatch.load_engines()
        _SELF_TEST_LIBRARY = torch.library.Library("birnn_fast", "IMPL")
        _SELF_TEST_LIBRARY.impl("forward", dispatch.forward_op, "CPU")
        _SELF_TEST_LIBRARY.impl("backward", dispatch.backward_op, "CPU")
        real_why_not = dispatch.why_not
        dispatch.why_not = lambda engine, device, dtype, *shape: (
            None if engine in ("triton", "cudnn") else real_why_not(engine, device, dtype, *shape))
        backends._load_errors["cpu"] = None
        backends._DTYPES["cpu"] = backends._DTYPES["triton"]
        os.environ["BIRNN_FAST_BACKEND"] = "cpu"

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    ours_blocked = {key: backends.why_not(os.environ["BIRNN_FAST_BACKEND"], torch.device(timing.DEVICE),
                                          getattr(torch, DTYPE_NAMES[key])) for key in DTYPE_NAMES}
    header = [
        f"# birnn_fast GPU benchmark, {date}",
        "",
        f"- device: {_device_name()}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), triton {triton_version}, "
        f"birnn_fast {birnn_fast.__version__} backend {os.environ['BIRNN_FAST_BACKEND']}",
        f"- TF32: cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}",
        f"- 1 layer, bidirectional, I = H; fwd under no_grad, fwdbwd = forward + backward(random cotangent); "
        f"median of CUDA-event times (warm-up {args.warmup_ms:g} ms, ~{args.rep_ms:g} ms of timed calls)",
        f"- command: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}",
    ]
    print("\n".join(header), flush=True)
    notes = []
    for key, reason in ours_blocked.items():
        if reason is not None and key in {case[0] for case in grid}:
            notes.append(f"ours cannot run {key}: {reason}")
            print(f"!! ours cannot run {key}: {reason}")

    checks, unchecked = [], []
    if not args.no_check:
        print("\n## correctness", flush=True)
        for dtype_key in dict.fromkeys(case[0] for case in grid):
            if ours_blocked[dtype_key]:
                continue
            try:
                rows = check_dtype(birnn_fast, dtype_key)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                notes.append(f"correctness check {dtype_key} failed to run: {timing.describe(error)}")
                unchecked.append(dtype_key)
                continue
            checks += rows
            bad = [row for row in rows if not row[-1]]
            worst_row = max(rows, key=lambda row: row[3])
            print(f"  {dtype_key}: {'OK' if not bad else 'CHECK FAILED'}; worst ours rel err {worst_row[3]:.2e} "
                  f"({worst_row[1]} {worst_row[2]}; cuDNN {worst_row[4]:.2e})", flush=True)
            for row in bad:
                print(f"    NO: {row[1]} {row[2]} ours {row[3]:.2e} > 2 x cuDNN {row[4]:.2e}")
        if any(not row[-1] for row in checks):
            notes.append("CORRECTNESS CHECK FAILED for some outputs: see the table above; timings below time them anyway")
        if not timing.cuda_alive():
            print("!! the CUDA context died during the check; stopping")
            print(write_report(out, header, checks, [], [], notes, CHECK_CASE))
            return 1

    flashrnn_backends = list(args.flashrnn_backends)
    worker = None
    if flashrnn_backends:
        if flashrnn_path() == "":
            notes.append("flashrnn not importable and no .whl/flashrnn-*.whl in the repo: FlashRNN skipped")
            flashrnn_backends = []
        else:
            worker = FlashRNNWorker(os.path.splitext(out)[0] + "_flashrnn.log")
    report_backends = list(flashrnn_backends)

    rows = []
    print("\n## timings", flush=True)
    main_budget = args.budget_s * (1 - args.flashrnn_share) if worker else args.budget_s
    for index, (dtype_key, batch, steps, hidden) in enumerate(grid):
        elapsed = time.perf_counter() - started
        if elapsed > main_budget:
            notes.append(f"budget of {main_budget:.0f} s spent after {elapsed:.0f} s: {len(grid) - index} of "
                         f"{len(grid)} cases not started")
            print(f"-- budget spent ({elapsed:.0f} s > {main_budget:.0f} s): {len(grid) - index} cases not started")
            break
        print(f"[{elapsed:6.0f} s] {dtype_key} B={batch} T={steps} H={hidden}", flush=True)
        case_rows = time_case(birnn_fast, dtype_key, batch, steps, hidden, args, ours_blocked[dtype_key])
        torch.cuda.empty_cache()
        if not timing.cuda_alive():
            notes.append(f"the CUDA context died at {dtype_key} B={batch} T={steps} H={hidden}; later cases not run")
            print("!! the CUDA context died; stopping")
            rows += case_rows.values()
            break

        rows += case_rows.values()
        write_report(out, header, checks, rows, report_backends, notes, CHECK_CASE)

    # FlashRNN second, on the cases timed above: its first call per shape may compile for minutes,
    # and it must not starve the comparison with cuDNN of the budget.
    if worker:
        flashrnn_phase(worker, flashrnn_backends, rows, args, started,
                       lambda: write_report(out, header, checks, rows, report_backends, notes, CHECK_CASE), notes)

    if worker:
        worker.stop()
    flashrnn_errors = sorted({f"{backend} {row['dtype']}: {error:.1e}" for row in rows
                              for backend, error in row.get("flashrnn_rel_err", {}).items() if error is not None})
    if flashrnn_errors:
        notes.append("FlashRNN rel err vs cuDNN fp32 (sanity of the weight mapping), worst per backend/dtype: " +
                     ", ".join(worst(flashrnn_errors)))
    if args.dispatch_out:
        write_dispatch_table(args.dispatch_out, rows, header, notes)
    text = write_report(out, header, checks, rows, report_backends, notes, CHECK_CASE)
    print("\n" + text[text.index("## Timings"):] if "## Timings" in text else text)
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    # A run that could not time ours, or whose correctness check failed or could not run, is a failed run.
    blocked = any(ours_blocked[case[0]] for case in grid)
    return 1 if blocked or unchecked or any(not row[-1] for row in checks) else 0


def time_case(birnn_fast, dtype_key, batch, steps, hidden, args, ours_blocked):
    """{mode: row} with the cuDNN / ours / packed / ours-with-lengths medians of one shape."""
    dtype = getattr(torch, DTYPE_NAMES[dtype_key])
    case_rows = {mode: {"case": f"{dtype_key} B={batch} T={steps} H={hidden} {mode}", "dtype": dtype_key,
                        "B": batch, "T": steps, "H": hidden, "mode": mode, "cudnn": "", "ours": "",
                        "packed": "", "ours_len": "", "route": "", "route_len": "", "flashrnn": {}}
                 for mode in args.modes}
    try:
        reference, ours = cases.build_pair(birnn_fast, hidden, dtype)
        generator = torch.Generator(device=timing.DEVICE).manual_seed(SEED + 2)
        x = torch.randn(steps, batch, hidden, device=timing.DEVICE, dtype=dtype, generator=generator, requires_grad=True)
        cotangent = torch.randn(steps, batch, 2 * hidden, device=timing.DEVICE, dtype=dtype, generator=generator)
        lengths = cases.make_lengths(steps, batch)
    except torch.cuda.OutOfMemoryError:
        print("    inputs: out of memory")
        for row in case_rows.values():
            row.update(cudnn="oom", ours="oom", packed="oom", ours_len="oom", route="oom", route_len="oom")
        return case_rows
    candidates = {
        "cudnn": (lambda: reference(x)[0], list(reference.parameters())),
        "ours": (lambda: ours(x)[0], list(ours.parameters())),
    }
    if not args.no_route:
        candidates["route"] = (lambda: ours(x)[0], list(ours.parameters()))
    if not args.no_varlen:
        candidates["packed"] = (lambda: cases.packed_forward(reference, x, lengths), list(reference.parameters()))
        candidates["ours_len"] = (lambda: ours(x, lengths=lengths)[0], list(ours.parameters()))
        if not args.no_route:
            candidates["route_len"] = (lambda: ours(x, lengths=lengths)[0], list(ours.parameters()))
    from birnn_fast import dispatch

    for mode, row in case_rows.items():
        for column, (forward, parameters) in candidates.items():
            if (column.startswith("ours") or column.startswith("route")) and ours_blocked:
                row[column] = "n/a"
                continue
            engine = dispatch.forcing("cudnn") if column.startswith("route") else contextlib.nullcontext()
            with engine:
                row[column] = timing.measure(f"{mode} {column}",
                                             timing.make_step(forward, parameters + [x], cotangent, mode), args)
        print("    " + mode + ": " + ", ".join(f"{column} {fmt_ms(row[column])}" for column in candidates), flush=True)
    if not ours_blocked:
        floors = timing.step_floors(birnn_fast, x.detach(), hidden, args)
        print("    floors: " + ", ".join(f"{name} {fmt_ms(value)}" for name, value in floors.items()), flush=True)
        for row in case_rows.values():
            row["floors"] = floors
    return case_rows


def write_dispatch_table(path, rows, header, notes):
    """The dispatch table of this run (dispatch_table.table_from_rows), other architectures' entries of
    the package's table kept."""
    from benchmarks.gpu.dispatch_table import table_from_rows, write
    from birnn_fast import dispatch

    if timing.DEVICE == "cuda":
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    else:
        arch = "cpu"
    run = f"{os.path.basename(path)} of {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} ({'; '.join(header[2:4])})"
    table = table_from_rows(rows, arch, run, existing=dispatch.load_table())
    write(table, path)
    routed = [f"{entry['dtype']} B={entry['B']} H={entry['H']} {'lengths' if entry['lengths'] else 'equal'} "
              f"{'fwdbwd' if entry['training'] else 'fwd'}" for entry in table["entries"]
              if entry["arch"] == arch and entry["engine"] == "cudnn"]
    notes.append(f"dispatch table for {arch} written to {os.path.basename(path)}: {len(routed)} cases to the cuDNN "
                 f"route" + (": " + ", ".join(routed) if routed else ""))
    print(notes[-1])


def _device_name():
    if timing.DEVICE != "cuda":
        return f"{timing.DEVICE} (self-test: numbers mean nothing)"
    return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)"


def _self_test_setup(args):
    """Run every code path of this script on CPU: the lead's GPU run should not be the first."""
    timing.DEVICE = "cpu"
    os.environ["TRITON_INTERPRET"] = "1"  # read by Triton at import: set before anything imports it
    global CHECK_CASE
    CHECK_CASE = (3, 5, 8)
    args.B, args.T, args.H = args.B or [2], args.T or [4], args.H or [8]
    args.dtypes = args.dtypes or ["fp32"]
    args.warmup_ms, args.rep_ms = 1.0, 1.0
    args.flashrnn_backends = ["vanilla"] if args.flashrnn_backends else []


if __name__ == "__main__":
    sys.exit(main())
