"""GPU benchmark: FastBiLSTM (Triton backend) against cuDNN's nn.LSTM(bidirectional=True), cuDNN on a
PackedSequence, and FlashRNN (when importable), one layer, I = H.

    python benchmarks/gpu_bench.py --quick --budget-s 240 --out $OUT/gpu.md     # ~3-4 minutes
    python benchmarks/gpu_bench.py --budget-s 1500                              # the full grid
    python benchmarks/gpu_bench.py --B 64 --T 512 --H 768 --dtypes bf16 --modes fwdbwd
    python benchmarks/gpu_bench.py --quick --list                               # print the grid only
    python benchmarks/gpu_bench.py --self-test --out /tmp/gpu.md                # no GPU: every code path
                                                                                # on CPU, tiny shapes

Runs from a plain checkout (no pip install): the repo root goes on sys.path and `kernels/` is
registered as `birnn_fast.kernels`. FlashRNN is taken from the environment, or else from
`.whl/flashrnn-*.whl` in the repo (carry `.whl`; it is unpacked under /tmp).

What is timed (median of CUDA-event times of single calls, after warm-up calls that absorb
Triton/JIT compilation):
- fwd: a forward pass under torch.no_grad();
- fwdbwd: forward, then backward of a fixed random cotangent, every gradient set to None first
  (input, weights and biases all get gradients);
- "ours" / "cuDNN": equal lengths, (T, B, I) input;
- "ours len" / "packed": lengths uniform in [T/4, T] (fixed seed): FastBiLSTM(x, lengths=) against
  pack_padded_sequence -> nn.LSTM -> pad_packed_sequence, packing included as a user pays it;
- "flashrnn <backend>": FlashRNN has no bidirectional mode, so one call runs the input projection
  for both directions (one GEMM, as the others include it), the forward direction, the time-flipped
  reverse direction, and flips it back: the sum of both directions plus the glue a user needs.
  FlashRNN runs in a child process (its CUDA extensions compile at first use, for minutes, with no
  way to interrupt them in-process): a call that outlives --flashrnn-timeout-s is killed, and that
  backend is dropped for the remaining cases. Its compile log goes to <out>_flashrnn.log.
Ratios are baseline / ours: > 1 means ours is faster.
- Time per step: ours in microseconds per time step (fwd / T; fwd+bwd / 2T, two passes over the
  steps) against two floors: the forward's own grid meeting at its grid barrier T times and doing
  nothing else (kernels.barrier_floor), and T launches of a one-element kernel replayed from a CUDA
  graph (the floor of a design with one launch per step).

Before timing, one case per dtype (B=16, T=64, H=256) checks outputs, final states and gradients
against an fp64 reference (cuDNN in fp64) with the same weights, and reports cuDNN's own error in
the same dtype next to ours (flash-attention's rule: ours should be within ~2x of it).
"""
import argparse
import copy
import datetime
import glob
import importlib.util
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FULL_GRID = {"B": [1, 16, 64, 256], "T": [64, 512, 1024], "H": [128, 256, 512, 768, 1024],
             "dtypes": ["fp32", "fp16", "bf16"]}
QUICK_GRID = {"B": [16, 64], "T": [512], "H": [256, 512, 1024], "dtypes": ["fp32", "bf16"]}
CHECK_CASE = (16, 64, 256)  # B, T, H
# Below these relative errors ours passes whatever cuDNN's own error is (cuDNN may be exact-ish in fp32).
CHECK_FLOOR = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
SEED = 0
# "cpu" only for --self-test: the whole script on tiny shapes, without a GPU (Triton interpreted).
DEVICE = "cuda"


def _torch():
    import torch

    return torch


def import_birnn_fast():
    """birnn_fast from this checkout, with kernels/ as birnn_fast.kernels (setup.py's package_dir)."""
    if sys.path[0] != ROOT:
        sys.path.insert(0, ROOT)
    import birnn_fast

    if not os.path.abspath(birnn_fast.__file__).startswith(ROOT):
        print(f"note: birnn_fast imported from {birnn_fast.__file__}, not from this checkout {ROOT}")
    try:
        import birnn_fast.kernels  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "birnn_fast.kernels":
            raise
        kernels = os.path.join(ROOT, "kernels")
        spec = importlib.util.spec_from_file_location(
            "birnn_fast.kernels", os.path.join(kernels, "__init__.py"), submodule_search_locations=[kernels])
        module = importlib.util.module_from_spec(spec)
        sys.modules["birnn_fast.kernels"] = module
        spec.loader.exec_module(module)
        birnn_fast.kernels = module
    return birnn_fast


