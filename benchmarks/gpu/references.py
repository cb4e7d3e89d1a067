"""Two short device-check stages beside the main timings (check.sh):

``--stage gemms``: the launchers' cuBLAS products at fp32 B 64, H 1024, T 512 (input projection, dX,
dW_ih, dW_hh: 2 x 4H x H x T*B each) in IEEE fp32 and in TF32, and ours fwd+bwd there with the
precision rule (kernels.config.rnn_gemm_precision: cuDNN's RNN rule, TF32 by default) and without
it (the products in torch.backends.cuda.matmul's rule, IEEE by default): the rule's before / after.

``--stage persist``: the fastest public GPU LSTM, cuDNN's PERSIST_STATIC algorithm, which torch
picks by itself for fp16, one direction, H % 128 == 0, B % 8 == 0: a unidirectional fp16
nn.LSTM, timed once and counted twice (two directions run one after the other), against cuDNN's
bidirectional fp16 LSTM (the STANDARD algorithm) and ours in fp16, forward and fwd+bwd.

From the repository root: ``python -m benchmarks.gpu.references --stage gemms`` (``--self-test``:
CPU, tiny shapes, interpreted).
"""
import argparse
import contextlib
import os
import sys

import torch

from benchmarks.gpu import cases, timing


def _args(warmup_ms, rep_ms):
    return argparse.Namespace(warmup_ms=warmup_ms, rep_ms=rep_ms, verbose=True)


def gemms(birnn_fast, size, args):
    from birnn_fast.kernels import config as kernels_config

    T, B, H = size
    G = 4
    device = timing.DEVICE
    x = torch.randn(T * B, H, device=device)
    w_ih = torch.randn(2 * G * H, H, device=device) * H ** -0.5
    dgates = torch.randn(T * B, 2 * G * H, device=device)
    flat = dgates.view(T * B, 2, G * H)
    products = {
        "input projection": lambda: x @ w_ih.t(),
        "dX": lambda: dgates @ w_ih,
        "dW_ih": lambda: flat.permute(1, 2, 0) @ x,
        "dW_hh": lambda: flat.permute(1, 2, 0) @ x,  # h_prev has x's shape at I = H
    }
    flops = 2 * 2 * G * H * H * T * B
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    rows = []
    try:
        for precision in ("ieee", "tf32"):
            matmul.fp32_precision = precision
            total = 0.0
            for name, product in products.items():
                ms = timing.measure(f"{name} {precision}", product, args)
                total += ms if isinstance(ms, float) else 0.0
                rows.append((name, precision, ms))
            rows.append(("all four", precision, total))
    finally:
        matmul.fp32_precision = saved
    print(f"\n## The launchers' cuBLAS products, fp32 T={T} B={B} H={H} ({flops / 1e12:.3f} TFLOP each)\n")
    print("| product | precision | ms | TFLOP/s |\n|---|---|---:|---:|")
    for name, precision, ms in rows:
        rate = (4 if name == "all four" else 1) * flops / (ms * 1e-3) / 1e12 if isinstance(ms, float) and ms else 0
        print(f"| {name} | {precision} | {ms if isinstance(ms, str) else f'{ms:.3f}'} | {rate:.1f} |")

    reference, ours = cases.build_pair(birnn_fast, H, torch.float32)
    inputs = torch.randn(T, B, H, device=device, requires_grad=True)
    cotangent = torch.randn(T, B, 2 * H, device=device)
    step = timing.make_step(lambda: ours(inputs)[0], list(ours.parameters()) + [inputs], cotangent, "fwdbwd")
    rule = kernels_config.rnn_gemm_precision
    from birnn_fast import dispatch

    results = {}
    with dispatch.forcing("triton"):
        results["with the rule (cuDNN's RNN flag)"] = timing.measure("ours with the rule", step, args)
        kernels_config.rnn_gemm_precision = contextlib.nullcontext
        try:
            results["without (torch's matmul flag)"] = timing.measure("ours without the rule", step, args)
        finally:
            kernels_config.rnn_gemm_precision = rule
    print(f"\n## Ours fp32 fwd+bwd T={T} B={B} H={H}, cudnn.rnn.fp32_precision="
          f"{torch.backends.cudnn.rnn.fp32_precision}, matmul.fp32_precision={matmul.fp32_precision}\n")
    print("| launchers' products | ms |\n|---|---:|")
    for name, ms in results.items():
        print(f"| {name} | {ms if isinstance(ms, str) else f'{ms:.3f}'} |")


