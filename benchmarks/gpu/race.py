"""The race check of ``make gpu-check``: the same forward and backward, ten times, must give bitwise
equal outputs and gradients (a missing barrier or a read of a stale exchange shows as runs that
differ). LSTM and GRU, bf16 and fp32, on multi-program grids with lengths.

    python -m benchmarks.gpu.race [--self-test]
"""
import argparse
import sys
import time

from benchmarks.gpu import cases


def run(cell, dtype, T, B, I, H, torch, kernels, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    G = {"LSTM": 4, "GRU": 3}[cell]
    weights = [(torch.randn(shape, generator=generator) * H ** -0.5).to(device, dtype)
               for _ in range(2) for shape in ((G * H, I), (G * H, H), (G * H,), (G * H,))]
    x = torch.randn(T, B, I, generator=generator).to(device, dtype)
    h0 = torch.randn(2, B, H, generator=generator).to(device, dtype)
    c0 = torch.randn(2, B, H, generator=generator).to(device, dtype) if cell == "LSTM" else x.new_empty(0)
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[0] = T
    lengths = lengths.to(device)
    grad_output = torch.randn(T, B, 2 * H, generator=generator).to(device, dtype)
    grad_h_n = torch.randn(2, B, H, generator=generator).to(device, dtype)
    grad_c_n = torch.randn(2, B, H, generator=generator).to(device, dtype) if cell == "LSTM" else x.new_empty(0)
    output, h_n, c_n, workspace = kernels.forward_op(cell, x, weights, h0, c0, lengths, True)
    grad_input, grad_weights, grad_h0, grad_c0 = kernels.backward_op(
        cell, grad_output, grad_h_n, grad_c_n, x, weights, h0, c0, lengths, output, workspace)
    return [output, h_n, c_n, workspace, grad_input, grad_h0, grad_c0, *grad_weights]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self-test", action="store_true", help="CPU, Triton interpreted, tiny sizes")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    birnn_fast = cases.import_birnn_fast(interpret=args.self_test)
    import torch

    kernels = birnn_fast.kernels
    device = torch.device("cpu" if args.self_test else "cuda")
    shapes = [(4, 3, 5, 20)] if args.self_test else [(128, 64, 256, 512), (96, 40, 128, 1024)]
    dtypes = [torch.float32] if args.self_test else [torch.bfloat16, torch.float32]
    failures = 0
    for cell in ("LSTM", "GRU"):
        for dtype in dtypes:
            for T, B, I, H in shapes:
                started = time.perf_counter()
                first = run(cell, dtype, T, B, I, H, torch, kernels, device)
                differing = set()
                for _ in range(args.repeats - 1):
                    again = run(cell, dtype, T, B, I, H, torch, kernels, device)
                    differing |= {index for index, (a, b) in enumerate(zip(first, again)) if not torch.equal(a, b)}
                ok = not differing
                failures += not ok
                print(f"{'ok  ' if ok else 'RACE'} {cell} {str(dtype)[6:]} T={T} B={B} I={I} H={H}: {args.repeats} runs "
                      f"{'bitwise equal' if ok else 'differ in items ' + str(sorted(differing))} "
                      f"({time.perf_counter() - started:.1f} s)", flush=True)
    print(f"race check: {failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
