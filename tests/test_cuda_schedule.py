"""The CUDA kernels' schedule (birnn_fast/cuda_schedule.py, mirrored by csrc/cuda/schedule.cuh) run
on the CPU: the plan's sizes, the fragment and buffer indexing, and the whole forward with the
exchange delivered in random orders, against reference.py in float64."""
import dataclasses
import itertools
import re

import numpy as np
import pytest
import torch

from birnn_fast import cuda_schedule as schedule
from birnn_fast import reference
from birnn_fast.cells import cell_of


def lstm_layer(T, B, I, H, lengths, seed, cell="LSTM"):
    """A layer of ``cell`` in float64 (the name is the first cell the kernels ran)."""
    generator = torch.Generator().manual_seed(seed)
    G = cell_of(cell).gates
    weights = []
    for _ in range(2):
        weights += [torch.randn(G * H, I, generator=generator, dtype=torch.float64) / H ** 0.5,
                    torch.randn(G * H, H, generator=generator, dtype=torch.float64) / H ** 0.5,
                    torch.randn(G * H, generator=generator, dtype=torch.float64) * 0.1,
                    torch.randn(G * H, generator=generator, dtype=torch.float64) * 0.1]
    input = torch.randn(T, B, I, generator=generator, dtype=torch.float64)
    h0 = torch.randn(2, B, H, generator=generator, dtype=torch.float64)
    c0 = torch.randn(2, B, H, generator=generator, dtype=torch.float64)
    if cell != "LSTM":
        c0 = torch.zeros(0, dtype=torch.float64)
    return input, weights, h0, c0, torch.tensor(lengths, dtype=torch.int64)


def mixed_lengths(T, B, seed):
    """Lengths in 1..T that include 1 and T (where B allows)."""
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(seed)).tolist()
    lengths[0] = T
    if B > 1:
        lengths[-1] = 1
    return lengths


CASES = [  # (T, B, H, lengths): odd sizes, one cluster of 5, 9 and 13 CTAs, one and two chunks
    (1, 1, 40, "equal"), (5, 3, 40, "mixed"), (33, 17, 40, "mixed"), (5, 64, 72, "mixed"),
    (33, 3, 72, "equal"), (5, 3, 520, "mixed"), (5, 70, 40, "mixed"), (5, 1, 8, "equal"),
    (5, 17, 256, "mixed"), (3, 9, 512, "mixed"),
]


OTHER_CELLS = [("GRU", case) for case in CASES[1:6:2]] + [("RNN_TANH", CASES[2]), ("RNN_RELU", CASES[5]),
                                                          ("RNN_TANH", CASES[3]), ("GRU", CASES[-1])]


@pytest.mark.parametrize("cell, case", [("LSTM", case) for case in CASES] + OTHER_CELLS)
def test_model_matches_reference(cell, case):
    T, B, H, kind = case
    lengths = [T] * B if kind == "equal" else mixed_lengths(T, B, seed=H + B)
    input, weights, h0, c0, lengths = lstm_layer(T, B, 7, H, lengths, seed=T * 1000 + B, cell=cell)
    expected = reference.forward_op(cell, input, weights, h0, c0, lengths, True)[:3]
    for seed in range(2):
        output, h_n, c_n, workspace = schedule.run_forward(cell, input, weights, h0, c0, lengths, seed=seed)
        for name, got, want in zip(("output", "h_n", "c_n"), (output, h_n, c_n), expected):
            assert not np.isnan(got).any(), f"{name}: elements nobody wrote"
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
        assert not np.isnan(workspace).any()
        if cell == "LSTM":  # the workspace holds c_t at each row's time index, 0 at padding
            c_all = workspace[..., 4 * H:]
            np.testing.assert_allclose(c_all[lengths.numpy() - 1, np.arange(B), 0], c_n[0], rtol=1e-12)
        for b, length in enumerate(lengths.tolist()):
            assert (workspace[length:, b] == 0).all() and (output[length:, b] == 0).all()


