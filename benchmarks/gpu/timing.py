"""How the GPU benchmark times: median CUDA-event times of single calls after a warm-up, and the
floors of a step (the forward's grid only meeting at its barrier; one graph-replayed launch per step)."""
import math
import statistics
import time
import traceback

import torch

# "cpu" only for the self-test: every code path on tiny shapes, without a GPU (Triton interpreted).
DEVICE = "cuda"


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, warmup_ms, rep_ms, min_calls=3, max_calls=200):
    """Median milliseconds of single calls of fn, each bracketed by CUDA events."""
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
    try:
        synchronize()
        torch.zeros(1, device=DEVICE).add_(1).item()
        return True
    except Exception as error:  # noqa: BLE001 - any failure here means the context is gone
        print(f"!! CUDA: {describe(error)}")
        return False


def measure(label, fn, args):
    """fn's median ms, or a short string saying why not (printed in full)."""
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


def step_floors(birnn_fast, x, hidden, args):
    """What T steps cost at the least, in ms: "barrier", the forward's grid meeting at its barrier once
    per step and doing nothing else (kernels.barrier_floor); "launch", one launch per step, T launches
    of a one-element kernel replayed from a CUDA graph (a step-per-launch design's floor)."""
    from benchmarks.gpu.floor import barrier_floor

    floors = {"barrier": measure("floor barrier", lambda: barrier_floor("LSTM", x, hidden),
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
