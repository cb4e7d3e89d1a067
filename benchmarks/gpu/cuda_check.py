"""The device check of the CUDA cluster kernels (csrc/cuda, birnn_fast/cuda_kernels.py), in stages,
most informative first; each prints a short table and appends it to --out (Markdown):

    python -m benchmarks.gpu.cuda_check --stage probes       # L2 and DSMEM round trips, clusters that fit
    python -m benchmarks.gpu.cuda_check --stage correctness  # fwd and bwd: fp64 reference, 2x torch's error, poisoned;
                                                             # then fp32 (stage fp32), TF32 and IEEE, fwd and bwd
    python -m benchmarks.gpu.cuda_check --stage race         # the same forward and backward 10 times, bitwise equal
    python -m benchmarks.gpu.cuda_check --stage sanitizer    # compute-sanitizer racecheck / memcheck, tiny
    python -m benchmarks.gpu.cuda_check --stage timings      # per step against Triton, cuDNN and the floors
    python -m benchmarks.gpu.cuda_check --stage l2           # the l2 exchange: fp64 reference, its backward
                                                             # (Triton's), bf16 B 64 H 1024 T 512 against cuDNN
    python -m benchmarks.gpu.cuda_check --self-test          # CPU only (CI): every case's launch, consistent

Needs the cubins (make cubins; carried to a GPU machine as birnn_fast/cubins) and cuda-bindings.
"""
import argparse
import contextlib
import ctypes
import datetime
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from birnn_fast import cuda_kernels, cuda_schedule as schedule, reference

# (T, B, H, lengths) of the correctness stage: odd sizes, clusters of 1 to 16 CTAs, one to three
# chunks of 64 rows, every split-K instance.
CORRECTNESS = [(1, 1, 40, "equal"), (5, 3, 40, "mixed"), (33, 17, 72, "mixed"), (5, 8, 8, "equal"),
               (33, 64, 256, "mixed"), (17, 64, 512, "mixed"), (9, 130, 128, "mixed"), (65, 16, 512, "equal"),
               (12, 24, 200, "mixed"), (7, 40, 384, "mixed")]
# The cases whose gradients are checked too (the CUDA backward; both variants, one to three chunks).
BACKWARD = {(1, 1, 40, "equal"), (5, 3, 40, "mixed"), (33, 17, 72, "mixed"), (33, 64, 256, "mixed"),
            (17, 64, 512, "mixed"), (9, 130, 128, "mixed"), (12, 24, 200, "mixed"), (7, 40, 384, "mixed")}
DTYPES = (torch.bfloat16, torch.float16)
# (cell, T, B, H, lengths) of the fp32 forward, under cuDNN's rule at "tf32" and at "ieee": odd sizes,
# every (S, R) of cuda_schedule.FP32_VARIANTS, up to the largest H a cluster holds, one to three chunks.
FP32_CASES = [("LSTM", 1, 1, 40, "equal"), ("LSTM", 33, 17, 72, "mixed"), ("LSTM", 33, 64, 256, "mixed"),
              ("LSTM", 9, 130, 128, "mixed"), ("LSTM", 12, 16, 416, "mixed"), ("GRU", 12, 24, 200, "mixed"),
              ("GRU", 7, 64, 264, "mixed"), ("RNN_TANH", 5, 3, 40, "mixed"), ("RNN_RELU", 7, 40, 336, "mixed")]
# The fp32 cases whose gradients are checked too (the fp32 CUDA backward at both precisions): every
# family, both variants (r64 at U <= 16, r32 at the largest H), one to three chunks.
FP32_BACKWARD = {("LSTM", 33, 17, 72, "mixed"), ("LSTM", 9, 130, 128, "mixed"), ("GRU", 7, 64, 264, "mixed"),
                 ("RNN_TANH", 5, 3, 40, "mixed"), ("RNN_RELU", 7, 40, 336, "mixed")}
TINY = [(5, 3, 40, "mixed"), (4, 17, 256, "mixed")]  # under compute-sanitizer
# The l2 exchange (a cooperative grid of plain CTAs, h through L2 as step-tagged words: past one
# cluster, and every layer on sm_80): (cell, T, B, H, lengths, dtype, fp32 rule). The sizes
# (bf16 H = 1024, fp32 H = 512, B = 64, mixed lengths) and odd ones forced onto it (H not a multiple
# of 8, B past one chunk, one CTA's slice of 24 units), every family.
L2_CASES = [("LSTM", 9, 64, 1024, "mixed", torch.bfloat16, None), ("GRU", 9, 64, 1024, "mixed", torch.bfloat16, None),
            ("RNN_TANH", 9, 64, 1024, "mixed", torch.bfloat16, None),
            ("LSTM", 7, 64, 512, "mixed", torch.float32, "ieee"), ("GRU", 7, 64, 512, "mixed", torch.float32, "tf32"),
            ("GRU", 5, 3, 40, "mixed", torch.float16, None), ("LSTM", 5, 70, 333, "mixed", torch.bfloat16, None),
            ("RNN_RELU", 6, 17, 333, "mixed", torch.float32, "ieee")]
# The l2 cases whose gradients are checked too: the backward (Triton's, where the CUDA one cannot run)
# on the l2 forward's workspace.
L2_BACKWARD = {("LSTM", 9, 64, 1024, "mixed", torch.bfloat16, None), ("GRU", 5, 3, 40, "mixed", torch.float16, None)}
L2_TIMINGS = [(512, 64, 1024)]
TIMINGS = [(512, B, H) for B in (16, 64) for H in (256, 512)]
NAN = float("nan")


