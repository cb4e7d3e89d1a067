"""Correctness and speed of kernels/birnn.py on a CUDA device, against the reference and cuDNN.

Run from the repository root: ``python benchmarks/gpu_kernel_check.py [--no-timing]``. Imports the
kernels and the reference straight from their files, so nothing needs to be built or installed.
Prints one line per check, then a table of milliseconds per call: cuDNN, ours as the launcher picks,
and ours with W_hh streamed everywhere (does keeping it resident pay?).
"""
import contextlib
import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kernels import birnn as kernels  # noqa: E402


def load_reference():
    spec = importlib.util.spec_from_file_location("reference", os.path.join(ROOT, "birnn_fast", "reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.birnn_layer


birnn_layer = load_reference()
DEVICE = torch.device("cuda")
PRIMALS = ["input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0"]


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_case(cell, T, B, I, H, seed=0):
    generator = torch.Generator().manual_seed(seed)
    G = kernels.GATES[cell]
    scale = H ** -0.5

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * s).to(DEVICE)

    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[0], lengths[-1] = 1, T
    args = dict(input=randn(T, B, I), weight_ih=randn(2, G * H, I, s=scale), weight_hh=randn(2, G * H, H, s=scale),
                bias_ih=randn(2, G * H, s=scale), bias_hh=randn(2, G * H, s=scale), h0=randn(2, B, H),
                c0=randn(2, B, H) if cell == "LSTM" else torch.empty(0, device=DEVICE, dtype=torch.float64),
                lengths=lengths.to(DEVICE))
    grads = [randn(T, B, 2 * H), randn(2, B, H),
             randn(2, B, H) if cell == "LSTM" else torch.empty(0, device=DEVICE, dtype=torch.float64)]
    return args, grads


def cast(args, dtype):
    return {name: value.to(dtype) if value.is_floating_point() else value for name, value in args.items()}


def reference(cell, args, grads):
    names = PRIMALS if cell == "LSTM" else PRIMALS[:-1]
    args = {name: value.detach().clone().requires_grad_(name in names) for name, value in args.items()}
    outputs = birnn_layer(cell, *args.values())
    used = [(o, g.to(o.dtype)) for o, g in zip(outputs, grads) if o.numel()]
    vjp = torch.autograd.grad([o for o, _ in used], [args[n] for n in names], [g for _, g in used])
    return list(outputs[:2]) + list(vjp)


def ours(cell, args, grads):
    output, h_n, c_n, workspace = kernels.forward(cell, *args.values())
    result = kernels.backward(cell, *grads, args["input"], args["weight_ih"], args["weight_hh"], args["bias_hh"],
                              args["h0"], args["c0"], args["lengths"], output, workspace)
    padded = torch.arange(output.shape[0], device=DEVICE)[:, None] >= args["lengths"][None, :]
    assert (output[padded] == 0).all(), "padded outputs must be exactly 0"
    n = len(PRIMALS) if cell == "LSTM" else len(PRIMALS) - 1
    return [output, h_n] + list(result[:n])


def correctness():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    failures = 0
    for cell in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        # W_hh resident in shared memory or streamed: select_config decides per GPU, Triton version and
        # batch (resident wherever it fits) and each case prints what it picked. fp32 here runs
        # without TF32, so streams above H = 128.
        for T, B, I, H in ((37, 19, 24, 100), (29, 70, 40, 300), (64, 64, 64, 1024)):
            if cell.startswith("RNN") and H == 1024:
                continue
            args, grads = make_case(cell, T, B, I, H)
            exact = reference(cell, args, grads)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                config = ["resident" if kernels._config(cell, args["input"].to(dtype), H, backward).RESIDENT
                          else "streamed" for backward in (False, True)]
                actual = ours(cell, cast(args, dtype), [g.to(dtype) for g in grads])
                torch.cuda.synchronize()
                if dtype == torch.float32:
                    bounds = [1e-4] * len(actual)
                else:
                    low = reference(cell, cast(args, dtype), grads)
                    bounds = [2 * relative_error(x, e) + 1e-3 for x, e in zip(low, exact)]
                errors = [relative_error(a, e) for a, e in zip(actual, exact)]
                ok = all(e <= b for e, b in zip(errors, bounds))
                failures += not ok
                worst = max(range(len(errors)), key=lambda k: errors[k] / bounds[k])
                print(f"{'ok  ' if ok else 'FAIL'} {cell:8s} T={T} B={B} H={H} {str(dtype)[6:]:8s} config={config} "
                      f"worst={errors[worst]:.2e} (bound {bounds[worst]:.1e}, item {worst})", flush=True)
    return failures


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def timing():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    T, B = 512, 64
    for dtype in (torch.float32, torch.bfloat16):
        for H in (256, 512, 1024):
            I = H
            lstm = torch.nn.LSTM(I, H, bidirectional=True).to(DEVICE, dtype)
            x = torch.randn(T, B, I, device=DEVICE, dtype=dtype, requires_grad=True)
            grad = torch.randn(T, B, 2 * H, device=DEVICE, dtype=dtype)
            w = {name: torch.stack([getattr(lstm, f"{name}_l0"), getattr(lstm, f"{name}_l0_reverse")]).detach()
                 for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            h0 = torch.zeros(2, B, H, device=DEVICE, dtype=dtype)
            lengths = torch.full((B,), T, device=DEVICE, dtype=torch.int64)
            args = (x.detach(), w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], h0, h0, lengths)

            def cudnn_fwd():
                with torch.no_grad():
                    lstm(x)

            def cudnn_fwd_bwd():
                out, _ = lstm(x)
                torch.autograd.grad(out, [x] + list(lstm.parameters()), grad)

            def ours_fwd():
                kernels.forward("LSTM", *args)

            def ours_fwd_bwd():
                output, h_n, c_n, ws = kernels.forward("LSTM", *args)
                kernels.backward("LSTM", grad, torch.zeros_like(h_n), torch.zeros_like(c_n), x.detach(),
                                 w["weight_ih"], w["weight_hh"], w["bias_hh"], h0, h0, lengths, output, ws)

            picked = "/".join("resident" if kernels._config("LSTM", x, H, backward).RESIDENT else "streamed"
                              for backward in (False, True))
            times = [timed(f) for f in (cudnn_fwd, ours_fwd, cudnn_fwd_bwd, ours_fwd_bwd)]
            with streamed():
                times[2:2] = [timed(ours_fwd)]
                times.append(timed(ours_fwd_bwd))
            rows.append([str(dtype)[6:], H, picked] + times)
            print("timing", rows[-1], flush=True)
    print(f"\nLSTM bidirectional, T={T}, B={B}, I=H, ms per call ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {kernels.triton.__version__}; fp32 with TF32 allowed, as cuDNN's default). "
          "W_hh: what the launcher picked (forward/backward); 'streamed' columns force streaming everywhere.")
    print("| dtype | H | W_hh | cuDNN fwd | Triton fwd | Triton fwd streamed | cuDNN fwd+bwd | Triton fwd+bwd | "
          "Triton fwd+bwd streamed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, H, picked, *times in rows:
        print(f"| {dtype} | {H} | {picked} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


@contextlib.contextmanager
def streamed():
    """W_hh streamed from L2 on every step even where the launcher would keep it resident."""
    fits = kernels.resident_fits
    kernels.resident_fits = lambda *args, **kwargs: False
    try:
        yield
    finally:
        kernels.resident_fits = fits


if __name__ == "__main__":
    failed = correctness()
    print(f"correctness: {failed} failing case(s)", flush=True)
    if "--no-timing" not in sys.argv:
        timing()
