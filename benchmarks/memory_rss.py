"""Memory of the cpu backend: RSS over 10,000 training steps (flat, or a leak), and the bytes saved
for backward per token per layer, against torch.nn (measured with saved_tensors_hooks: every
tensor autograd keeps, each storage counted once).

    python benchmarks/memory_rss.py [--steps 10000]
"""
import argparse
import os
import resource

import torch
from torch import nn

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN


def rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_over_training(steps):
    torch.manual_seed(0)
    model = FastBiLSTM(16, 32, num_layers=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    marks = {}
    for step in range(1, steps + 1):
        x = torch.randn(20, 8, 16)
        lengths = torch.randint(1, 21, (8,))
        output, _ = model(x, lengths=lengths)
        optimizer.zero_grad()
        output.square().mean().backward()
        optimizer.step()
        if step in (1, 100, 1000) or step % 2000 == 0:
            marks[step] = rss_mib()
    return marks


def saved_bytes(module, x):
    storages = {}

    def pack(tensor):
        if tensor.numel():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output, _ = module(x)
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    input_storage = x.untyped_storage().data_ptr()
    # Parameters and the input are kept by the caller anyway: only what backward alone keeps counts.
    return sum(nbytes for pointer, nbytes in storages.items() if pointer not in parameters and pointer != input_storage)


def saved_table(T=64, B=16, I=32, H=64):
    rows = []
    cells = [("LSTM", FastBiLSTM, nn.LSTM, {}), ("GRU", FastBiGRU, nn.GRU, {}),
             ("RNN_TANH", FastBiRNN, nn.RNN, {"nonlinearity": "tanh"})]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for name, fast_cls, torch_cls, extra in cells:
            fast = fast_cls(I, H, dtype=dtype, **extra)
            reference = torch_cls(I, H, bidirectional=True, dtype=dtype, **extra)
            x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
            tokens = T * B
            rows.append((name, str(dtype).replace("torch.", ""), saved_bytes(fast, x) / tokens,
                         saved_bytes(reference, x) / tokens))
    return rows, (T, B, I, H)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10_000)
    args = parser.parse_args()
    os.environ.setdefault("BIRNN_FAST_BACKEND", "cpu")
    marks = rss_over_training(args.steps)
    print("RSS (MiB) by training step, FastBiLSTM(16, 32, num_layers=2), T=20, B=8, random lengths:")
    for step, value in marks.items():
        print(f"  step {step:>6}: {value:8.1f}")
    print(f"  peak (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
    rows, (T, B, I, H) = saved_table()
    print(f"\nBytes saved for backward per token per layer (one bidirectional layer, T={T}, B={B}, I={I}, H={H}):")
    print("| cell | dtype | birnn_fast | torch.nn | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, dtype, fast, reference in rows:
        print(f"| {name} | {dtype} | {fast:.0f} | {reference:.0f} | {fast / reference:.2f} |")


if __name__ == "__main__":
    main()