def test_plan_sizes():
    p = schedule.plan("LSTM", 512, 64, "bf16")
    assert (p.units, p.cluster, p.unit_warps, p.split_k, p.threads) == (32, 16, 4, 2, 256)
    assert (p.warp_k_tiles, p.reg_k_tiles, p.smem_k_tiles, p.n_tiles) == (16, 8, 8, 8)
    assert p.smem_bytes <= schedule.SMEM_LIMIT and p.grid == (16, 2, 1)
    assert schedule.plan("LSTM", 256, 130, "fp16").grid == (16, 2, 3)
    for H, B in itertools.product((1, 8, 40, 72, 127, 128, 129, 256, 300, 511, 512), (1, 3, 17, 64, 65, 200)):
        p = schedule.plan("LSTM", H, B, "bf16")
        assert p.cluster <= schedule.MAX_CLUSTER and p.cluster * p.units >= H > (p.cluster - 1) * p.units
        assert p.slices * p.units >= 16 * p.k_tiles and p.split_k * p.warp_k_tiles >= p.k_tiles
        assert (p.split_k, p.reg_k_tiles) in {(s, r) for _, _, s, r in schedule.INSTANCES}
        assert p.threads <= 1024 and p.slice_bytes % 16 == 0 and p.smem_bytes <= schedule.SMEM_LIMIT
    with pytest.raises(ValueError, match="l2_plan"):
        schedule.plan("LSTM", 1024, 64, "bf16")
    with pytest.raises(ValueError, match="bf16"):
        schedule.plan("LSTM", 64, 4, "fp64")


# The largest H one cluster a direction holds in fp32 (W_hh, the h buffers and the split-K partials
# within shared memory), by cell and batch; past it the plan refuses (l2_plan takes it).
FP32_LARGEST = {("LSTM", 64): 264, ("LSTM", 16): 416, ("LSTM", 1): 480, ("GRU", 64): 264, ("GRU", 16): 416,
                ("RNN_TANH", 64): 336, ("RNN_TANH", 16): 512}