def synchronize():
    if DEVICE == "cuda":
        _torch().cuda.synchronize()


def time_ms(fn, warmup_ms, rep_ms, min_calls=3, max_calls=200):
    """Median milliseconds of single calls of fn, each bracketed by CUDA events."""
    torch = _torch()
    fn()  # compiles (Triton autotuning, cuDNN plans) outside the warm-up's clock
    synchronize()
    calls, start = 0, time.perf_counter()
    while calls < 2 or (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
        synchronize()
        calls += 1
    estimate_ms = (time.perf_counter() - start) * 1e3 / calls
    count = int(min(max_calls, max(min_calls, math.ceil(rep_ms / max(estimate_ms, 1e-3)))))
    if DEVICE != "cuda":
        times = []
        for _ in range(count):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(end) for begin, end in events)


def make_step(forward, leaves, cotangent, mode):
    """The timed callable: forward() under no_grad, or forward + backward(cotangent)."""
    torch = _torch()
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()
        return step

    def step():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(cotangent)
    return step


def describe(error):
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def cuda_alive():
    """False once an error (illegal address, launch failure) has poisoned the CUDA context."""
    torch = _torch()
    try:
        synchronize()
        torch.zeros(1, device=DEVICE).add_(1).item()
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


def measure(label, fn, args):
    """fn's median ms, or a short string saying why not (printed in full)."""
    torch = _torch()
    try:
        return time_ms(fn, args.warmup_ms, args.rep_ms)
    except torch.cuda.OutOfMemoryError:
        print(f"    {label}: out of memory")
        torch.cuda.empty_cache()
        return "oom"
    except Exception as error:  # noqa: BLE001 - one failing cell must not end the run
        print(f"    {label}: {describe(error)}")
        if args.verbose:
            traceback.print_exc()
        torch.cuda.empty_cache()
        return "err"


def make_lengths(steps, batch):
    torch = _torch()
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(max(1, steps // 4), steps + 1, (batch,), generator=generator)


def build_pair(birnn_fast, hidden, dtype):
    """cuDNN nn.LSTM and FastBiLSTM with the same weights (torch's init, seeded), I = H."""
    torch = _torch()
    torch.manual_seed(SEED)
    reference = torch.nn.LSTM(hidden, hidden, bidirectional=True).to(DEVICE, dtype)
    ours = birnn_fast.FastBiLSTM(hidden, hidden).to(DEVICE, dtype)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def packed_forward(module, x, lengths):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    output, _ = pad_packed_sequence(module(packed)[0], total_length=x.shape[0])
    return output


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    if not bool(actual.isfinite().all()):
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def check_dtype(birnn_fast, dtype_key):
    """Errors of ours and of cuDNN in `dtype` against cuDNN in fp64, same weights and inputs."""
    torch = _torch()
    dtype = getattr(torch, DTYPE_NAMES[dtype_key])
    batch, steps, hidden = CHECK_CASE
    reference, ours = build_pair(birnn_fast, hidden, torch.float64)
    cudnn = torch.nn.LSTM(hidden, hidden, bidirectional=True).to(DEVICE, dtype)
    cudnn.load_state_dict(reference.state_dict())
    ours = ours.to(dtype)
    generator = torch.Generator(device=DEVICE).manual_seed(SEED + 2)
    x64 = torch.randn(steps, batch, hidden, device=DEVICE, dtype=torch.float64, generator=generator)
    cotangent64 = torch.randn(steps, batch, 2 * hidden, device=DEVICE, dtype=torch.float64, generator=generator)
    lengths = make_lengths(steps, batch)

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
            print(f"  fp64 reference on {DEVICE} failed ({describe(error)}); computing it on CPU")
            cpu = run(copy.deepcopy(reference).cpu(), x64.cpu(), cotangent64.cpu(), with_lengths, False)
            expected = {name: value.to(DEVICE) for name, value in cpu.items()}
        theirs = run(cudnn, x64.to(dtype), cotangent64.to(dtype), with_lengths, False)
        mine = run(ours, x64.to(dtype), cotangent64.to(dtype), with_lengths, True)
        for name in expected:
            ours_error = relative_error(mine[name], expected[name])
            cudnn_error = relative_error(theirs[name], expected[name])
            ok = ours_error <= max(2 * cudnn_error, CHECK_FLOOR[dtype_key])
            rows.append((dtype_key, "lengths" if with_lengths else "equal", name, ours_error, cudnn_error, ok))
    return rows


def flashrnn_path():
    """A sys.path entry holding flashrnn: None if importable as is, else the unpacked .whl, else ''."""
    if importlib.util.find_spec("flashrnn") is not None:
        return None
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "flashrnn-*.whl")))
    if not wheels:
        return ""
    # Unpacked, not zip-imported: FlashRNN compiles the .cu files it finds next to its modules.
    target = os.path.join(tempfile.gettempdir(), "birnn_fast_bench_" + os.path.basename(wheels[-1])[:-4])
    if not os.path.isdir(os.path.join(target, "flashrnn")):
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(target)
    return target