def relative_error(got, want):
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def make_layer(T, B, H, kind, dtype, device, seed, I=None, cell="LSTM"):
    """nn.LSTM's initialisation, fresh per case; lengths mixed (1 and T included) or equal."""
    generator = torch.Generator().manual_seed(seed)
    I = I or max(8, H // 2)
    bound = H ** -0.5

    def uniform(*shape):
        return ((torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound).to(device, dtype)

    G = schedule.cell_of(cell).gates
    weights = [tensor for _ in range(2) for tensor in (uniform(G * H, I), uniform(G * H, H), uniform(G * H),
                                                       uniform(G * H))]
    input = torch.randn(T, B, I, generator=generator, dtype=torch.float64).to(device, dtype)
    h0 = (torch.randn(2, B, H, generator=generator, dtype=torch.float64) * 0.5).to(device, dtype)
    c0 = (torch.randn(2, B, H, generator=generator, dtype=torch.float64) * 0.5).to(device, dtype)
    if cell != "LSTM":
        c0 = c0.new_empty(0)
    if kind == "equal":
        lengths = torch.full((B,), T, dtype=torch.int64)
    else:
        lengths = torch.randint(1, T + 1, (B,), generator=generator)
        lengths[0] = T
        lengths[-1] = 1 if B > 1 else T
    return input, weights, h0, c0, lengths.to(device)


def poisoned_results(input, H, T, B, cell="LSTM"):
    nan = float("nan")
    saved = schedule.cell_of(cell).saved
    return (torch.full((T, B, 2 * H), nan, dtype=input.dtype, device=input.device),
            torch.full((2, B, H), nan, dtype=input.dtype, device=input.device),
            torch.full((2, B, H) if cell == "LSTM" else (0,), nan, dtype=input.dtype, device=input.device),
            torch.full((T, B, 2, saved * H), nan, dtype=torch.float32, device=input.device))


def same_bits(first, second):
    """Whether two lists of tensors hold the same bits (NaNs included)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return all(torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()]))
               for a, b in zip(first, second))


def repeated(run, repeats):
    """run() `repeats` times: (a copy of the first run's results, whether every run gave its bits)."""
    first, same = None, True
    for _ in range(repeats):
        results = run()
        if first is None:
            first = [x.clone() for x in results]
        else:
            same &= same_bits(first, results)
    torch.cuda.synchronize()
    return first, same


def table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- Stages ---------------------------------------------------------------------------------------

def probes(out):
    """The two round trips a step's exchange is built on, and how many clusters of each plan fit."""
    from cuda.bindings import driver

    device = torch.device("cuda")
    module, _ = cuda_kernels.module(device, "probes")
    rows = []
    rounds = 2000
    elapsed = torch.zeros(1, dtype=torch.int64, device=device)
    flags = torch.zeros(64, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream().cuda_stream
    for name, grid, cluster in (("birnn_probe_l2_round_trip", 2, 1), ("birnn_probe_dsmem_round_trip", 2, 2)):
        function = cuda_kernels._check(driver.cuModuleGetFunction(module, name.encode()))
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = (1 if cluster == 1 else 32), 1, 1
        config.hStream = driver.CUstream(stream)
        attribute = driver.CUlaunchAttribute()
        attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attribute.value.clusterDim.x, attribute.value.clusterDim.y, attribute.value.clusterDim.z = cluster, 1, 1
        config.attrs, config.numAttrs = [attribute], 1
        for _ in range(2):  # the first warms up
            flags.zero_()
            if cluster == 1:
                values = [ctypes.c_void_p(flags.data_ptr()), ctypes.c_int(rounds), ctypes.c_void_p(elapsed.data_ptr())]
            else:
                values = [ctypes.c_int(rounds), ctypes.c_void_p(elapsed.data_ptr())]
            pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            cuda_kernels._check(driver.cuLaunchKernelEx(config, function, ctypes.addressof(pointers), 0))
            torch.cuda.synchronize()
        rows.append((name.removeprefix("birnn_probe_"), f"{elapsed.item() / rounds:.0f} ns"))
    for H, B, dtype in ((256, 16, "bf16"), (256, 64, "bf16"), (512, 16, "bf16"), (512, 64, "bf16"),
                        (256, 64, "fp32"), (264, 64, "fp32"), (416, 16, "fp32")):
        p = schedule.plan("LSTM", H, B, dtype)
        clusters = cuda_kernels.max_active_clusters(p, device)
        rows.append((f"clusters of LSTM H {H} B {B} {dtype} ({p.cluster} CTAs, {p.smem_bytes} B smem, "
                     f"{p.threads} threads)",
                     f"{clusters} at once ({'both directions fit' if clusters >= 2 else 'DIRECTIONS SERIALISE'})"))
    out.append(table(f"probes on {torch.cuda.get_device_name()}", ["probe", "result"], rows))
    return True


def correctness(out, cases=CORRECTNESS, dtypes=DTYPES, backward=True, cells=schedule.CELLS_BUILT,
                backward_cases=BACKWARD):
    """Every case and dtype against the fp64 reference: output, h_n, c_n within twice the error of
    the reference run in the dtype (+1e-6); nothing left unwritten; padding exactly 0; with
    ``backward``, on the BACKWARD cases, every gradient of the CUDA backward on this forward's
    workspace likewise, its results poisoned first (check_backward)."""
    device = torch.device("cuda")
    rows, ok = [], True
    # Every case in LSTM; the other cells on every other case.
    runs = [(cell, case, dtype) for cell in cells for index, case in enumerate(cases) for dtype in dtypes
            if cell == "LSTM" or index % 2 == cells.index(cell) % 2]
    for cell, (T, B, H, kind), dtype in runs:
        input, weights, h0, c0, lengths = make_layer(T, B, H, kind, dtype, device, seed=T * 10007 + B * 101 + H,
                                                     cell=cell)
        results = poisoned_results(input, H, T, B, cell)
        cuda_kernels.forward_into(cell, input, weights, h0, c0, lengths, *results)
        torch.cuda.synchronize()
        wide = [x.double() for x in (input, h0, c0)]
        exact = reference.forward_op(cell, wide[0], [w.double() for w in weights], wide[1], wide[2], lengths, False)
        same = reference.forward_op(cell, input, weights, h0, c0, lengths, False)
        verdicts = []
        label = f"{cell} T {T} B {B} H {H} {kind}"
        states = 3 if cell == "LSTM" else 2
        for name, got, want, torch_own in list(zip(("output", "h_n", "c_n"), results, exact, same))[:states]:
            error, bound = relative_error(got, want), 2 * relative_error(torch_own, want) + 1e-6
            verdicts.append(error <= bound)
            rows.append((label, str(dtype).removeprefix("torch."), name, f"{error:.2e}",
                         f"{bound:.2e}", "ok" if error <= bound else "FAIL"))
        padding = torch.arange(T, device=device)[:, None] >= lengths[None, :]
        written = not results[3].isnan().any().item() and not results[0].isnan().any().item()
        zeros = bool((results[0][padding] == 0).all() and (results[3][padding] == 0).all())
        verdicts.append(written and zeros)
        if not (written and zeros):
            rows.append((label, str(dtype), "unwritten or nonzero padding", "", "", "FAIL"))
        if backward and (T, B, H, kind) in backward_cases:
            verdicts.append(check_backward(cell, (T, B, H, kind), dtype, input, weights, h0, c0, lengths, results,
                                           rows, label))
        ok &= all(verdicts)
    out.append(table("correctness against fp64 (bound: 2x the reference's own error in the dtype + 1e-6)",
                     ["case", "dtype", "result", "error", "bound", "verdict"], rows))
    return ok


@contextlib.contextmanager
def fp32_rule(precision):
    """cuDNN's RNN fp32 rule (which the kernels and their input projection follow) and torch's
    matmul one (which the reference run in fp32 follows) both at ``precision``, "tf32" or "ieee",
    restored after."""
    rnn, matmul = getattr(torch.backends.cudnn, "rnn", None), torch.backends.cuda.matmul
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        flags = [(rnn, "fp32_precision", precision)]
    else:
        flags = [(torch.backends.cudnn, "allow_tf32", precision == "tf32")]
    if hasattr(matmul, "fp32_precision"):
        flags.append((matmul, "fp32_precision", precision))
    else:
        flags.append((matmul, "allow_tf32", precision == "tf32"))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in flags]
    try:
        for owner, name, value in flags:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def correctness_fp32(out, cases=FP32_CASES, backward_cases=FP32_BACKWARD):
    """The fp32 forward at both precisions of cuDNN's rule against the fp64 reference: output, h_n,
    c_n within twice the error of the reference run in fp32 at the same rule (+1e-6), the kernel the
    rule names (tf32, or fp32: 3xTF32), nothing unwritten, padding exactly 0; on the FP32_BACKWARD
    cases the fp32 backward likewise (check_backward, the backward kernel the rule names)."""
    device = torch.device("cuda")
    rows, ok = [], True
    for precision in ("tf32", "ieee"):
        with fp32_rule(precision):
            for cell, T, B, H, kind in cases:
                input, weights, h0, c0, lengths = make_layer(T, B, H, kind, torch.float32, device,
                                                             seed=T * 10007 + B * 101 + H, cell=cell)
                kernel = schedule.plan(cell, H, B, cuda_kernels.kernel_dtype(torch.float32)).kernel
                named = "tf32" if precision == "tf32" else "fp32"
                verdicts = [kernel.split("_")[3] == named]
                results = poisoned_results(input, H, T, B, cell)
                cuda_kernels.forward_into(cell, input, weights, h0, c0, lengths, *results)
                torch.cuda.synchronize()
                wide = [x.double() for x in (input, h0, c0)]
                exact = reference.forward_op(cell, wide[0], [w.double() for w in weights], wide[1], wide[2], lengths,
                                             False)
                same = reference.forward_op(cell, input, weights, h0, c0, lengths, False)
                label = f"{cell} T {T} B {B} H {H} {kind}"
                states = 3 if cell == "LSTM" else 2
                for name, got, want, torch_own in list(zip(("output", "h_n", "c_n"), results, exact, same))[:states]:
                    error, bound = relative_error(got, want), 2 * relative_error(torch_own, want) + 1e-6
                    verdicts.append(error <= bound)
                    rows.append((label, f"fp32 {precision} ({kernel})", name, f"{error:.2e}", f"{bound:.2e}",
                                 "ok" if error <= bound else "FAIL"))
                padding = torch.arange(T, device=device)[:, None] >= lengths[None, :]
                written = not results[3].isnan().any().item() and not results[0].isnan().any().item()
                zeros = bool((results[0][padding] == 0).all() and (results[3][padding] == 0).all())
                if not (written and zeros and verdicts[0]):
                    rows.append((label, f"fp32 {precision} ({kernel})", "unwritten, nonzero padding or not the "
                                 "rule's kernel", "", "", "FAIL"))
                if (cell, T, B, H, kind) in backward_cases:
                    backward_kernel = schedule.backward_plan(cell, H, B, cuda_kernels.kernel_dtype(torch.float32))
                    verdicts.append(backward_kernel.kernel.split("_")[3] == named)
                    verdicts.append(check_backward(cell, (T, B, H, kind), torch.float32, input, weights, h0, c0,
                                                   lengths, results, rows, f"{label} {precision}"))
                ok &= all(verdicts) and written and zeros
    out.append(table("fp32 forward and backward against fp64 (bound: 2x the error of the reference in fp32 at the "
                     "same rule + 1e-6)", ["case", "precision (kernel)", "result", "error", "bound", "verdict"], rows))
    return ok


def correctness_l2(out, cases=L2_CASES, backward_cases=L2_BACKWARD):
    """The l2 exchange's forward against the fp64 reference (2x the reference's own error in the
    dtype + 1e-6), its poisoned results all written and 0 at padding, the l2 kernel named by the plan
    (forced onto it where a cluster would hold the layer); on L2_BACKWARD, the op's backward
    (backward_op: Triton's where the CUDA one cannot run) on this forward's workspace, every gradient
    within the same rule."""
    device = torch.device("cuda")
    rows, ok = [], True
    for cell, T, B, H, kind, dtype, precision in cases:
        with fp32_rule(precision) if precision else contextlib.nullcontext():
            input, weights, h0, c0, lengths = make_layer(T, B, H, kind, dtype, device, seed=T * 10007 + B * 101 + H,
                                                         cell=cell)
            results = poisoned_results(input, H, T, B, cell)
            cuda_kernels.forward_into(cell, input, weights, h0, c0, lengths, *results, exchange="l2")
            torch.cuda.synchronize()
            wide = [x.double() for x in (input, h0, c0)]
            exact = reference.forward_op(cell, wide[0], [w.double() for w in weights], wide[1], wide[2], lengths,
                                         False)
            same = reference.forward_op(cell, input, weights, h0, c0, lengths, False)
            label = f"{cell} T {T} B {B} H {H} {kind} {str(dtype).removeprefix('torch.')} {precision or ''}"
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            arch = cuda_kernels._arch(device)
            p = schedule.l2_plan(cell, H, B, cuda_kernels.kernel_dtype(dtype), sms, schedule.L2_ARCHS[arch][1])
            verdicts = []
            states = 3 if cell == "LSTM" else 2
            for name, got, want, torch_own in list(zip(("output", "h_n", "c_n"), results, exact, same))[:states]:
                error, bound = relative_error(got, want), 2 * relative_error(torch_own, want) + 1e-6
                verdicts.append(error <= bound)
                rows.append((label, f"{p.kernel} x {p.ctas}", name, f"{error:.2e}", f"{bound:.2e}",
                             "ok" if error <= bound else "FAIL"))
            padding = torch.arange(T, device=device)[:, None] >= lengths[None, :]
            written = not results[3].isnan().any().item() and not results[0].isnan().any().item()
            zeros = bool((results[0][padding] == 0).all() and (results[3][padding] == 0).all())
            verdicts.append(written and zeros)
            if not (written and zeros):
                rows.append((label, p.kernel, "unwritten or nonzero padding", "", "", "FAIL"))
            if (cell, T, B, H, kind, dtype, precision) in backward_cases:
                generator = torch.Generator().manual_seed(T + B + H)
                grads = [torch.randn(x.shape, generator=generator).to(device, dtype) for x in results[:3]]
                got = cuda_kernels.backward_op(cell, *grads, input, weights, h0, c0, lengths, results[0], results[3])
                exact = reference.backward_op(cell, *[g.double() for g in grads], wide[0],
                                              [w.double() for w in weights], wide[1], wide[2], lengths, None, None)
                same = reference.backward_op(cell, *grads, input, weights, h0, c0, lengths, None, None)
                flat = lambda gs: [gs[0], *gs[1], gs[2]] + ([gs[3]] if cell == "LSTM" else [])  # noqa: E731
                ratios = [relative_error(a, b) / (2 * relative_error(c, b) + 1e-6)
                          for a, b, c in zip(flat(got), flat(exact), flat(same))]
                verdicts.append(max(ratios) <= 1)
                rows.append((label, "backward_op", "worst gradient (error / bound)", f"{max(ratios):.2f}", "1",
                             "ok" if max(ratios) <= 1 else "FAIL"))
            ok &= all(verdicts)
    out.append(table("the l2 exchange against fp64 (bound: 2x the reference's own error in the dtype + 1e-6)",
                     ["case", "kernel x CTAs", "result", "error", "bound", "verdict"], rows))
    print(out[-1], flush=True)
    return ok


def timings_l2(out, args):
    """The l2 exchange's forward per step against cuDNN (nn.LSTM, bidirectional), bf16."""
    import triton.testing

    device = torch.device("cuda")
    rows = []
    for T, B, H in L2_TIMINGS:
        input, weights, h0, c0, lengths = make_layer(T, B, H, "equal", torch.bfloat16, device, seed=1, I=H)
        ours = triton.testing.do_bench(lambda: cuda_kernels.forward_op("LSTM", input, weights, h0, c0, lengths, True),
                                       warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        lstm = torch.nn.LSTM(H, H, bidirectional=True, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            cudnn = triton.testing.do_bench(lambda: lstm(input, (h0, c0)), warmup=args.warmup_ms, rep=args.rep_ms,
                                            return_mode="median")
        p = cuda_kernels.forward_plan("LSTM", H, B, "bf16", cuda_kernels._arch(device),
                                      torch.cuda.get_device_properties(device).multi_processor_count)
        rows.append((f"B {B} H {H} T {T}", f"{p.kernel} x {p.ctas}", f"{ours * 1e3 / T:.2f}", f"{cudnn * 1e3 / T:.2f}",
                     f"{cudnn / ours:.2f}x"))
    out.append(table("the l2 exchange's forward, bf16, us per step", ["case", "kernel x CTAs", "cuda", "cuDNN",
                                                                       "vs cuDNN"], rows))
    return True


def backward_results(cell, T, B, H, dtype, device):
    """NaN-poisoned dgates, grad_h0, grad_c0 for backward_into."""
    G = schedule.cell_of(cell).gates
    return (torch.full((T, B, 2, G * H), NAN, dtype=torch.float32, device=device),
            torch.full((2, B, H), NAN, dtype=dtype, device=device),
            torch.full((2, B, H) if cell == "LSTM" else (0,), NAN, dtype=dtype, device=device))


def check_backward(cell, case, dtype, input, weights, h0, c0, lengths, results, rows, label):
    """The CUDA backward on the forward's results: every gradient within twice the error of the
    reference run in the dtype (+1e-6) against fp64, its poisoned results all written, dgates exactly 0
    at padding, and the op (backward_op) taking the CUDA path."""
    T, B, H, _ = case
    device = input.device
    generator = torch.Generator().manual_seed(T + B + H)
    grads = [torch.randn(x.shape, generator=generator).to(device, dtype) for x in results[:3]]
    reason = cuda_kernels._backward_reason(cell, input, weights, results[3], grads)
    if reason is not None:
        rows.append((label, str(dtype), f"backward not on CUDA: {reason}", "", "", "FAIL"))
        return False
    dgates, grad_h0, grad_c0 = backward_results(cell, T, B, H, dtype, device)
    cuda_kernels.backward_into(cell, *grads, weights, h0, c0, lengths, results[0], results[3], dgates, grad_h0,
                               grad_c0)
    torch.cuda.synchronize()
    padding = torch.arange(T, device=device)[:, None] >= lengths[None, :]
    written = not (dgates.isnan().any() or grad_h0.isnan().any() or grad_c0.isnan().any()).item()
    zeros = bool((dgates[padding] == 0).all())
    grad_input, grad_weights = cuda_kernels.gradients_from_dgates(cell, dgates, input, weights, h0, results[0],
                                                                  results[3], lengths)
    wide = [x.double() for x in (input, h0, c0)]
    exact = reference.backward_op(cell, *[g.double() for g in grads], wide[0], [w.double() for w in weights],
                                  wide[1], wide[2], lengths, None, None)
    same = reference.backward_op(cell, *grads, input, weights, h0, c0, lengths, None, None)
    names = ["grad_input"] + [f"grad_{kind}_{d}" for d in range(2) for kind in ("w_ih", "w_hh", "b_ih", "b_hh")] + \
        ["grad_h0"] + (["grad_c0"] if cell == "LSTM" else [])
    flat = lambda gs: [gs[0], *gs[1], gs[2]] + ([gs[3]] if cell == "LSTM" else [])  # noqa: E731
    got = flat((grad_input, grad_weights, grad_h0, grad_c0))
    ratios = {name: relative_error(a, b) / (2 * relative_error(c, b) + 1e-6)
              for name, a, b, c in zip(names, got, flat(exact), flat(same))}
    worst = max(ratios, key=ratios.get)
    ok = ratios[worst] <= 1 and written and zeros
    rows.append((label, str(dtype).removeprefix("torch."), f"backward: worst {worst} (error / bound)",
                 f"{ratios[worst]:.2f}", "1", "ok" if ratios[worst] <= 1 else "FAIL"))
    if not (written and zeros):
        rows.append((label, str(dtype), "backward: unwritten results or nonzero padding", "", "", "FAIL"))
    return ok


def race(out, repeats=10):
    """The same inputs, repeated: bitwise equal results (a moving result is a race)."""
    device = torch.device("cuda")
    rows, ok = [], True
    for T, B, H, kind in ((33, 64, 512, "mixed"), (33, 17, 72, "mixed"), (9, 130, 128, "mixed")):
        input, weights, h0, c0, lengths = make_layer(T, B, H, kind, torch.bfloat16, device, seed=5)

        def forward():
            results = poisoned_results(input, H, T, B)
            cuda_kernels.forward_into("LSTM", input, weights, h0, c0, lengths, *results)
            return results

        first, same = repeated(forward, repeats)
        ok &= same
        rows.append((f"forward T {T} B {B} H {H}", repeats, "bitwise equal" if same else "DIFFER"))
        generator = torch.Generator().manual_seed(3)
        grads = [torch.randn(x.shape, generator=generator).to(device, torch.bfloat16) for x in first[:3]]

        def backward():
            results = backward_results("LSTM", T, B, H, torch.bfloat16, device)
            cuda_kernels.backward_into("LSTM", *grads, weights, h0, c0, lengths, first[0], first[3], *results)
            return results

        _, same = repeated(backward, repeats)
        ok &= same
        rows.append((f"backward T {T} B {B} H {H}", repeats, "bitwise equal" if same else "DIFFER"))
    out.append(table("repeated runs", ["case", "runs", "result"], rows))
    return ok


def tiny(out):
    """The forward and backward of the TINY cases, for a run under compute-sanitizer."""
    return correctness(out, TINY, (torch.bfloat16,), cells=("LSTM", "GRU", "RNN_RELU"), backward_cases=set(TINY))


def sanitizer(out, args):
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        out.append("### compute-sanitizer\n\nnot installed: skipped\n")
        return True
    rows, ok = [], True
    for check in ("racecheck", "memcheck"):
        command = [tool, "--tool", check, "--error-exitcode", "9", sys.executable, "-m", "benchmarks.gpu.cuda_check",
                   "--stage", "tiny", "--out", os.devnull]
        started = time.time()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=args.sanitizer_timeout)
        except subprocess.TimeoutExpired:
            rows.append((check, "timeout", f"over {args.sanitizer_timeout:.0f} s", ""))
            ok = False
            continue
        summary = [line for line in (result.stdout + result.stderr).splitlines() if "ERROR SUMMARY" in line
                   or "RACECHECK SUMMARY" in line]
        rows.append((check, result.returncode, "; ".join(summary) or (result.stdout + result.stderr)[-300:],
                     f"{time.time() - started:.0f} s"))
        ok &= result.returncode == 0
    out.append(table("compute-sanitizer on the tiny cases", ["tool", "rc", "summary", "time"], rows))
    return ok


def timings(out, args):
    """Forward time per step: the cluster kernel against the Triton kernels and cuDNN (nn.LSTM,
    bidirectional), bf16, and the floors: the DSMEM round trip (probes) and the MMA work of a CTA at
    the measured bf16 matmul rate per SM."""
    import triton.testing

    from birnn_fast import kernels

    device = torch.device("cuda")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul_ms = triton.testing.do_bench(lambda: a @ a, warmup=25, rep=100, return_mode="median")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_sm = 2 * 8192 ** 3 / (matmul_ms * 1e-3) / sms
    rows = []
    for T, B, H in TIMINGS:
        input, weights, h0, c0, lengths = make_layer(T, B, H, "equal", torch.bfloat16, device, seed=1, I=H)
        p = schedule.plan("LSTM", H, B, "bf16")
        ours = triton.testing.do_bench(lambda: cuda_kernels.forward_op("LSTM", input, weights, h0, c0, lengths, True),
                                       warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        theirs = triton.testing.do_bench(lambda: kernels.ops.forward_op("LSTM", input, weights, h0, c0, lengths, True),
                                         warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        lstm = torch.nn.LSTM(H, H, bidirectional=True, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            cudnn = triton.testing.do_bench(lambda: lstm(input, (h0, c0)), warmup=args.warmup_ms, rep=args.rep_ms,
                                            return_mode="median")
        flops_per_cta = 2 * 4 * p.units * p.k_tiles * 16 * p.rows  # its gate rows x padded K x padded batch
        compute_floor_us = flops_per_cta / per_sm * 1e6
        rows.append((f"B {B} H {H}", f"{ours * 1e3 / T:.2f}", f"{theirs * 1e3 / T:.2f}", f"{cudnn * 1e3 / T:.2f}",
                     f"{compute_floor_us:.2f}", f"{theirs / ours:.2f}x", f"{cudnn / ours:.2f}x"))
    out.append(table(f"forward, T 512, bf16, us per step (bf16 matmul {per_sm * sms / 1e12:.0f} TFLOP/s)",
                     ["case", "cuda", "triton", "cuDNN", "MMA floor", "vs triton", "vs cuDNN"], rows))
    print(out[-1], flush=True)
    rows = []
    for T, B, H in TIMINGS:
        # The backward alone (the recurrence and its cuBLAS products) on saved forward results, both
        # backends on the same workspace; fwd+bwd against cuDNN's training step (nn.LSTM, autograd).
        input, weights, h0, c0, lengths = make_layer(T, B, H, "equal", torch.bfloat16, device, seed=1, I=H)
        output, h_n, c_n, workspace = cuda_kernels.forward_op("LSTM", input, weights, h0, c0, lengths, True)
        grads = [torch.randn_like(x) for x in (output, h_n, c_n)]
        p = schedule.backward_plan("LSTM", H, B, "bf16")
        arguments = ("LSTM", *grads, input, weights, h0, c0, lengths, output, workspace)
        ours = triton.testing.do_bench(lambda: cuda_kernels.backward_op(*arguments), warmup=args.warmup_ms,
                                       rep=args.rep_ms, return_mode="median")
        theirs = triton.testing.do_bench(lambda: kernels.ops.backward_op(*arguments), warmup=args.warmup_ms,
                                         rep=args.rep_ms, return_mode="median")
        ours_step = triton.testing.do_bench(
            lambda: cuda_kernels.backward_op(*arguments[:-2], *cuda_kernels.forward_op(
                "LSTM", input, weights, h0, c0, lengths, True)[::3]), warmup=args.warmup_ms, rep=args.rep_ms,
            return_mode="median")
        lstm = torch.nn.LSTM(H, H, bidirectional=True, device=device, dtype=torch.bfloat16)
        leaf = input.detach().requires_grad_()

        def cudnn_step():
            result, _ = lstm(leaf, (h0, c0))
            result.backward(grads[0])

        cudnn = triton.testing.do_bench(cudnn_step, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        flops_per_cta = 2 * p.m_tiles * 16 * p.k_tiles * 16 * p.rows  # W_hh^T's padded tiles x the chunk's rows
        compute_floor_us = flops_per_cta / per_sm * 1e6
        rows.append((f"B {B} H {H} ({p.kernel}, {p.grid})", f"{ours * 1e3 / T:.2f}", f"{theirs * 1e3 / T:.2f}",
                     f"{compute_floor_us:.2f}", f"{theirs / ours:.2f}x", f"{ours_step * 1e3 / T:.2f}",
                     f"{cudnn * 1e3 / T:.2f}", f"{cudnn / ours_step:.2f}x"))
        print(rows[-1], flush=True)
    out.append(table("backward, T 512, bf16, us per step (bwd: the op on saved results; fwd+bwd: a training "
                     "step, cuDNN's by autograd)",
                     ["case", "cuda bwd", "triton bwd", "MMA floor", "vs triton", "cuda fwd+bwd", "cuDNN fwd+bwd",
                      "vs cuDNN"], rows))
    return True


# --- The CPU self-test ----------------------------------------------------------------------------

def self_test(out):
    """Without a GPU: every case's plan, kernel argument and launch configuration are computed and
    consistent, and the schedule's model runs one case right."""
    rows = []
    instances = {schedule.kernel_name(*instance) for instance in schedule.INSTANCES}
    backward_instances = {schedule.backward_kernel_name(*instance) for instance in schedule.BACKWARD_INSTANCES}
    for T, B, H, kind in CORRECTNESS + TINY + [(T, B, H, "equal") for T, B, H in TIMINGS]:
        for cell, dtype in [(cell, dtype) for cell in schedule.CELLS_BUILT for dtype in ("bf16", "fp16")]:
            p = schedule.plan(cell, H, B, dtype)
            assert p.kernel in instances, p.kernel
            assert p.grid[0] == p.cluster <= schedule.MAX_CLUSTER and p.grid[2] * schedule.ROWS_PER_CLUSTER >= B
            assert p.threads % 32 == 0 and p.threads <= 256 and p.smem_bytes <= schedule.SMEM_LIMIT
            assert p.expect_bytes < (1 << 20) and p.slice_bytes % 16 == 0 and p.hbuf_bytes % 128 == 0
            params = cuda_kernels.forward_params(p, T, dict(xg=16, w_hh=32, b_hh=40, h0=48, c0=64, lengths=80,
                                                            output=96, h_n=112, c_n=128, workspace=0))
            assert (params.cluster, params.n_tiles, params.units) == (p.cluster, p.n_tiles, p.units)
            try:
                config = cuda_kernels.launch_config(p)
            except AttributeError:  # no cuda-bindings here
                config = None
            if config is not None:
                assert (config.gridDimX, config.gridDimY, config.gridDimZ) == p.grid
                assert config.attrs[0].value.clusterDim.x == p.cluster and config.sharedMemBytes == p.smem_bytes
            b = schedule.backward_plan(cell, H, B, dtype)
            assert b.kernel in backward_instances and b.grid[0] == b.cluster == p.cluster
            assert b.grid[2] * b.chunk_rows >= B and b.smem_bytes <= schedule.SMEM_LIMIT and b.threads == 256
            assert b.expect_bytes < (1 << 20) and b.slot_bytes % 8 == 0
            params = cuda_kernels.backward_params(b, T, {name: 16 * k for k, (name, _) in enumerate(
                cuda_kernels.BackwardParams._fields_[:12])})
            assert (params.cluster, params.k_tiles, params.reg_fragments) == (b.cluster, b.k_tiles, b.reg_fragments)
        p = schedule.plan("LSTM", H, B, "bf16")
        b = schedule.backward_plan("LSTM", H, B, "bf16")
        rows.append((f"T {T} B {B} H {H}", f"{p.grid}", p.threads, p.smem_bytes, p.kernel, f"{b.grid}", b.smem_bytes,
                     b.kernel))
    for cell, T, B, H, kind in FP32_CASES:
        for dtype in schedule.FP32_DTYPES:
            p = schedule.plan(cell, H, B, dtype)
            assert p.kernel in instances and p.cubin == schedule.cubin_name(cell, "fp32"), p.kernel
            assert p.grid[0] == p.cluster <= schedule.MAX_CLUSTER and p.grid[2] * schedule.ROWS_PER_CLUSTER >= B
            assert p.threads <= 256 and p.smem_bytes <= schedule.SMEM_LIMIT and p.slice_bytes % 16 == 0
            if (cell, T, B, H, kind) in FP32_BACKWARD:
                b = schedule.backward_plan(cell, H, B, dtype)
                assert b.kernel in backward_instances and b.cubin == schedule.backward_cubin_name(cell, "fp32")
                assert b.grid[0] == b.cluster == p.cluster and b.grid[2] * b.chunk_rows >= B
                assert b.smem_bytes <= schedule.SMEM_LIMIT and b.kernel.split("_")[3] == dtype
        backward = (cell, T, B, H, kind) in FP32_BACKWARD
        rows.append((f"{cell} T {T} B {B} H {H} fp32", f"{p.grid}", p.threads, p.smem_bytes, p.kernel,
                     f"{b.grid}" if backward else "", b.smem_bytes if backward else "",
                     b.kernel if backward else "(not checked)"))
    l2_instances = {schedule.kernel_name(*instance, "l2") for instance in schedule.L2_INSTANCES}
    for cell, T, B, H, kind, dtype, precision in L2_CASES:
        for arch in ("90a", "80"):
            sms, limit = schedule.L2_ARCHS[arch]
            name = cuda_kernels.DTYPES[dtype] if precision is None else "tf32" if precision == "tf32" else "fp32"
            try:
                p = schedule.l2_plan(cell, H, B, name, sms, limit)
            except ValueError:
                assert arch == "80" and H >= 512, (cell, H, B, dtype)  # sm_80's SMs and shared memory
                continue
            assert p.kernel in l2_instances and p.cubin == schedule.cubin_name(cell, name, "l2")
            assert p.ctas <= sms and p.smem_bytes <= limit and p.threads <= 256
            params = cuda_kernels.l2_params(p, T, dict(xg=16, w_hh=32, b_hh=40, h0=48, c0=64, lengths=80, output=96,
                                                       h_n=112, c_n=128, workspace=0), 256, 512, 1 << 22)
            assert (params.p.cluster, params.word_rows, params.partial_slices) == (p.cluster, p.word_rows,
                                                                                   p.partial_slices)
            try:
                config = cuda_kernels.launch_config(p)
            except AttributeError:  # no cuda-bindings here
                config = None
            if config is not None:
                assert (config.gridDimX, config.gridDimY, config.gridDimZ) == p.grid
                assert config.attrs[0].value.cooperative == 1 and config.sharedMemBytes == p.smem_bytes
            rows.append((f"{cell} T {T} B {B} H {H} {name} l2 sm_{arch}", f"{p.grid}", p.threads, p.smem_bytes,
                         p.kernel, "", "", "(backward_op)" if (cell, T, B, H, kind, dtype, precision) in L2_BACKWARD
                         else "(not checked)"))
    input, weights, h0, c0, lengths = make_layer(5, 3, 40, "mixed", torch.float64, "cpu", seed=1, cell="GRU")
    got = schedule.run_forward("GRU", input, weights, h0, c0, lengths, exchange="l2")
    want = reference.forward_op("GRU", input, weights, h0, c0, lengths, False)
    for a, b in zip(got[:2], want[:2]):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-10, atol=1e-12)
    input, weights, h0, c0, lengths = make_layer(7, 40, 336, "mixed", torch.float64, "cpu", seed=1, cell="RNN_RELU")
    got = schedule.run_forward("RNN_RELU", input, weights, h0, c0, lengths, kernel_dtype="fp32")
    want = reference.forward_op("RNN_RELU", input, weights, h0, c0, lengths, False)
    for a, b in zip(got[:2], want[:2]):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-10, atol=1e-12)
    input, weights, h0, c0, lengths = make_layer(5, 3, 40, "mixed", torch.float64, "cpu", seed=1, cell="GRU")
    got = schedule.run_forward("GRU", input, weights, h0, c0, lengths)
    want = reference.forward_op("GRU", input, weights, h0, c0, lengths, False)
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-10, atol=1e-12)
    output, workspace = torch.from_numpy(got[0]), torch.from_numpy(got[3])
    grads = [torch.randn(x.shape, dtype=torch.float64) for x in (output, h0, c0)]
    dgates, grad_h0, _ = schedule.run_backward("GRU", *grads, weights, h0, c0, lengths, output, workspace)
    grad_input, _ = cuda_kernels.gradients_from_dgates("GRU", torch.from_numpy(dgates), input, weights, h0, output,
                                                       workspace, lengths)
    want = reference.backward_op("GRU", *grads, input, weights, h0, c0, lengths, output, workspace)
    np.testing.assert_allclose(grad_input.numpy(), want[0].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_h0, want[2].numpy(), rtol=1e-10, atol=1e-12)
    got = schedule.run_forward("GRU", input, weights, h0, c0, lengths, kernel_dtype="fp32")
    output, workspace = torch.from_numpy(got[0]), torch.from_numpy(got[3])
    dgates, grad_h0, _ = schedule.run_backward("GRU", *grads, weights, h0, c0, lengths, output, workspace,
                                               kernel_dtype="fp32")
    grad_input, _ = cuda_kernels.gradients_from_dgates("GRU", torch.from_numpy(dgates), input, weights, h0, output,
                                                       workspace, lengths)
    np.testing.assert_allclose(grad_input.numpy(), want[0].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_h0, want[2].numpy(), rtol=1e-10, atol=1e-12)
    out.append(table("self-test: launches (LSTM, bf16; the fp32 cases; the l2 cases)",
                     ["case", "grid", "threads", "smem", "kernel", "bwd grid", "bwd smem", "bwd kernel"], rows))
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("probes", "correctness", "fp32", "race", "sanitizer", "timings", "tiny",
                                            "l2", "all"),
                        default="all")
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument("--out", default=None, help="Markdown to append to (default $OUT/cuda_check.md)")
    parser.add_argument("--warmup-ms", type=float, default=20)
    parser.add_argument("--rep-ms", type=float, default=100)
    parser.add_argument("--sanitizer-timeout", type=float, default=36)
    args = parser.parse_args()
    out = []
    if args.self_test:
        ok = self_test(out)
    else:
        reason = cuda_kernels.why_not("cuda", torch.bfloat16, "LSTM", 64, 16)
        if reason is not None:
            print(f"cuda_check: the CUDA kernels cannot run: {reason}")
            return 2
        # The fp32 forward runs in the correctness stage's process (one start of torch and the cubins).
        stages = {"probes": lambda: probes(out), "correctness": lambda: all([correctness(out), correctness_fp32(out)]),
                  "fp32": lambda: correctness_fp32(out),
                  "race": lambda: race(out), "sanitizer": lambda: sanitizer(out, args), "tiny": lambda: tiny(out),
                  "timings": lambda: timings(out, args),
                  "l2": lambda: all([correctness_l2(out), timings_l2(out, args)])}
        names = ["probes", "correctness", "l2", "race", "sanitizer", "timings"] if args.stage == "all" else [args.stage]
        ok = True
        for name in names:
            started = time.time()
            try:
                passed = stages[name]()
            except Exception as error:  # report and go on: the next stage may still say something
                out.append(f"### {name}\n\nraised {type(error).__name__}: {error}\n")
                passed = False
            print(f"== cuda_check {name}: {'ok' if passed else 'FAILED'} in {time.time() - started:.0f} s", flush=True)
            ok &= passed
    text = "\n".join(out)
    print(text)
    path = args.out or os.path.join(os.environ.get("OUT", "."), "cuda_check.md")
    if path != os.devnull:
        with open(path, "a") as handle:
            handle.write(f"\n## cuda_check {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ}\n\n{text}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