@pytest.mark.parametrize("cell, B", sorted(FP32_LARGEST))
def test_fp32_plans(cell, B):
    """fp32 (tf32 and fp32 alike: one plan) takes every H up to its largest, with a compiled (S, R),
    and refuses the next multiple of 8 with the reason."""
    built = {(split, reg) for c, dtype, split, reg in schedule.INSTANCES if dtype == "fp32"}
    largest = FP32_LARGEST[cell, B]
    for H in [*range(1, 80), *range(80, largest + 1, 8), largest]:
        p = schedule.plan(cell, H, B, "fp32")
        assert dataclasses.replace(p, dtype="tf32") == schedule.plan(cell, H, B, "tf32")
        assert (p.split_k, p.reg_k_tiles) in built and p.smem_bytes <= schedule.SMEM_LIMIT
        assert p.k_tiles == -(-H // 8) and p.slices * p.units >= 8 * p.k_tiles and p.threads <= 256
        assert p.kernel.startswith(f"birnn_forward_{schedule.FAMILIES[cell]}_fp32_") and p.cubin.endswith("_fp32")
    with pytest.raises(ValueError, match="l2_plan"):
        schedule.plan(cell, largest + 8, B, "fp32")


# The largest H of the fp32 backward, by cell and batch: every forward plan's but the LSTM's at B = 16
# past 384 (U = 32 with two batch tiles: W_hh^T's 64 fragments a warp and the receive buffers
# overflow shared memory), where the Triton backward runs it.
FP32_BACKWARD_LARGEST = {("LSTM", 64): 264, ("LSTM", 16): 384, ("LSTM", 1): 480, ("GRU", 64): 264,
                         ("GRU", 16): 416, ("RNN_TANH", 64): 336, ("RNN_TANH", 16): 512}


@pytest.mark.parametrize("cell, B", sorted(FP32_BACKWARD_LARGEST))
def test_fp32_backward_plans(cell, B):
    """The fp32 backward (tf32 and fp32: one plan) takes every H up to its largest within its
    compiled bounds (K tiles of 8 gate-units), and refuses the next multiple of 8."""
    largest = FP32_BACKWARD_LARGEST[cell, B]
    for H in [*range(1, 80), *range(80, largest + 1, 8), largest]:
        p = schedule.backward_plan(cell, H, B, "fp32")
        assert dataclasses.replace(p, dtype="tf32") == schedule.backward_plan(cell, H, B, "tf32")
        rows, k_tiles, warp_m_tiles, registers = schedule.backward_bounds(p.gates, p.chunk_rows, "fp32")
        assert p.k_tiles == -(-p.gates * p.units // 8) and p.width == 8 * p.k_tiles
        assert p.n_tiles <= rows and p.k_tiles <= k_tiles <= p.fragment_stride and p.warp_m_tiles <= warp_m_tiles
        assert p.reg_fragments <= registers and p.items <= 2 * p.warps and p.smem_bytes <= schedule.SMEM_LIMIT
        assert p.kernel == f"birnn_backward_{schedule.FAMILIES[cell]}_fp32_r{p.chunk_rows}"
        assert p.cubin == f"backward_{schedule.FAMILIES[cell]}_fp32"
        assert (cell if cell != "RNN_RELU" else "RNN_TANH", "fp32", p.chunk_rows) in schedule.BACKWARD_INSTANCES
    with pytest.raises(ValueError, match="shared memory|l2_plan"):
        schedule.backward_plan(cell, largest + 8, B, "fp32")


def test_fp32_dgb_swizzle_is_conflict_free():
    """The fp32 dgb's offsets are a permutation, and ldmatrix's 8 rows of a 16-byte chunk fall in
    distinct bank groups."""
    for cell, H, B in itertools.product(("LSTM", "GRU", "RNN_TANH"), (40, 200, 264), (3, 64)):
        p = schedule.backward_plan(cell, H, B, "fp32")
        row, col = np.meshgrid(np.arange(p.rows), np.arange(p.width), indexing="ij")
        assert sorted(schedule.dgb_offset32(p, row, col).ravel().tolist()) == list(range(p.rows * p.width))
        for chunk in range(p.width // 4):
            for first in range(0, p.rows, 8):
                banks = schedule.dgb_offset32(p, first + np.arange(8), 4 * chunk) % 32
                assert len(set((banks // 4).tolist())) == 8, (cell, H, chunk)


def test_fp32_fragments_cover_each_element_once():
    """The TF32 m16n8k8 lane maps are bijections onto their tiles; the fp32 h buffers' offsets are a
    permutation, and ldmatrix's 8 rows of a 16-byte chunk fall in distinct bank groups."""
    lanes = np.arange(32)[:, None]
    for coords, regs, shape in ((schedule.a_coords32, 4, (16, 8)), (schedule.b_coords32, 2, (8, 8))):
        seen = np.zeros(shape, dtype=int)
        np.add.at(seen, coords(lanes, np.arange(regs)[None, :]), 1)
        assert (seen == 1).all(), coords.__name__
    for H, B in ((40, 3), (128, 64), (256, 64), (264, 64), (416, 16)):
        p = schedule.plan("LSTM", H, B, "fp32")
        buffer, slice_, row, col = np.meshgrid(range(2), range(p.slices), range(p.rows), range(p.units), indexing="ij")
        offsets = schedule.hbuf_offset32(p, buffer, slice_, row, col)
        assert sorted(offsets.ravel().tolist()) == list(range(2 * p.slices * p.rows * p.units))
        for chunk in range(p.units // 4):
            banks = (schedule.hbuf_offset32(p, 0, 0, np.arange(8), 4 * chunk) * 4 // 4) % 32
            assert len(set((banks // 4).tolist())) == 8, (H, chunk)


FP32_CASES = [("LSTM", (1, 1, 40, "equal")), ("LSTM", (5, 3, 40, "mixed")), ("LSTM", (4, 17, 136, "mixed")),
              ("LSTM", (3, 70, 24, "mixed")), ("LSTM", (3, 5, 264, "mixed")), ("GRU", (5, 9, 72, "mixed")),
              ("GRU", (3, 17, 300, "equal")), ("RNN_TANH", (4, 9, 56, "mixed")), ("RNN_RELU", (3, 3, 336, "mixed"))]


@pytest.mark.parametrize("cell, case", FP32_CASES)
def test_fp32_model_matches_reference(cell, case):
    """The fp32 kernels' schedule (m16n8k8 fragments, the fp32 h buffers, their (S, R)), in float64."""
    T, B, H, kind = case
    lengths = [T] * B if kind == "equal" else mixed_lengths(T, B, seed=H + B)
    input, weights, h0, c0, lengths = lstm_layer(T, B, 7, H, lengths, seed=T * 1000 + B + 1, cell=cell)
    expected = reference.forward_op(cell, input, weights, h0, c0, lengths, True)
    output, h_n, c_n, workspace = schedule.run_forward(cell, input, weights, h0, c0, lengths, seed=H,
                                                       kernel_dtype="fp32")
    for name, got, want in zip(("output", "h_n", "c_n"), (output, h_n, c_n), expected):
        assert not np.isnan(got).any(), f"{name}: elements nobody wrote"
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    assert not np.isnan(workspace).any()


def test_fragments_cover_each_element_once():
    """The A, B and accumulator lane maps of m16n8k16 are bijections onto their tiles, and the
    swizzled h offsets of a slice block are a permutation, conflict-free for ldmatrix."""
    lanes = np.arange(32)[:, None]
    for coords, regs, shape in ((schedule.a_coords, 4, (16, 16)), (schedule.b_coords, 2, (16, 8)),
                                (schedule.c_coords, 4, (16, 8))):
        seen = np.zeros(shape, dtype=int)
        x, y = coords(lanes, np.arange(regs)[None, :])
        for e in range(1 if coords is schedule.c_coords else 2):
            np.add.at(seen, (x, y + e) if coords is not schedule.b_coords else (x + e, y), 1)
        assert (seen == 1).all(), coords.__name__
    for units in (8, 16, 24, 32, 40, 64):
        p = schedule.plan("LSTM", units * 16, 64, "bf16", fit=False)
        row, col = np.meshgrid(np.arange(p.rows), np.arange(p.units), indexing="ij")
        offsets = schedule.h_offset(p, row, col)
        assert sorted(offsets.ravel().tolist()) == list(range(p.rows * p.units))
        for chunk in range(units // 8):  # ldmatrix: 8 rows of one 16-byte chunk, 4 banks each
            banks = (schedule.h_offset(p, np.arange(8), 8 * chunk) * 2 // 4) % 32
            assert len(set((banks // 4).tolist())) == 8, (units, chunk)


def test_phase_parity():
    """full[b] completes once per arming: at the start for steps 1 (full[1]) and 2 (full[0]), then by
    the step that waited on it, for the step two later."""
    completions = [0, 0]
    for s in range(1, 40):
        buffer = schedule.read_buffer(s)
        assert schedule.phase_parity(s) == completions[buffer] & 1
        completions[buffer] += 1


BACKWARD_CASES = [  # (T, B, H, lengths): H 40 / 72 / 256 / 520, B 1 / 3 / 17 / 70, T 1 / 5 / 33
    (1, 1, 40, "equal"), (5, 3, 40, "mixed"), (33, 17, 40, "mixed"), (5, 70, 72, "mixed"), (33, 3, 72, "equal"),
    (5, 17, 256, "mixed"), (5, 3, 520, "mixed"), (5, 1, 256, "equal"), (3, 40, 384, "mixed"),
]
BACKWARD_OTHER = [("GRU", BACKWARD_CASES[1]), ("GRU", BACKWARD_CASES[5]), ("RNN_TANH", BACKWARD_CASES[3]),
                  ("RNN_RELU", BACKWARD_CASES[2]), ("GRU", BACKWARD_CASES[6]), ("RNN_TANH", BACKWARD_CASES[8])]


def check_backward_model(cell, case, kernel_dtype, layer_seed, grad_seed, model_seeds):
    """The model's forward in kernel_dtype's layout, then its backward (the CUDA backward's schedule, at
    each of model_seeds' delivery orders) and the launcher's GEMMs: every gradient as torch.autograd's
    on the reference, float64."""
    from birnn_fast import cuda_kernels

    T, B, H, kind = case
    lengths = [T] * B if kind == "equal" else mixed_lengths(T, B, seed=H + B)
    input, weights, h0, c0, lengths = lstm_layer(T, B, 7, H, lengths, seed=layer_seed, cell=cell)
    output, h_n, c_n, workspace = (torch.from_numpy(x) for x in schedule.run_forward(
        cell, input, weights, h0, c0, lengths, kernel_dtype=kernel_dtype))
    generator = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in (output, h_n, c_n)]
    want = reference.backward_op(cell, *grads, input, weights, h0, c0, lengths, output, workspace)
    expected = [want[0], *want[1], want[2]] + ([want[3]] if cell == "LSTM" else [])
    for seed in model_seeds:
        dgates, grad_h0, grad_c0 = schedule.run_backward(cell, *grads, weights, h0, c0, lengths, output, workspace,
                                                         seed=seed, kernel_dtype=kernel_dtype)
        assert not np.isnan(dgates).any() and not np.isnan(grad_h0).any() and not np.isnan(grad_c0).any()
        for b, length in enumerate(lengths.tolist()):
            assert (dgates[length:, b] == 0).all()
        grad_input, grad_weights = cuda_kernels.gradients_from_dgates(
            cell, torch.from_numpy(dgates), input, weights, h0, output, workspace, lengths)
        got = [grad_input, *grad_weights, torch.from_numpy(grad_h0)] + ([torch.from_numpy(grad_c0)]
                                                                         if cell == "LSTM" else [])
        for index, (a, b) in enumerate(zip(got, expected)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12, err_msg=str(index))


@pytest.mark.parametrize("cell, case", [("LSTM", case) for case in BACKWARD_CASES] + BACKWARD_OTHER)
def test_backward_model_matches_autograd(cell, case):
    T, B, H, _ = case
    check_backward_model(cell, case, "bf16", layer_seed=T * 1000 + B + 1, grad_seed=T + B, model_seeds=(0, 1))


def test_backward_plan_sizes():
    for H, B in itertools.product((1, 8, 40, 72, 127, 128, 129, 256, 300, 384, 511, 512), (1, 3, 17, 33, 64, 65, 200)):
        for cell in ("LSTM", "GRU", "RNN_TANH"):
            p = schedule.backward_plan(cell, H, B, "bf16")
            rows, k_tiles, warp_m_tiles, registers = schedule.backward_bounds(p.gates, p.chunk_rows)
            assert p.n_tiles <= rows and p.k_tiles <= k_tiles and p.warp_m_tiles <= warp_m_tiles
            assert p.reg_fragments <= registers and p.items <= 2 * p.warps
            assert p.warps * p.warp_m_tiles * 16 >= p.cluster * p.units and p.m_tiles * 16 >= p.cluster * p.units
            assert p.smem_bytes <= schedule.SMEM_LIMIT and p.expect_bytes < (1 << 20) and p.width % 8 == 0
            assert (cell if cell != "RNN_TANH" else "RNN_TANH", p.dtype, p.chunk_rows) in schedule.BACKWARD_INSTANCES
    assert schedule.backward_plan("LSTM", 256, 64, "bf16").chunk_rows == 64
    p = schedule.backward_plan("LSTM", 512, 64, "bf16")
    assert (p.chunk_rows, p.grid, p.reg_fragments, p.smem_fragments) == (32, (16, 2, 2), 16, 16)


def test_dgb_swizzle_is_conflict_free():
    for cell, H in itertools.product(("LSTM", "GRU", "RNN_TANH"), (40, 200, 256, 384, 512)):
        p = schedule.backward_plan(cell, H, 64, "bf16")
        row, col = np.meshgrid(np.arange(p.rows), np.arange(p.width), indexing="ij")
        assert sorted(schedule.dgb_offset(p, row, col).ravel().tolist()) == list(range(p.rows * p.width))
        for chunk in range(p.width // 8):
            for first in range(0, p.rows, 8):
                banks = (schedule.dgb_offset(p, first + np.arange(8), 8 * chunk) * 2 // 4) % 32
                assert len(set((banks // 4).tolist())) == 8, (cell, H, chunk)


FP32_BACKWARD_CASES = [("LSTM", (1, 1, 40, "equal")), ("LSTM", (5, 3, 40, "mixed")), ("LSTM", (4, 17, 136, "mixed")),
                       ("LSTM", (3, 70, 24, "mixed")), ("LSTM", (3, 5, 264, "mixed")), ("GRU", (5, 9, 72, "mixed")),
                       ("GRU", (3, 17, 300, "equal")), ("RNN_TANH", (4, 9, 56, "mixed")),
                       ("RNN_RELU", (3, 3, 336, "mixed"))]


@pytest.mark.parametrize("cell, case", FP32_BACKWARD_CASES)
def test_fp32_backward_model_matches_autograd(cell, case):
    """The fp32 backward's schedule (m16n8k8 fragments of W_hh^T, the fp32 dgb, its bounds) after the
    fp32 forward's."""
    T, B, H, _ = case
    check_backward_model(cell, case, "fp32", layer_seed=T * 1000 + B + 2, grad_seed=T + B + 1, model_seeds=(H,))


# --- The l2 exchange (cuda_schedule.l2_plan): C plain CTAs a direction, h through L2 as step-tagged
# words. (cell, T, B, H, kernel dtype, sms): odd H (not a multiple of 8 or 16), B not a multiple of
# 8 and past one chunk, the split-K partials in hbuf's slices (H = 500: U = 32, P = 8 or 4, C = 16)
# and in their own area, sms forcing smaller slices (more CTAs).
L2_CASES = [
    ("LSTM", 5, 13, 40, "bf16", 132), ("LSTM", 4, 3, 500, "bf16", 132), ("LSTM", 3, 5, 100, "fp32", 26),
    ("GRU", 4, 3, 72, "bf16", 132), ("GRU", 3, 3, 500, "tf32", 132), ("RNN_TANH", 3, 66, 33, "fp32", 132),
    ("RNN_RELU", 3, 3, 500, "bf16", 132), ("RNN_TANH", 6, 1, 8, "bf16", 132), ("GRU", 3, 5, 130, "bf16", 34),
]


@pytest.mark.parametrize("cell, T, B, H, kernel_dtype, sms", L2_CASES)
def test_l2_model_matches_reference(cell, T, B, H, kernel_dtype, sms):
    """The l2 exchange's schedule run on the CPU (every word a store landing at a random time, the
    polls' tags, the staging into hbuf, the partials in hbuf's slices) against reference.py."""
    lengths = mixed_lengths(T, B, seed=H + B) if B > 1 else [T]
    input, weights, h0, c0, lengths = lstm_layer(T, B, 5, H, lengths, seed=T * 1000 + B + H, cell=cell)
    expected = reference.forward_op(cell, input, weights, h0, c0, lengths, True)[:3]
    p = schedule.l2_plan(cell, H, B, kernel_dtype, sms=sms, fit=False)
    assert p.exchange == "l2" and p.ctas <= sms and p.cluster * p.units >= H
    if H == 500:
        assert p.partial_slices and 2 * p.partial_slices <= p.cluster, "the case meant to alias the partials"
    for seed in range(2):
        output, h_n, c_n, workspace = schedule.run_forward(cell, input, weights, h0, c0, lengths, seed=seed,
                                                           kernel_dtype=kernel_dtype, exchange="l2", sms=sms)
        for name, got, want in zip(("output", "h_n", "c_n"), (output, h_n, c_n), expected):
            assert not np.isnan(got).any(), f"{name}: elements nobody wrote"
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
        assert not np.isnan(workspace).any()
        for b, length in enumerate(lengths.tolist()):
            assert (workspace[length:, b] == 0).all() and (output[length:, b] == 0).all()


def test_l2_one_parity_is_not_enough():
    """A word slot per step parity is what makes the exchange safe: with one slot a writer that has
    its step's h from every CTA overwrites h_s before a slower CTA has read it (the model's check on
    every store); with two it cannot (csrc/cuda/README.md, the l2 exchange)."""
    input, weights, h0, c0, lengths = lstm_layer(6, 3, 5, 40, [6, 6, 6], seed=3)
    failures = 0
    for seed in range(4):
        with pytest.raises(AssertionError, match="overwrote one a reader had not read"):
            schedule.run_forward("LSTM", input, weights, h0, c0, lengths, seed=seed, exchange="l2", parities=1)
        failures += 1
        schedule.run_forward("LSTM", input, weights, h0, c0, lengths, seed=seed, exchange="l2", parities=2)
    assert failures == 4


def test_l2_plans():
    """The l2 plan where one cluster cannot hold W_hh: the device check's cases fit (bf16 H = 1024
    and fp32 H = 512 at B = 64 on sm_90), every plan's kernel is compiled, its grid fits the SMs
    one CTA each and its shared memory the limit; refusals say why."""
    sms, limit = schedule.L2_ARCHS["90a"]
    p = schedule.l2_plan("LSTM", 1024, 64, "bf16", sms, limit)
    assert (p.units, p.cluster, p.split_k, p.reg_k_tiles, p.partial_slices, p.ctas) == (16, 64, 4, 8, 24, 128)
    assert p.smem_bytes == 128 * 1024 + 64 * 1024 and p.grid == (64, 2, 1) and p.threads == 256
    assert p.kernel == "birnn_forward_lstm_bf16_l2_s4_r8" and p.cubin == "forward_lstm_l2"
    assert (p.rows_per_word, p.word_rows, p.exchange_words) == (2, 32, 2 * 2 * 64 * 32 * 16)
    p = schedule.l2_plan("LSTM", 512, 64, "fp32", sms, limit)
    assert (p.units, p.cluster, p.ctas, p.rows_per_word) == (16, 32, 64, 1) and p.cubin == "forward_lstm_l2_fp32"
    built = {(schedule.FAMILIES[c], d, s, r) for c, d, s, r in schedule.L2_INSTANCES}
    for arch, (sms, limit) in schedule.L2_ARCHS.items():
        for cell, dtype, H, B in itertools.product(("LSTM", "GRU", "RNN_TANH"), ("bf16", "fp16", "tf32", "fp32"),
                                                   (1, 8, 33, 127, 256, 300, 512, 520, 777, 1024), (1, 13, 64, 65)):
            try:
                p = schedule.l2_plan(cell, H, B, dtype, sms, limit)
            except ValueError as error:
                assert re.search("CTAs resident|bytes of shared memory|no compiled", str(error)), error
                assert H > 256, (arch, cell, dtype, H, B, error)  # every H one cluster holds, l2 holds too
                continue
            assert (schedule.FAMILIES[cell], dtype, p.split_k, p.reg_k_tiles) in built
            assert p.ctas <= sms and p.smem_bytes <= limit and p.threads <= 256
            assert p.cluster * p.units >= H > (p.cluster - 1) * p.units and p.units in schedule.L2_UNITS
            assert p.slices * p.units >= schedule.tile_k(dtype) * p.k_tiles
            if p.partial_slices:
                assert p.partial_bytes <= p.partial_slices * p.slice_bytes and 2 * p.partial_slices <= p.cluster
    with pytest.raises(ValueError, match="bytes of shared memory"):
        schedule.l2_plan("LSTM", 1024, 64, "bf16", *schedule.L2_ARCHS["80"])
    with pytest.raises(ValueError, match="CTAs resident"):
        schedule.l2_plan("LSTM", 1024, 130, "bf16", *schedule.L2_ARCHS["90a"])


def test_l2_index_functions():
    """The words: each (parity, chunk, direction, slice, word row, column) one index of the buffer;
    a CTA stages every word of the other slices once; the partials' slices never a CTA's own."""
    for H, B, dtype in ((40, 13, "bf16"), (500, 70, "fp32"), (1024, 64, "fp16")):
        p = schedule.l2_plan("GRU", H, B, dtype, fit=False)
        seen = {schedule.exchange_word(p, p.word_rows, p.chunks, *key)
                for key in itertools.product(range(2), range(2), range(p.chunks), range(p.cluster),
                                             range(p.word_rows), range(p.units))}
        assert seen == set(range(p.exchange_words))
        for rank in {0, 1, p.cluster - 1}:
            staged = [schedule.staged_word(p, p.word_rows, rank, w)
                      for w in range((p.cluster - 1) * p.word_rows * p.units)]
            assert sorted(staged) == [(s, r, c) for s in range(p.cluster) if s != rank
                                      for r in range(p.word_rows) for c in range(p.units)]
    for partial_slices, cluster in ((1, 2), (8, 16), (24, 64)):
        for rank in range(cluster):
            first = schedule.partial_slice(partial_slices, rank)
            assert first + partial_slices <= cluster and not first <= rank < first + partial_slices