def flashrnn_worker(protocol_fd):
    """Serve timing requests: one JSON line in on stdin, one JSON line out on protocol_fd."""
    protocol = os.fdopen(protocol_fd, "w", buffering=1)
    torch = _torch()
    import torch.nn.functional as F

    path = flashrnn_path()
    if path:
        sys.path.insert(0, path)
    try:
        from flashrnn import flashrnn
    except Exception as error:  # noqa: BLE001 - reported to the parent, which drops FlashRNN
        protocol.write(json.dumps({"fatal": f"import flashrnn failed: {describe(error)}"}) + "\n")
        return
    for line in sys.stdin:
        request = json.loads(line)
        reply = {"times": {}, "errors": {}}
        try:
            reply.update(_flashrnn_case(torch, F, flashrnn, request))
        except torch.cuda.OutOfMemoryError:
            reply["errors"]["all"] = "oom"
        except Exception as error:  # noqa: BLE001 - one failing case must not end the worker
            traceback.print_exc()
            reply["errors"]["all"] = describe(error)
        torch.cuda.empty_cache()
        protocol.write(json.dumps(reply) + "\n")


def _flashrnn_case(torch, F, flashrnn, request):
    backend, dtype_name = request["backend"], DTYPE_NAMES[request["dtype"]]
    dtype = getattr(torch, dtype_name)
    batch, steps, hidden = request["B"], request["T"], request["H"]
    global DEVICE
    DEVICE = device = request.get("device", "cuda")  # "cpu" with backend "vanilla": --self-test
    if backend in ("cuda", "cuda_fused"):
        from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

        if CUDA_HOME is None or not is_ninja_available():
            return {"errors": {"all": f"{backend} needs nvcc and ninja (CUDA_HOME={CUDA_HOME}, ninja={is_ninja_available()})"}}
    torch.manual_seed(SEED)
    lstm = torch.nn.LSTM(hidden, hidden, bidirectional=True).to(device)
    weights = [param.detach() for param in lstm.parameters()]
    w_f, r_f, bi_f, bh_f, w_r, r_r, bi_r, bh_r = weights
    # FlashRNN's shapes (its defaults): Wx (B, T, gates, heads, D), R (gates, heads, D_out, D_in),
    # b (gates, heads, D), gate order i, f, z(g), o as torch's: torch's weights map one to one.
    leaves = [
        torch.cat([w_f, w_r]).to(dtype),
        r_f.view(4, 1, hidden, hidden).to(dtype), (bi_f + bh_f).view(4, 1, hidden).to(dtype),
        r_r.view(4, 1, hidden, hidden).to(dtype), (bi_r + bh_r).view(4, 1, hidden).to(dtype),
    ]
    generator = torch.Generator(device=device).manual_seed(SEED + 2)
    x = torch.randn(batch, steps, hidden, device=device, generator=generator).to(dtype)
    cotangent = torch.randn(batch, steps, 2 * hidden, device=device, dtype=dtype, generator=generator)
    w, r_fwd, b_fwd, r_rev, b_rev = leaves

    def forward():
        gates = F.linear(x, w)  # [B, T, 8H]
        forward_gates = gates[..., :4 * hidden].reshape(batch, steps, 4, 1, hidden)
        reverse_gates = gates[..., 4 * hidden:].flip(1).reshape(batch, steps, 4, 1, hidden)
        states_forward, _ = flashrnn(forward_gates, r_fwd, b_fwd, function="lstm", backend=backend, dtype=dtype_name)
        states_reverse, _ = flashrnn(reverse_gates, r_rev, b_rev, function="lstm", backend=backend, dtype=dtype_name)
        # states: (S, B, T, heads, D); state 0 is h.
        return torch.cat([states_forward[0, :, :, 0], states_reverse[0, :, :, 0].flip(1)], dim=-1)

    reply = {"times": {}, "errors": {}}
    start = time.perf_counter()
    with torch.no_grad():
        output = forward()
    if device == "cuda":
        torch.cuda.synchronize()
    reply["first_call_s"] = time.perf_counter() - start
    if tuple(output.shape) != (batch, steps, 2 * hidden):
        raise RuntimeError(f"flashrnn output shape {tuple(output.shape)}, expected {(batch, steps, 2 * hidden)}")
    with torch.no_grad():
        expected = lstm(x.float().transpose(0, 1))[0].transpose(0, 1)
    reply["rel_err_vs_cudnn_fp32"] = relative_error(output.float(), expected)

    class Args:
        warmup_ms, rep_ms, verbose = request["warmup_ms"], request["rep_ms"], False

    for leaf in leaves:
        leaf.requires_grad_(True)
    x.requires_grad_(True)
    for mode in request["modes"]:
        try:
            reply["times"][mode] = time_ms(make_step(forward, leaves + [x], cotangent, mode), Args.warmup_ms, Args.rep_ms)
        except torch.cuda.OutOfMemoryError:
            reply["errors"][mode] = "oom"
            torch.cuda.empty_cache()
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            reply["errors"][mode] = describe(error)
    return reply


