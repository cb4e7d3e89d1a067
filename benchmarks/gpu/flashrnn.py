"""The FlashRNN baseline: timed in a child process (its CUDA extensions compile at first use, for
minutes, with no way to interrupt them in-process); a call that outlives its timeout is killed.

FlashRNN is taken from the environment, or else from `.whl/flashrnn-*.whl` in the repo (carry
`.whl`; it is unpacked under /tmp). It has no bidirectional mode, so one call runs the input
projection for both directions (one GEMM, as the others include it), the forward direction, the
time-flipped reverse direction, and flips it back: the sum of both directions plus the glue a user
needs.
"""
import glob
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

from benchmarks.gpu import cases, timing
from benchmarks.gpu.cases import DTYPE_NAMES, ROOT, SEED
from benchmarks.gpu.report import fmt_ms, relative_error


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


def worker(protocol_fd):
    """Serve timing requests: one JSON line in on stdin, one JSON line out on protocol_fd."""
    protocol = os.fdopen(protocol_fd, "w", buffering=1)
    import torch
    import torch.nn.functional as F

    path = flashrnn_path()
    if path:
        sys.path.insert(0, path)
    try:
        from flashrnn import flashrnn
    except Exception as error:  # noqa: BLE001 - reported to the parent, which drops FlashRNN
        protocol.write(json.dumps({"fatal": f"import flashrnn failed: {timing.describe(error)}"}) + "\n")
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
            reply["errors"]["all"] = timing.describe(error)
        torch.cuda.empty_cache()
        protocol.write(json.dumps(reply) + "\n")


def _flashrnn_case(torch, F, flashrnn, request):
    backend, dtype_name = request["backend"], DTYPE_NAMES[request["dtype"]]
    dtype = getattr(torch, dtype_name)
    batch, steps, hidden = request["B"], request["T"], request["H"]
    timing.DEVICE = device = request.get("device", "cuda")  # "cpu" with backend "vanilla": --self-test
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
            reply["times"][mode] = timing.time_ms(timing.make_step(forward, leaves + [x], cotangent, mode), Args.warmup_ms, Args.rep_ms)
        except torch.cuda.OutOfMemoryError:
            reply["errors"][mode] = "oom"
            torch.cuda.empty_cache()
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            reply["errors"][mode] = timing.describe(error)
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
            [sys.executable, "-m", "benchmarks.gpu.flashrnn", str(write_fd)], cwd=ROOT,
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


def flashrnn_phase(worker, flashrnn_backends, rows, args, started, save, notes):
    """Fill row["flashrnn"][backend] for every case in rows, backend by backend, within the budget."""
    for backend in flashrnn_backends:
        for group in cases.cases_of(rows):
            first = group[0]
            shape = f"{first['dtype']} B={first['B']} T={first['T']} H={first['H']}"
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                notes.append(f"budget spent before flashrnn {backend} reached {shape} (and the cases after it)")
                print(f"-- budget spent: flashrnn {backend} stops before {shape}")
                break
            request = {"backend": backend, "dtype": first["dtype"], "B": first["B"], "T": first["T"], "H": first["H"],
                       "modes": [row["mode"] for row in group], "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                       "device": timing.DEVICE}
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


if __name__ == "__main__":
    # The child of FlashRNNWorker: python -m benchmarks.gpu.flashrnn PROTOCOL_FD
    worker(int(sys.argv[1]))
