"""Training with lengths against the machine's own product rate: ours and torch's (a PackedSequence)
time at one thread by CPU time, the FLOPs of the real tokens (forward, the gradients of the inputs
and states, the weight gradients: 3 x 2 x G*H*(I + H) per token and direction), and what fraction
of this process's sgemm rate (2048^3, one thread) each reaches. Where ours is near 100%, no engine
doing the same products can be much faster: that bounds the ratio to torch.

    python benchmarks/cpu_efficiency.py [--cells LSTM,GRU] [--batches 16,64] [--steps 75] [--inputs 512] [--hidden 512]
"""
import argparse
import os
import sys
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_machine  # noqa: E402
import workloads  # noqa: E402
from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN  # noqa: E402

LAYERS = {"LSTM": (FastBiLSTM, nn.LSTM, 4), "GRU": (FastBiGRU, nn.GRU, 3), "RNN": (FastBiRNN, nn.RNN, 1)}


def median_cpu_seconds(fn, calls):
    fn()
    times = []
    for _ in range(calls):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return sorted(times)[calls // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(value) for value in text.split(",")]  # noqa: E731
    parser.add_argument("--cells", type=lambda text: text.split(","), default=["LSTM", "GRU"])
    parser.add_argument("--batches", type=ints, default=[16, 64])
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(cpu_machine.describe(cpu_machine.machine_facts()))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rate = 2 * 2048 ** 3 / median_cpu_seconds(lambda: a @ b, 7)
    print(f"sgemm 2048^3, one thread: {rate / 1e9:.1f} GFLOP/s\n")
    print("| cell | T | B | I | H | real tokens | GFLOP | torch ms | ours ms | ratio | torch GFLOP/s | ours GFLOP/s "
          "| ours / sgemm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    T, I, H = args.steps, args.inputs, args.hidden
    for cell in args.cells:
        ours_type, torch_type, gates = LAYERS[cell]
        for B in args.batches:
            lengths = workloads.make_lengths(T, B)
            tokens = int(lengths.sum())
            ours, theirs = ours_type(I, H), torch_type(I, H, bidirectional=True)
            x = torch.randn(T, B, I, requires_grad=True)

            def ours_step():
                ours(x, lengths=lengths)[0].sum().backward()

            def torch_step():
                packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
                pad_packed_sequence(theirs(packed)[0])[0].sum().backward()

            flops = 3 * 2 * 2 * gates * H * (I + H) * tokens
            mine, torch_s = median_cpu_seconds(ours_step, args.calls), median_cpu_seconds(torch_step, args.calls)
            print(f"| {cell} | {T} | {B} | {I} | {H} | {tokens} | {flops / 1e9:.1f} | {torch_s * 1e3:.0f} | "
                  f"{mine * 1e3:.0f} | {torch_s / mine:.2f} | {flops / torch_s / 1e9:.1f} | {flops / mine / 1e9:.1f} | "
                  f"{flops / mine / rate:.0%} |")


if __name__ == "__main__":
    main()