class FlashRNNWorker:
    """The parent's handle on the child process; restarted after a crash, killed on a timeout."""

    def __init__(self, log_path):
        self.log_path = log_path
        self.process = None
        self.replies = None

    def start(self):
        read_fd, write_fd = os.pipe()
        self.log = open(self.log_path, "a")
        # stdout too goes to the log: nvcc/ninja output of FlashRNN's verbose builds would flood ours.
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--flashrnn-worker", str(write_fd)],
            stdin=subprocess.PIPE, stdout=self.log, stderr=self.log, pass_fds=(write_fd,), text=True,
            start_new_session=True)
        os.close(write_fd)
        self.replies = os.fdopen(read_fd, "r")

    def ask(self, request, timeout_s):
        """The child's reply, or {"errors": {"all": why}} on timeout or death."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.replies], [], [], timeout_s)
        if not ready:
            self.stop()
            return {"errors": {"all": f"timeout after {timeout_s:.0f} s"}, "timeout": True}
        line = self.replies.readline()
        if not line:
            self.stop()
            return {"errors": {"all": f"worker died (see {self.log_path})"}}
        return json.loads(line)

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            # Its own session: this kills the compiler processes it spawned too, and nothing else.
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.replies.close()
        self.log.close()
        self.process = None


def fmt_ms(value):
    return f"{value:.3f}" if isinstance(value, float) else (value or "")


def fmt_ratio(baseline, ours):
    if isinstance(baseline, float) and isinstance(ours, float) and ours > 0:
        return f"{baseline / ours:.3g}"
    return ""


def table(rows, flashrnn_backends):
    header = ["case", "cuDNN ms", "ours ms", "cuDNN/ours", "packed ms", "ours len ms", "packed/ours len"]
    for backend in flashrnn_backends:
        header += [f"flashrnn {backend} ms", f"flashrnn {backend}/ours"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["case"], fmt_ms(row["cudnn"]), fmt_ms(row["ours"]), fmt_ratio(row["cudnn"], row["ours"]),
                 fmt_ms(row["packed"]), fmt_ms(row["ours_len"]), fmt_ratio(row["packed"], row["ours_len"])]
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


def write_report(path, header, checks, rows, flashrnn_backends, notes):
    text = "\n".join(header) + "\n\n"
    if checks:
        text += "## Correctness (vs cuDNN fp64, B=%d T=%d H=%d)\n\n%s\n\n" % (*CHECK_CASE, check_table(checks))
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
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing cells")
    parser.add_argument("--self-test", action="store_true",
                        help="no GPU needed: tiny shapes on CPU, Triton interpreted, FlashRNN's pure-PyTorch backend")
    parser.add_argument("--flashrnn-worker", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def grid(args):
    base = QUICK_GRID if args.quick else FULL_GRID
    batches, steps, hiddens = args.B or base["B"], args.T or base["T"], args.H or base["H"]
    dtypes = args.dtypes or base["dtypes"]
    # Dtypes innermost: a run cut short by the budget still covers every dtype on the shapes it did.
    return [(dtype, batch, step, hidden) for hidden in hiddens for batch in batches for step in steps for dtype in dtypes]


def main(argv=None):
    args = parse_args(argv)
    if args.flashrnn_worker is not None:
        flashrnn_worker(args.flashrnn_worker)
        return 0
    if args.self_test:
        _self_test_setup(args)
    cases = grid(args)
    if args.list:
        for case in cases:
            print("%s B=%d T=%d H=%d" % case)
        print(f"{len(cases)} cases x {len(args.modes)} modes")
        return 0
    started = time.perf_counter()
    torch = _torch()
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
    birnn_fast = import_birnn_fast()
    from birnn_fast import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    ours_blocked = {key: backends.why_not(os.environ["BIRNN_FAST_BACKEND"], torch.device(DEVICE),
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
        if reason is not None and key in {case[0] for case in cases}:
            notes.append(f"ours cannot run {key}: {reason}")
            print(f"!! ours cannot run {key}: {reason}")

    checks = []
    if not args.no_check:
        print("\n## correctness", flush=True)
        for dtype_key in dict.fromkeys(case[0] for case in cases):
            if ours_blocked[dtype_key]:
                continue
            try:
                rows = check_dtype(birnn_fast, dtype_key)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                notes.append(f"correctness check {dtype_key} failed to run: {describe(error)}")
                continue
            checks += rows
            bad = [row for row in rows if not row[-1]]
            worst = max(rows, key=lambda row: row[3])
            print(f"  {dtype_key}: {'OK' if not bad else 'CHECK FAILED'}; worst ours rel err {worst[3]:.2e} "
                  f"({worst[1]} {worst[2]}; cuDNN {worst[4]:.2e})", flush=True)
            for row in bad:
                print(f"    NO: {row[1]} {row[2]} ours {row[3]:.2e} > 2 x cuDNN {row[4]:.2e}")
        if any(not row[-1] for row in checks):
            notes.append("CORRECTNESS CHECK FAILED for some outputs: see the table above; timings below time them anyway")
        if not cuda_alive():
            print("!! the CUDA context died during the check; stopping")
            print(write_report(out, header, checks, [], [], notes))
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
    for index, (dtype_key, batch, steps, hidden) in enumerate(cases):
        elapsed = time.perf_counter() - started
        if elapsed > main_budget:
            notes.append(f"budget of {main_budget:.0f} s spent after {elapsed:.0f} s: {len(cases) - index} of "
                         f"{len(cases)} cases not started")
            print(f"-- budget spent ({elapsed:.0f} s > {main_budget:.0f} s): {len(cases) - index} cases not started")
            break
        print(f"[{elapsed:6.0f} s] {dtype_key} B={batch} T={steps} H={hidden}", flush=True)
        case_rows = time_case(birnn_fast, dtype_key, batch, steps, hidden, args, ours_blocked[dtype_key])
        torch.cuda.empty_cache()
        if not cuda_alive():
            notes.append(f"the CUDA context died at {dtype_key} B={batch} T={steps} H={hidden}; later cases not run")
            print("!! the CUDA context died; stopping")
            rows += case_rows.values()
            break

        rows += case_rows.values()
        write_report(out, header, checks, rows, report_backends, notes)

    # FlashRNN second, on the cases timed above: its first call per shape may compile for minutes,
    # and it must not starve the comparison with cuDNN of the budget.
    if worker:
        flashrnn_phase(worker, flashrnn_backends, rows, args, started,
                       lambda: write_report(out, header, checks, rows, report_backends, notes), notes)

    if worker:
        worker.stop()
    flashrnn_errors = sorted({f"{backend} {row['dtype']}: {error:.1e}" for row in rows
                              for backend, error in row.get("flashrnn_rel_err", {}).items() if error is not None})
    if flashrnn_errors:
        notes.append("FlashRNN rel err vs cuDNN fp32 (sanity of the weight mapping), worst per backend/dtype: " +
                     ", ".join(_worst(flashrnn_errors)))
    text = write_report(out, header, checks, rows, report_backends, notes)
    print("\n" + text[text.index("## Timings"):] if "## Timings" in text else text)
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    return 0


def time_case(birnn_fast, dtype_key, batch, steps, hidden, args, ours_blocked):
    """{mode: row} with the cuDNN / ours / packed / ours-with-lengths medians of one shape."""
    torch = _torch()
    dtype = getattr(torch, DTYPE_NAMES[dtype_key])
    case_rows = {mode: {"case": f"{dtype_key} B={batch} T={steps} H={hidden} {mode}", "dtype": dtype_key,
                        "B": batch, "T": steps, "H": hidden, "mode": mode, "cudnn": "", "ours": "",
                        "packed": "", "ours_len": "", "flashrnn": {}} for mode in args.modes}
    try:
        reference, ours = build_pair(birnn_fast, hidden, dtype)
        generator = torch.Generator(device=DEVICE).manual_seed(SEED + 2)
        x = torch.randn(steps, batch, hidden, device=DEVICE, dtype=dtype, generator=generator, requires_grad=True)
        cotangent = torch.randn(steps, batch, 2 * hidden, device=DEVICE, dtype=dtype, generator=generator)
        lengths = make_lengths(steps, batch)
    except torch.cuda.OutOfMemoryError:
        print("    inputs: out of memory")
        for row in case_rows.values():
            row.update(cudnn="oom", ours="oom", packed="oom", ours_len="oom")
        return case_rows
    candidates = {
        "cudnn": (lambda: reference(x)[0], list(reference.parameters())),
        "ours": (lambda: ours(x)[0], list(ours.parameters())),
    }
    if not args.no_varlen:
        candidates["packed"] = (lambda: packed_forward(reference, x, lengths), list(reference.parameters()))
        candidates["ours_len"] = (lambda: ours(x, lengths=lengths)[0], list(ours.parameters()))
    for mode, row in case_rows.items():
        for column, (forward, parameters) in candidates.items():
            if column.startswith("ours") and ours_blocked:
                row[column] = "n/a"
                continue
            row[column] = measure(f"{mode} {column}", make_step(forward, parameters + [x], cotangent, mode), args)
        print("    " + mode + ": " + ", ".join(f"{column} {fmt_ms(row[column])}" for column in candidates), flush=True)
    if not ours_blocked:
        floors = step_floors(birnn_fast, x.detach(), hidden, args)
        print("    floors: " + ", ".join(f"{name} {fmt_ms(value)}" for name, value in floors.items()), flush=True)
        for row in case_rows.values():
            row["floors"] = floors
    return case_rows


def step_floors(birnn_fast, x, hidden, args):
    """What T steps cost at the least, in ms: "barrier", the forward's grid meeting at its barrier once
    per step and doing nothing else (kernels.barrier_floor); "launch", one launch per step, T launches
    of a one-element kernel replayed from a CUDA graph (a step-per-launch design's floor)."""
    torch = _torch()
    floors = {"barrier": measure("floor barrier", lambda: birnn_fast.kernels.birnn.barrier_floor("LSTM", x, hidden),
                                 args)}
    if DEVICE != "cuda":
        floors["launch"] = "n/a"
        return floors
    try:
        scratch = torch.zeros(1, device=DEVICE)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(x.shape[0]):
                scratch.add_(1)
        floors["launch"] = measure("floor launch", graph.replay, args)
    except Exception as error:  # noqa: BLE001 - a floor that cannot be taken must not end the run
        print(f"    floor launch: {describe(error)}")
        floors["launch"] = "err"
    return floors


def flashrnn_phase(worker, flashrnn_backends, rows, args, started, save, notes):
    """Fill row["flashrnn"][backend] for every case in rows, backend by backend, within the budget."""
    for backend in flashrnn_backends:
        for group in _cases_of(rows):
            first = group[0]
            shape = f"{first['dtype']} B={first['B']} T={first['T']} H={first['H']}"
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                notes.append(f"budget spent before flashrnn {backend} reached {shape} (and the cases after it)")
                print(f"-- budget spent: flashrnn {backend} stops before {shape}")
                break
            request = {"backend": backend, "dtype": first["dtype"], "B": first["B"], "T": first["T"], "H": first["H"],
                       "modes": [row["mode"] for row in group], "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                       "device": DEVICE}
            reply = worker.ask(request, timeout_s=max(20.0, min(args.flashrnn_timeout_s, args.budget_s - elapsed)))
            if "fatal" in reply:
                notes.append(f"FlashRNN skipped: {reply['fatal']}")
                print(f"[{elapsed:6.0f} s] flashrnn: {reply['fatal']}")
                return
            errors = "; ".join(f"{key}: {value}" for key, value in reply.get("errors", {}).items())
            for row in group:
                measured = reply.get("times", {}).get(row["mode"])
                failed = reply["errors"].get(row["mode"], reply["errors"].get("all", ""))
                row["flashrnn"][backend] = measured if measured is not None else ("oom" if failed == "oom" else "err")
                row.setdefault("flashrnn_rel_err", {})[backend] = reply.get("rel_err_vs_cudnn_fp32")
            summary = ", ".join(f"{row['mode']} {fmt_ms(row['flashrnn'][backend])}" for row in group)
            if "rel_err_vs_cudnn_fp32" in reply:
                summary += f"; rel err vs cuDNN fp32 {reply['rel_err_vs_cudnn_fp32']:.1e}"
            if "first_call_s" in reply:
                summary += f"; first call {reply['first_call_s']:.1f} s"
            print(f"[{elapsed:6.0f} s] flashrnn {backend} {shape}: {summary}{'; ' + errors if errors else ''}", flush=True)
            save()
            if reply.get("timeout"):
                # Every new shape compiles anew: a backend that timed out once would time out on each.
                notes.append(f"flashrnn {backend} dropped at {shape}: {errors}")
                break


def _device_name():
    torch = _torch()
    if DEVICE != "cuda":
        return f"{DEVICE} (self-test: numbers mean nothing)"
    return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)"


def _self_test_setup(args):
    """Run every code path of this script on CPU: the lead's GPU run should not be the first."""
    global DEVICE
    DEVICE = "cpu"
    os.environ["TRITON_INTERPRET"] = "1"  # read by Triton at import: set before anything imports it
    global CHECK_CASE
    CHECK_CASE = (3, 5, 8)
    args.B, args.T, args.H = args.B or [2], args.T or [4], args.H or [8]
    args.dtypes = args.dtypes or ["fp32"]
    args.warmup_ms, args.rep_ms = 1.0, 1.0
    args.flashrnn_backends = ["vanilla"] if args.flashrnn_backends else []


def _cases_of(rows):
    """Rows grouped by case (dtype, B, T, H), modes together, skipping cases whose inputs did not fit."""
    groups = {}
    for row in rows:
        if row["cudnn"] != "oom" or row["ours"] != "oom":
            groups.setdefault((row["dtype"], row["B"], row["T"], row["H"]), []).append(row)
    return list(groups.values())


def _worst(entries):
    """'backend dtype: err' strings -> the largest error per backend and dtype."""
    worst = {}
    for entry in entries:
        key, value = entry.rsplit(": ", 1)
        worst[key] = max(worst.get(key, 0.0), float(value))
    return [f"{key}: {value:.1e}" for key, value in sorted(worst.items())]


if __name__ == "__main__":
    sys.exit(main())