def persist(birnn_fast, sizes, steps, args):
    from birnn_fast import dispatch

    device = timing.DEVICE
    dtype = torch.float16 if device == "cuda" else torch.float32
    print(f"\n## cuDNN PERSIST_STATIC (fp16, one direction, timed once, x2) against cuDNN bidirectional and ours "
          f"(fp16, T={steps}, ms)\n")
    print("| B | H | mode | persist x2 | cuDNN bi | ours | persist x2 / ours |\n|---:|---:|---|---:|---:|---:|---:|")
    for batch, hidden in sizes:
        torch.manual_seed(0)
        one = torch.nn.LSTM(hidden, hidden).to(device, dtype)
        reference, ours = cases.build_pair(birnn_fast, hidden, dtype)
        x = torch.randn(steps, batch, hidden, device=device, dtype=dtype, requires_grad=True)
        for mode in ("fwd", "fwdbwd"):
            times = {}
            for name, module, width in (("persist", one, hidden), ("cudnn", reference, 2 * hidden),
                                        ("ours", ours, 2 * hidden)):
                cotangent = torch.randn(steps, batch, width, device=device, dtype=dtype)
                step = timing.make_step(lambda module=module: module(x)[0], list(module.parameters()) + [x],
                                        cotangent, mode)
                with dispatch.forcing("triton") if name == "ours" else contextlib.nullcontext():
                    times[name] = timing.measure(f"{name} B={batch} H={hidden} {mode}", step, args)
            persist_two = 2 * times["persist"] if isinstance(times["persist"], float) else times["persist"]
            ratio = (f"{persist_two / times['ours']:.3g}" if isinstance(persist_two, float)
                     and isinstance(times["ours"], float) else "")

            def fmt(value):
                return f"{value:.3f}" if isinstance(value, float) else value

            print(f"| {batch} | {hidden} | {mode} | {fmt(persist_two)} | {fmt(times['cudnn'])} | "
                  f"{fmt(times['ours'])} | {ratio} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["gemms", "persist"], required=True)
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument("--append", help="also append the stage's tables to this markdown report")
    args = parser.parse_args(argv)
    if args.self_test:
        timing.DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    birnn_fast = cases.import_birnn_fast()
    if args.self_test:
        from birnn_fast import dispatch

        # CPU tensors: the dispatch as the ops' CPU kernels, its engines on the CPU (Triton interpreted).
        dispatch.load_engines()
        global _LIBRARY
        _LIBRARY = torch.library.Library("birnn_fast", "IMPL")
        _LIBRARY.impl("forward", dispatch.forward_op, "CPU")
        _LIBRARY.impl("backward", dispatch.backward_op, "CPU")
        real_why_not = dispatch.why_not
        dispatch.why_not = lambda engine, device, dtype, *shape: (
            None if engine in ("triton", "cudnn") else real_why_not(engine, device, dtype, *shape))
        os.environ["BIRNN_FAST_BACKEND"] = "cpu"
        from birnn_fast import backends

        backends._load_errors["cpu"] = None
    timing_args = _args(1.0, 1.0) if args.self_test else _args(20.0, 100.0)
    with _tables(args.append):
        if args.stage == "gemms":
            gemms(birnn_fast, (4, 2, 16) if args.self_test else (512, 64, 1024), timing_args)
        else:
            sizes = [(8, 16)] if args.self_test else [(16, 256), (16, 512), (64, 512), (16, 1024), (64, 1024)]
            persist(birnn_fast, sizes, 4 if args.self_test else 512, timing_args)
    return 0


@contextlib.contextmanager
def _tables(path):
    """Lines printed as markdown (headings and table rows) also appended to ``path``, as they come (a
    stage killed by its limit keeps what it printed)."""
    if not path:
        yield
        return
    write = sys.stdout.write

    def tee(text):
        if text.lstrip("\n").startswith(("#", "|")):
            with open(path, "a") as report:
                report.write(text if text.endswith("\n") else text + "\n")
        return write(text)

    sys.stdout.write = tee
    try:
        yield
    finally:
        sys.stdout.write = write


if __name__ == "__main__":
    sys.exit(main())
