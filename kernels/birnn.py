"""Fused bidirectional LSTM / GRU / RNN layer: one persistent Triton kernel per pass.

The input projection of every step is one cuBLAS GEMM done by the launcher; the kernels run the
whole recurrence, one step after another. Program (j, p, d) owns hidden units [j*BH, (j+1)*BH) (all
G gates of them) of direction d for batch blocks p, p + n_bprog, ... of BB rows each, and runs all
of its blocks in every step, one after another, with the same W_hh slice. Between steps their state
is in global memory (L2): h in the exchange buffer below, and in fp32 LSTM c, GRU h, and in the
backward the gradients reaching h and c. Rows that have ended are masked out; a block whose rows
have all ended (or, backward, not yet begun) is skipped.

Where the program's slice of W_hh fits in shared memory (and the time loop compiles without spills)
it is loaded once, before the time loop (RESIDENT), and the per-step products split K over the warps: a 3-D tl.dot
whose batch is NK chunks of BK, then a sum over the chunks, so no warp repeats another's work.
Otherwise each step streams the slice from L2 in 2-D chunks of BK.

The full h (forward) or the full gate gradients (backward) of a step are exchanged through a small
double-buffered global buffer, then the n_hblocks programs of a (direction, batch blocks) group
meet at a grid barrier, once per step: a global counter bumped with release semantics and polled with
acquire. A barrier among programs that are not all resident deadlocks, so the launcher never launches
more programs than there are SMs (each takes several batch blocks instead), and launches a grid with
a barrier cooperatively: the driver then starts all its programs together, or refuses a grid that
cannot be resident at once with an error, instead of a partial launch hanging at the barrier (not
yet seen on hardware).

Contract: ``birnn_fast/ops.py``. Workspace, (T, B, 2, W*H), at each row's time index:
LSTM i, f, g, o (after their nonlinearity) and c; GRU r, z, n and hn = W_hn h + b_hn.
"""
import collections
import os

import torch
import triton
import triton.language as tl

from birnn_fast.cells import CELLS as _CELL_TABLE

LSTM = tl.constexpr(_CELL_TABLE["LSTM"].index)
GRU = tl.constexpr(_CELL_TABLE["GRU"].index)
RNN_TANH = tl.constexpr(_CELL_TABLE["RNN_TANH"].index)
RNN_RELU = tl.constexpr(_CELL_TABLE["RNN_RELU"].index)
CELLS = {mode: cell.index for mode, cell in _CELL_TABLE.items()}
GATES = {mode: cell.gates for mode, cell in _CELL_TABLE.items()}
WORKSPACE = {mode: cell.saved for mode, cell in _CELL_TABLE.items()}

# K chunk of the per-step products when W_hh streams (tl.dot needs >= 16): 2-D tiles, as chunks split
# over the warps (NK > 1) spill at 32x16 and 16x32 in Triton 3.6.
STREAM_NK, STREAM_BK = 1, 32
# Software pipelining of the K loops costs registers (spills) and buys little: its loads hit L2.
NUM_STAGES = 1
# One program per SM by design, so each of its 256 threads may hold 255 registers; without the cap
# ptxas aims at 128 and spills.
MAX_REGISTERS = 255
NUM_WARPS = 8
# (BB, BH) tiles the launcher may pick on a GPU when W_hh streams: those the compile test finds free
# of spills for every cell and dtype on sm_80 and sm_90 (32x32, 64x16 and up spill).
STREAM_TILES = ((16, 16), (32, 16), (16, 32))
# The tile when W_hh stays in shared memory: the narrowest slice per program.
RESIDENT_TILE = (16, 16)
# Widest K chunk of a resident product (16 chunks at K = 1024, two per warp), as compiled in the tests.
RESIDENT_MAX_BK = 64
# The installed Triton's (major, minor): what compiles without spills depends on it.
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
# Shared memory a resident program uses beyond its two operands (reductions, barriers): 1 KiB measured
# in the compile test, which holds every selectable configuration to its sm_80 / sm_90 limit.
RESIDENT_SHARED_SLACK = 2048


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # exp of a non-positive argument only: no overflow for large |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


# The K chunks of the per-step products: with NK > 1 a 3-D batch of NK chunks of BK (split across
# the warps), with NK == 1 a plain 2-D tile (a 3-D batch of one costs registers in Triton 3.6).
@triton.jit
def _weight_tile(p, k0, offs_j, mask_j, H, stride_k, stride_j, NK: tl.constexpr, BK: tl.constexpr):
    """[NK, BK, BH] ([BK, BH] if NK == 1): W[k, j] at p + k*stride_k + j*stride_j for k0 <= k < k0 + NK*BK
    (k < H), j of offs_j."""
    if NK == 1:
        offs_k = k0 + tl.arange(0, BK)[:, None]  # [BK, 1]
        tile = tl.load(p + offs_k * stride_k + offs_j[None, :] * stride_j, mask=(offs_k < H) & mask_j[None, :],
                       other=0.0)
    else:
        offs_k = k0 + tl.arange(0, NK)[:, None, None] * BK + tl.arange(0, BK)[None, :, None]  # [NK, BK, 1]
        tile = tl.load(p + offs_k * stride_k + offs_j[None, None, :] * stride_j,
                       mask=(offs_k < H) & mask_j[None, None, :], other=0.0)
    return tile


@triton.jit
def _resident_weights(p_w, offs_j, mask_j, H, stride_k, stride_j, G: tl.constexpr, NK: tl.constexpr,
                      BK: tl.constexpr):
    """_weight_tile of every gate over all of K, gate g at p_w + g*H*H; entries past G repeat gate 0."""
    b_w0 = _weight_tile(p_w, 0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
    b_w1 = b_w0
    b_w2 = b_w0
    b_w3 = b_w0
    if G > 1:
        tl.debug_barrier()
        b_w1 = _weight_tile(p_w + H * H, 0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
        tl.debug_barrier()
        b_w2 = _weight_tile(p_w + 2 * H * H, 0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
    if G > 3:
        tl.debug_barrier()
        b_w3 = _weight_tile(p_w + 3 * H * H, 0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
    return b_w0, b_w1, b_w2, b_w3


@triton.jit
def _exchanged_tile(p_rows, k0, mask_b, H, NK: tl.constexpr, BK: tl.constexpr):
    """[NK, BB, BK] ([BB, BK] if NK == 1): p_rows[b] + k for k0 <= k < k0 + NK*BK (k < H), read past L1
    (.cg): other SMs wrote it."""
    if NK == 1:
        offs_k = k0 + tl.arange(0, BK)[None, :]  # [1, BK]
        tile = tl.load(p_rows + offs_k, mask=mask_b[:, None] & (offs_k < H), other=0.0, cache_modifier=".cg")
    else:
        offs_k = k0 + tl.arange(0, NK)[:, None, None] * BK + tl.arange(0, BK)[None, None, :]  # [NK, 1, BK]
        tile = tl.load(p_rows[None, :, :] + offs_k, mask=mask_b[None, :, None] & (offs_k < H), other=0.0,
                       cache_modifier=".cg")
    return tile


@triton.jit
def _split_k_dot(a, w, acc, NK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a[NK, BB, BK] @ w[NK, BK, BH] summed over the NK chunks (K split across the warps), or
    acc + a[BB, BK] @ w[BK, BH]: [BB, BH] fp32."""
    if NK == 1:
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(tl.dot(a, w, input_precision=DOT_PRECISION), axis=0)
    return acc


@triton.jit
def _gate_dot(acc, a, b_w, p_w, k0, offs_j, mask_j, H, stride_k, stride_j, RESIDENT: tl.constexpr,
              NK: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ one gate's K chunk of W: b_w when RESIDENT, else the chunk at k0 of the W at p_w,
    loaded here, right before its product (loading every gate's chunk first spills in Triton 3.6)."""
    if not RESIDENT:
        b_w = _weight_tile(p_w, k0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
    return _split_k_dot(a, b_w, acc, NK, DOT_PRECISION)


@triton.jit
def _group_barrier(p_counter, target, SYNC: tl.constexpr):
    """All programs of a group have finished the step once the counter reaches target."""
    # The CTA barrier orders this CTA's global writes before the release (cumulativity), and its
    # reads after the acquire; alone it suffices when the group is a single program.
    tl.debug_barrier()
    if SYNC:
        arrived = tl.atomic_add(p_counter, 1, sem="release", scope="gpu") + 1
        while arrived < target:
            arrived = tl.atomic_add(p_counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _batch_rows(bb, B, BB: tl.constexpr):
    """Rows [bb*BB, (bb+1)*BB) of batch block bb: their int64 indices and mask (< B)."""
    offs_b = bb * BB + tl.arange(0, BB).to(tl.int64)
    return offs_b, offs_b < B


@triton.jit
def _batch_block(lengths_ptr, bb, B, BB: tl.constexpr):
    """_batch_rows of batch block bb, and their lengths (0 past B)."""
    offs_b, mask_b = _batch_rows(bb, B, BB)
    return offs_b, mask_b, tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)


@triton.jit
def _group_steps(lengths_ptr, B, BB: tl.constexpr):
    """The longest row of the program's batch blocks: the steps of its group, which shares them."""
    steps = tl.full([], 0, tl.int64)
    for bb in range(tl.program_id(1), tl.cdiv(B, BB), tl.num_programs(1)):
        _, _, b_len = _batch_block(lengths_ptr, bb, B, BB)
        steps = tl.maximum(steps, tl.max(b_len, axis=0))
    return steps


@triton.jit
def _copy_slices(src_ptr, dst_ptr, B, H, BB: tl.constexpr, BH: tl.constexpr):
    """dst[d, b, j] = src[d, b, j] of (2, B, H) tensors, for the program's rows and units, in dst's dtype."""
    offs_j = tl.program_id(0) * BH + tl.arange(0, BH)
    for bb in range(tl.program_id(1), tl.cdiv(B, BB), tl.num_programs(1)):
        offs_b, mask_b = _batch_rows(bb, B, BB)
        mask = mask_b[:, None] & (offs_j < H)[None, :]
        p = (tl.program_id(2) * B + offs_b[:, None]) * H + offs_j[None, :]
        tl.store(dst_ptr + p, tl.load(src_ptr + p, mask=mask).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def birnn_forward_kernel(
    xg_ptr,        # (T, B, 2, G*H) input projection + biases (GRU: b_hn excluded)
    w_hh_ptr,      # (2, G*H, H)
    b_hh_ptr,      # (2, G*H), read for GRU's b_hn only
    h0_ptr,        # (2, B, H)
    c0_ptr,        # (2, B, H) for LSTM
    lengths_ptr,   # (B,) int64
    out_ptr,       # (T, B, 2*H), zero-filled by the launcher
    h_n_ptr,       # (2, B, H)
    c_n_ptr,       # (2, B, H) for LSTM
    ws_ptr,        # (T, B, 2, W*H), written only if SAVE (for a backward pass)
    hbuf_ptr,      # (2, 2, B, H) in the matmul dtype: [direction, step parity]; parity 0 holds h0
    state_ptr,     # (2, B, H) fp32 between steps: LSTM c, GRU h (unused by RNN)
    counter_ptr,   # (2, programs along batch) int32 zeros
    T, B, H,
    CELL: tl.constexpr, G: tl.constexpr, W: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, NK: tl.constexpr, BK: tl.constexpr, RESIDENT: tl.constexpr,
    SYNC: tl.constexpr, DOT_PRECISION: tl.constexpr, SAVE: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    d = tl.program_id(2).to(tl.int64)
    n_bprog = tl.num_programs(1)
    n_hblocks = tl.num_programs(0)
    n_bblocks = tl.cdiv(B, BB)
    GH = G * H
    p_counter = counter_ptr + d * n_bprog + pid_b

    offs_j = pid_h * BH + tl.arange(0, BH)  # [BH]
    mask_j = offs_j < H
    if CELL == LSTM:
        _copy_slices(c0_ptr, state_ptr, B, H, BB, BH)
    if CELL == GRU:
        _copy_slices(h0_ptr, state_ptr, B, H, BB, BH)
    tl.debug_barrier()
    steps = _group_steps(lengths_ptr, B, BB)
    p_w = w_hh_ptr + d * GH * H
    if RESIDENT:
        # W_hh^T[k, j] of gate g is W_hh[g*H + j, k]. Loop-invariant dot operands: Triton keeps
        # them in shared memory for the whole launch (loaded after the loops above, so that their
        # registers are not held across them).
        b_w0, b_w1, b_w2, b_w3 = _resident_weights(p_w, offs_j, mask_j, H, 1, H, G, NK, BK)
    else:
        b_w0, b_w1, b_w2, b_w3 = 0.0, 0.0, 0.0, 0.0  # loaded chunk by chunk in the step loop
    if CELL == GRU:
        b_bhn = tl.load(b_hh_ptr + d * GH + 2 * H + offs_j, mask=mask_j, other=0.0).to(tl.float32)
    # Each step runs every batch block of the program in turn, on the same W_hh slice, then the group
    # meets once.
    for s in range(0, steps):
        parity = s % 2
        for bb in range(pid_b, n_bblocks, n_bprog):
            offs_b, mask_b, b_len = _batch_block(lengths_ptr, bb, B, BB)
            # A block whose rows have all ended is done: no program of the group reads it again.
            if s < tl.max(b_len, axis=0):
                active = s < b_len  # [BB]
                mask_a = active[:, None] & mask_j[None, :]  # [BB, BH]
                p_state = (d * B + offs_b[:, None]) * H + offs_j[None, :]  # [BB, BH]
                t = tl.where(d == 0, s, b_len - 1 - s)  # [BB] int64; negative where inactive
                row = (t * B + offs_b) * 2 + d  # [BB]
                p_xg = xg_ptr + row[:, None] * GH + offs_j[None, :]  # [BB, BH]
                acc0 = tl.load(p_xg, mask=mask_a, other=0.0).to(tl.float32)
                acc1 = tl.zeros([BB, BH], dtype=tl.float32)
                acc2 = tl.zeros([BB, BH], dtype=tl.float32)
                acc3 = tl.zeros([BB, BH], dtype=tl.float32)
                if G > 1:
                    acc1 = tl.load(p_xg + H, mask=mask_a, other=0.0).to(tl.float32)
                if CELL == GRU:
                    # r multiplies W_hn h + b_hn as a whole, so the n gate keeps its x part apart.
                    b_xn = tl.load(p_xg + 2 * H, mask=mask_a, other=0.0).to(tl.float32)
                    acc2 = tl.zeros([BB, BH], dtype=tl.float32) + b_bhn[None, :]
                if CELL == LSTM:
                    acc2 = tl.load(p_xg + 2 * H, mask=mask_a, other=0.0).to(tl.float32)
                    acc3 = tl.load(p_xg + 3 * H, mask=mask_a, other=0.0).to(tl.float32)
                p_hbuf = hbuf_ptr + ((d * 2 + parity) * B + offs_b[:, None]) * H  # [BB, 1]
                for k0 in range(0, H, NK * BK):  # a single pass when RESIDENT (NK * BK >= H)
                    b_hk = _exchanged_tile(p_hbuf, k0, mask_b, H, NK, BK)  # [NK, BB, BK], or [BB, BK]
                    acc0 = _gate_dot(acc0, b_hk, b_w0, p_w, k0, offs_j, mask_j, H, 1, H, RESIDENT, NK, BK,
                                     DOT_PRECISION)
                    if G > 1:
                        acc1 = _gate_dot(acc1, b_hk, b_w1, p_w + H * H, k0, offs_j, mask_j, H, 1, H, RESIDENT, NK,
                                         BK, DOT_PRECISION)
                        acc2 = _gate_dot(acc2, b_hk, b_w2, p_w + 2 * H * H, k0, offs_j, mask_j, H, 1, H, RESIDENT,
                                         NK, BK, DOT_PRECISION)
                    if G > 3:
                        acc3 = _gate_dot(acc3, b_hk, b_w3, p_w + 3 * H * H, k0, offs_j, mask_j, H, 1, H, RESIDENT,
                                         NK, BK, DOT_PRECISION)

                p_ws = ws_ptr + row[:, None] * (W * H) + offs_j[None, :]  # [BB, BH]
                if CELL == LSTM:
                    b_i = _sigmoid(acc0)
                    b_f = _sigmoid(acc1)
                    b_g = _tanh(acc2)
                    b_o = _sigmoid(acc3)
                    b_c_new = b_f * tl.load(state_ptr + p_state, mask=mask_a, other=0.0) + b_i * b_g
                    b_h_new = b_o * _tanh(b_c_new)
                    tl.store(state_ptr + p_state, b_c_new, mask=mask_a)
                    tl.store(c_n_ptr + p_state, b_c_new.to(c_n_ptr.dtype.element_ty), mask=mask_a)
                    if SAVE:
                        tl.store(p_ws, b_i, mask=mask_a)
                        tl.store(p_ws + H, b_f, mask=mask_a)
                        tl.store(p_ws + 2 * H, b_g, mask=mask_a)
                        tl.store(p_ws + 3 * H, b_o, mask=mask_a)
                        tl.store(p_ws + 4 * H, b_c_new, mask=mask_a)
                elif CELL == GRU:
                    b_r = _sigmoid(acc0)
                    b_z = _sigmoid(acc1)
                    b_n = _tanh(b_xn + b_r * acc2)
                    b_h_new = (1.0 - b_z) * b_n + b_z * tl.load(state_ptr + p_state, mask=mask_a, other=0.0)
                    tl.store(state_ptr + p_state, b_h_new, mask=mask_a)
                    if SAVE:
                        tl.store(p_ws, b_r, mask=mask_a)
                        tl.store(p_ws + H, b_z, mask=mask_a)
                        tl.store(p_ws + 2 * H, b_n, mask=mask_a)
                        tl.store(p_ws + 3 * H, acc2, mask=mask_a)
                elif CELL == RNN_TANH:
                    b_h_new = _tanh(acc0)
                else:
                    b_h_new = tl.maximum(acc0, 0.0)
                # Every step: a row's last write is its final state.
                tl.store(h_n_ptr + p_state, b_h_new.to(h_n_ptr.dtype.element_ty), mask=mask_a)
                p_out = out_ptr + (t[:, None] * B + offs_b[:, None]) * (2 * H) + d * H + offs_j[None, :]
                tl.store(p_out, b_h_new.to(out_ptr.dtype.element_ty), mask=mask_a)
                # An ended row's h is left as it was: it enters only that row's (masked) products.
                p_next = hbuf_ptr + ((d * 2 + 1 - parity) * B + offs_b[:, None]) * H + offs_j[None, :]
                tl.store(p_next, b_h_new.to(hbuf_ptr.dtype.element_ty), mask=mask_a)
        _group_barrier(p_counter, (s + 1) * n_hblocks, SYNC)


@triton.jit
def birnn_backward_kernel(
    grad_out_ptr,  # (T, B, 2*H)
    grad_h_n_ptr,  # (2, B, H)
    grad_c_n_ptr,  # (2, B, H) for LSTM
    w_hh_ptr,      # (2, G*H, H)
    h0_ptr,        # (2, B, H)
    c0_ptr,        # (2, B, H) for LSTM
    lengths_ptr,   # (B,) int64
    out_ptr,       # (T, B, 2*H) forward output, for GRU and RNN
    ws_ptr,        # (T, B, 2, W*H)
    dgates_ptr,    # (T, B, 2, G*H) fp32, zero-filled: gradient of the input projection
    gbuf_ptr,      # (2, 2, B, G*H) in the matmul dtype: gradient of the hidden projection
    state_ptr,     # (1 or 2, 2, B, H) fp32: gradients reaching h, and c (LSTM), of each direction and row
    counter_ptr,   # (2, programs along batch) int32 zeros
    grad_h0_ptr,   # (2, B, H)
    grad_c0_ptr,   # (2, B, H) for LSTM
    T, B, H,
    CELL: tl.constexpr, G: tl.constexpr, W: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, NK: tl.constexpr, BK: tl.constexpr, RESIDENT: tl.constexpr,
    SYNC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    d = tl.program_id(2).to(tl.int64)
    n_bprog = tl.num_programs(1)
    n_hblocks = tl.num_programs(0)
    n_bblocks = tl.cdiv(B, BB)
    GH = G * H
    p_counter = counter_ptr + d * n_bprog + pid_b

    offs_j = pid_h * BH + tl.arange(0, BH)  # [BH]
    mask_j = offs_j < H
    # Gradients reaching h and c after step s; a row's final state is where grad_h_n enters.
    p_dc = state_ptr + 2 * B * H
    _copy_slices(grad_h_n_ptr, state_ptr, B, H, BB, BH)
    if CELL == LSTM:
        _copy_slices(grad_c_n_ptr, p_dc, B, H, BB, BH)
    tl.debug_barrier()
    steps = _group_steps(lengths_ptr, B, BB)
    p_w = w_hh_ptr + d * GH * H
    if RESIDENT:
        # Gate g's rows of W_hh, the program's columns j: W_hh[g*H + k, j], kept in shared memory.
        b_w0, b_w1, b_w2, b_w3 = _resident_weights(p_w, offs_j, mask_j, H, H, 1, G, NK, BK)
    for i in range(0, steps):
        s = steps - 1 - i
        parity = s % 2
        # The gate gradients of every batch block of the program; the group exchanges them at the barrier.
        for bb in range(pid_b, n_bblocks, n_bprog):
            offs_b, mask_b, b_len = _batch_block(lengths_ptr, bb, B, BB)
            if s < tl.max(b_len, axis=0):  # else no row of the block has reached step s yet
                p_state = (d * B + offs_b[:, None]) * H + offs_j[None, :]  # [BB, BH]
                active = s < b_len  # [BB]
                mask_a = active[:, None] & mask_j[None, :]  # [BB, BH]
                t = tl.where(d == 0, s, b_len - 1 - s)  # [BB] int64
                # The time index of the row's previous step (its h and c are this step's inputs).
                t_prev = tl.where(d == 0, t - 1, t + 1)  # [BB]
                has_prev = (t_prev >= 0) & (t_prev < b_len)  # [BB], i.e. s > 0
                mask_prev = mask_a & has_prev[:, None]
                mask_first = mask_a & (~has_prev)[:, None]
                row = (t * B + offs_b) * 2 + d  # [BB]
                row_prev = (t_prev * B + offs_b) * 2 + d
                p_out = out_ptr + (t[:, None] * B + offs_b[:, None]) * (2 * H) + d * H + offs_j[None, :]
                p_out_prev = out_ptr + (t_prev[:, None] * B + offs_b[:, None]) * (2 * H) + d * H + offs_j[None, :]
                b_go = tl.load(grad_out_ptr + (t[:, None] * B + offs_b[:, None]) * (2 * H) + d * H + offs_j[None, :],
                               mask=mask_a, other=0.0).to(tl.float32)
                b_dh = tl.load(state_ptr + p_state, mask=mask_a, other=0.0) + b_go  # [BB, BH]
                p_ws = ws_ptr + row[:, None] * (W * H) + offs_j[None, :]
                b_d0 = tl.zeros([BB, BH], dtype=tl.float32)
                b_d1 = tl.zeros([BB, BH], dtype=tl.float32)
                b_d2 = tl.zeros([BB, BH], dtype=tl.float32)
                b_d3 = tl.zeros([BB, BH], dtype=tl.float32)
                b_dh2 = tl.zeros([BB, BH], dtype=tl.float32)  # hidden-projection gradient of GRU's n gate
                b_dh_direct = tl.zeros([BB, BH], dtype=tl.float32)
                if CELL == LSTM:
                    b_i = tl.load(p_ws, mask=mask_a, other=0.0).to(tl.float32)
                    b_f = tl.load(p_ws + H, mask=mask_a, other=0.0).to(tl.float32)
                    b_g = tl.load(p_ws + 2 * H, mask=mask_a, other=0.0).to(tl.float32)
                    b_o = tl.load(p_ws + 3 * H, mask=mask_a, other=0.0).to(tl.float32)
                    b_c = tl.load(p_ws + 4 * H, mask=mask_a, other=0.0).to(tl.float32)
                    b_c_prev = tl.load(ws_ptr + row_prev[:, None] * (W * H) + 4 * H + offs_j[None, :],
                                       mask=mask_prev, other=0.0).to(tl.float32)
                    b_c_prev += tl.load(c0_ptr + p_state, mask=mask_first, other=0.0).to(tl.float32)
                    b_tc = _tanh(b_c)
                    b_dc = tl.load(p_dc + p_state, mask=mask_a, other=0.0) + b_dh * b_o * (1.0 - b_tc * b_tc)
                    b_d0 = b_dc * b_g * b_i * (1.0 - b_i)
                    b_d1 = b_dc * b_c_prev * b_f * (1.0 - b_f)
                    b_d2 = b_dc * b_i * (1.0 - b_g * b_g)
                    b_d3 = b_dh * b_tc * b_o * (1.0 - b_o)
                    b_dh2 = b_d2
                    tl.store(p_dc + p_state, b_dc * b_f, mask=mask_a)
                    tl.store(grad_c0_ptr + p_state, (b_dc * b_f).to(grad_c0_ptr.dtype.element_ty), mask=mask_first)
                elif CELL == GRU:
                    b_r = tl.load(p_ws, mask=mask_a, other=0.0).to(tl.float32)
                    b_z = tl.load(p_ws + H, mask=mask_a, other=0.0).to(tl.float32)
                    b_n = tl.load(p_ws + 2 * H, mask=mask_a, other=0.0).to(tl.float32)
                    b_hn = tl.load(p_ws + 3 * H, mask=mask_a, other=0.0).to(tl.float32)
                    b_h_prev = tl.load(p_out_prev, mask=mask_prev, other=0.0).to(tl.float32)
                    b_h_prev += tl.load(h0_ptr + p_state, mask=mask_first, other=0.0).to(tl.float32)
                    b_dn = b_dh * (1.0 - b_z) * (1.0 - b_n * b_n)
                    b_d0 = b_dn * b_hn * b_r * (1.0 - b_r)
                    b_d1 = b_dh * (b_h_prev - b_n) * b_z * (1.0 - b_z)
                    b_d2 = b_dn
                    b_dh2 = b_dn * b_r
                    b_dh_direct = b_dh * b_z
                elif CELL == RNN_TANH:
                    b_h = tl.load(p_out, mask=mask_a, other=0.0).to(tl.float32)
                    b_d0 = b_dh * (1.0 - b_h * b_h)
                else:
                    b_h = tl.load(p_out, mask=mask_a, other=0.0).to(tl.float32)
                    b_d0 = tl.where(b_h > 0, b_dh, 0.0)
                # What reaches h_prev other than through W_hh (the product adds that after the barrier).
                tl.store(state_ptr + p_state, b_dh_direct, mask=mask_a)

                p_dg = dgates_ptr + row[:, None] * GH + offs_j[None, :]  # [BB, BH]
                p_gb = gbuf_ptr + ((d * 2 + parity) * B + offs_b[:, None]) * GH + offs_j[None, :]
                gb_ty = gbuf_ptr.dtype.element_ty
                # An inactive row's entries are left as they were: they enter only that row's (masked)
                # products.
                tl.store(p_dg, b_d0, mask=mask_a)
                tl.store(p_gb, b_d0.to(gb_ty), mask=mask_a)
                if G > 1:
                    tl.store(p_dg + H, b_d1, mask=mask_a)
                    tl.store(p_gb + H, b_d1.to(gb_ty), mask=mask_a)
                    tl.store(p_dg + 2 * H, b_d2, mask=mask_a)
                    tl.store(p_gb + 2 * H, b_dh2.to(gb_ty), mask=mask_a)
                if G > 3:
                    tl.store(p_dg + 3 * H, b_d3, mask=mask_a)
                    tl.store(p_gb + 3 * H, b_d3.to(gb_ty), mask=mask_a)
        _group_barrier(p_counter, (i + 1) * n_hblocks, SYNC)

        # dh_prev[:, jslice] += sum over gates g of dgates_hh[:, g*H:(g+1)*H] @ W_hh[g*H:(g+1)*H, jslice]
        for bb in range(pid_b, n_bblocks, n_bprog):
            offs_b, mask_b, b_len = _batch_block(lengths_ptr, bb, B, BB)
            if s < tl.max(b_len, axis=0):
                mask_a = (s < b_len)[:, None] & mask_j[None, :]  # [BB, BH]
                p_state = (d * B + offs_b[:, None]) * H + offs_j[None, :]  # [BB, BH]
                b_acc = tl.zeros([BB, BH], dtype=tl.float32)
                p_gbuf = gbuf_ptr + ((d * 2 + parity) * B + offs_b[:, None]) * GH  # [BB, 1]
                if RESIDENT:
                    b_gk = _exchanged_tile(p_gbuf, 0, mask_b, H, NK, BK)
                    b_acc = _split_k_dot(b_gk, b_w0, b_acc, NK, DOT_PRECISION)
                    if G > 1:
                        b_gk = _exchanged_tile(p_gbuf + H, 0, mask_b, H, NK, BK)
                        b_acc = _split_k_dot(b_gk, b_w1, b_acc, NK, DOT_PRECISION)
                        b_gk = _exchanged_tile(p_gbuf + 2 * H, 0, mask_b, H, NK, BK)
                        b_acc = _split_k_dot(b_gk, b_w2, b_acc, NK, DOT_PRECISION)
                    if G > 3:
                        b_gk = _exchanged_tile(p_gbuf + 3 * H, 0, mask_b, H, NK, BK)
                        b_acc = _split_k_dot(b_gk, b_w3, b_acc, NK, DOT_PRECISION)
                else:
                    # Streamed: K runs over all G*H rows of W_hh at once, one chunk at a time.
                    for k0 in range(0, GH, NK * BK):
                        b_gk = _exchanged_tile(p_gbuf, k0, mask_b, GH, NK, BK)
                        b_w = _weight_tile(p_w, k0, offs_j, mask_j, GH, H, 1, NK, BK)
                        b_acc = _split_k_dot(b_gk, b_w, b_acc, NK, DOT_PRECISION)
                b_dh_state = tl.load(state_ptr + p_state, mask=mask_a, other=0.0) + b_acc
                tl.store(state_ptr + p_state, b_dh_state, mask=mask_a)
                if s == 0:  # every row's first step
                    tl.store(grad_h0_ptr + p_state, b_dh_state.to(grad_h0_ptr.dtype.element_ty), mask=mask_a)
        # The next step's gate gradients read the state this one wrote.
        tl.debug_barrier()


@triton.jit
def barrier_floor_kernel(counter_ptr, steps, SYNC: tl.constexpr):
    """The floor of the kernels' steps: the grid meets at its barriers, steps times, and does nothing
    else (benchmarks/gpu_bench.py times it against the forward)."""
    p_counter = counter_ptr + tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    for s in range(0, steps):
        _group_barrier(p_counter, (s + 1) * tl.num_programs(0), SYNC)


def barrier_floor(cell, input, H):
    """barrier_floor_kernel on the grid the forward takes for input (T, B, I) with equal lengths: as
    many barriers as its steps, T. Like the forward, it allocates its counters and launches from Python,
    so timings include that overhead. Returns the counters."""
    config = _config(cell, input, H, backward=False)
    counter = torch.zeros(2, config.n_bprog, dtype=torch.int32, device=input.device)
    tiling = _tiling(config)
    barrier_floor_kernel[(config.n_hblocks, config.n_bprog, 2)](
        counter, input.shape[0], SYNC=tiling["SYNC"], launch_cooperative_grid=tiling["launch_cooperative_grid"],
        num_warps=NUM_WARPS)
    return counter


def _interpreted(device):
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


Config = collections.namedtuple("Config", "BB BH NK BK RESIDENT n_hblocks n_bprog")


def split_k(H, resident):
    """(NK, BK) of the per-step products. Resident: all of H in one pass, in chunks of BK, one per warp
    (NK = 8), or of 64 at most (NK = 16 at K = 1024). Streamed: 2-D chunks (NK = 1) of STREAM_BK per
    pass."""
    if not resident:
        return STREAM_NK, STREAM_BK
    k = max(16, triton.next_power_of_2(H))
    BK = max(16, min(RESIDENT_MAX_BK, k // NUM_WARPS))
    return k // BK, BK


def resident_max_k(cell, dtype, dot_precision, backward):
    """The largest padded H whose resident kernel runs its time loop without register spills (compile
    tests, sm_80 and sm_90): the LSTM and GRU backward hold the most live state, fp32 without TF32 takes
    the most registers (FMA-unit operands). Checked with Triton 3.9 and 3.6 (the GPU image's), which
    stands for every version before 3.9."""
    old_triton = TRITON_VERSION < (3, 9)
    if dtype == torch.float32 and dot_precision == "ieee":
        return 512 if cell.startswith("RNN") else 128 if old_triton else 256
    if backward and (cell == "GRU" or cell == "LSTM" and old_triton):
        return 512
    return 1024


def resident_fits(cell, H, dtype, dot_precision, shared_bytes, backward):
    """Whether a program's W_hh slice and one (BB, K) operand of a step fit shared_bytes, with its time
    loop spill-free (resident_max_k)."""
    BB, BH = RESIDENT_TILE
    k = max(16, triton.next_power_of_2(H))
    element_size = torch.finfo(dtype).bits // 8
    return (k <= resident_max_k(cell, dtype, dot_precision, backward)
            and (GATES[cell] * BH + BB) * k * element_size + RESIDENT_SHARED_SLACK <= shared_bytes)


def select_config(cell, B, H, dtype, dot_precision, num_sms, shared_bytes, backward=False):
    """Tile, K split and grid of the forward (or backward) kernel for B rows and H units: a ``Config``.

    The grid, 2 * n_hblocks * n_bprog programs, never exceeds num_sms, since the grid barrier needs
    every program of a group resident at once; a program runs ``rounds`` = ceil(n_bblocks / n_bprog)
    batch blocks per step. Candidates: the streamed tiles, and the resident one where
    ``resident_fits``. W_hh resident wherever it fits (each round then reads it from shared memory
    instead of L2), then the fewest rounds, then least work per round.
    """
    candidates = [(tile, False) for tile in STREAM_TILES]
    if resident_fits(cell, H, dtype, dot_precision, shared_bytes, backward):
        candidates.append((RESIDENT_TILE, True))
    best = None
    for (BB, BH), resident in candidates:
        n_hblocks = triton.cdiv(H, BH)
        n_bblocks = triton.cdiv(B, BB)
        n_bprog = min(n_bblocks, num_sms // (2 * n_hblocks))
        if n_bprog == 0:
            continue
        key = (not resident, triton.cdiv(n_bblocks, n_bprog), BB * BH, BB)
        if best is None or key < best[0]:
            NK, BK = split_k(H, resident)
            best = key, Config(BB, BH, NK, BK, resident, n_hblocks, n_bprog)
    if best is None:
        widest = max(BH for _, BH in STREAM_TILES)
        raise ValueError(f"hidden size {H} needs {2 * triton.cdiv(H, widest)} co-resident programs, "
                         f"more than the {num_sms} SMs of this GPU")
    return best[1]


def _config(cell, input, H, backward):
    B = input.shape[1]
    if _interpreted(input.device):
        # Interpreted programs run one after another: a barrier waiting on another program of the
        # group would never return, so one program holds every unit of a direction.
        BB, BH = 16, max(16, triton.next_power_of_2(H))
        NK, BK = split_k(H, True)
        return Config(BB, BH, NK, BK, True, 1, triton.cdiv(B, BB))
    properties = torch.cuda.get_device_properties(input.device)
    return select_config(cell, B, H, input.dtype, _dot_precision(input.dtype, input.device),
                         properties.multi_processor_count,
                         getattr(properties, "shared_memory_per_block_optin", 48 * 1024), backward)


def _tiling(config):
    """The launch arguments both kernels take from a Config."""
    return dict(BB=config.BB, BH=config.BH, NK=config.NK, BK=config.BK, RESIDENT=config.RESIDENT,
                SYNC=config.n_hblocks > 1, launch_cooperative_grid=config.n_hblocks > 1, num_warps=NUM_WARPS,
                num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS)


def _dot_precision(dtype, device):
    if dtype == torch.float32 and not _interpreted(device) and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _workspace_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check(cell, input, weight_ih, weight_hh, h0, c0, lengths):
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; expected one of {sorted(CELLS)}")
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16 input, got {input.dtype}")
    if input.dim() != 3:
        raise ValueError(f"Expected input of 3 dimensions (T, B, I), got {list(input.shape)}")
    T, B, I = input.shape
    G = GATES[cell]
    H = weight_hh.shape[-1]
    expected = {"weight_ih": (weight_ih, (2, G * H, I)), "weight_hh": (weight_hh, (2, G * H, H)),
                "h0": (h0, (2, B, H)), "c0": (c0, (2, B, H) if cell == "LSTM" else (0,)),
                "lengths": (lengths, (B,))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"Expected {name} size {shape}, got {list(tensor.shape)}")
    for name in ("weight_ih", "weight_hh"):
        if expected[name][0].dtype != input.dtype:
            raise TypeError(f"Expected {name} of dtype {input.dtype}, got {expected[name][0].dtype}")
    if lengths.dtype != torch.int64 or lengths.device != input.device:
        raise TypeError(f"Expected lengths int64 on {input.device}, got {lengths.dtype} on {lengths.device}")
    return T, B, I, G, H


def forward(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, save_workspace=True):
    """One bidirectional layer; arguments and results as ``birnn_fast::forward`` (see ops.py).

    input: (T, B, I); weight_ih: (2, G*H, I); weight_hh: (2, G*H, H); bias_*: (2, G*H);
    h0, c0: (2, B, H) (c0 (0,) unless LSTM); lengths: (B,) int64.
    Returns output (T, B, 2*H), h_n (2, B, H), c_n (2, B, H) or (0,), workspace (T, B, 2, W*H),
    or (0,) without save_workspace.
    """
    T, B, I, G, H = _check(cell, input, weight_ih, weight_hh, h0, c0, lengths)
    GH = G * H
    input, weight_ih, weight_hh, h0, c0 = (x.contiguous() for x in (input, weight_ih, weight_hh, h0, c0))
    bias_hh = bias_hh.contiguous()
    bias = bias_ih + bias_hh
    if cell == "GRU":
        bias[:, 2 * H:] = bias_ih[:, 2 * H:]
    xg = torch.addmm(bias.reshape(1, 2 * GH).to(input.dtype), input.view(T * B, I),
                     weight_ih.view(2 * GH, I).t())  # [T*B, 2*G*H]

    config = _config(cell, input, H, backward=False)
    output = input.new_zeros(T, B, 2 * H)
    h_n = torch.empty_like(h0)
    c_n = torch.empty_like(c0)
    workspace_shape = (T, B, 2, WORKSPACE[cell] * H) if save_workspace else (0,)
    workspace = input.new_empty(workspace_shape, dtype=_workspace_dtype(input.dtype))
    hbuf = input.new_empty(2, 2, B, H, dtype=weight_hh.dtype if input.dtype != torch.float32 else torch.float32)
    hbuf[:, 0].copy_(h0)
    state = input.new_empty((2, B, H) if cell in ("LSTM", "GRU") else (0,), dtype=torch.float32)  # RNN: none
    counter = torch.zeros(2, config.n_bprog, dtype=torch.int32, device=input.device)
    grid = (config.n_hblocks, config.n_bprog, 2)
    birnn_forward_kernel[grid](
        xg, weight_hh, bias_hh, h0, c0 if cell == "LSTM" else h0, lengths,
        output, h_n, c_n if cell == "LSTM" else h_n, workspace, hbuf, state, counter,
        T, B, H,
        CELL=CELLS[cell], G=G, W=WORKSPACE[cell], DOT_PRECISION=_dot_precision(input.dtype, input.device),
        SAVE=save_workspace, **_tiling(config),
    )
    return output, h_n, c_n, workspace


def _previous_hidden(output, h0, lengths):
    """(2, T, B, H): the h each (direction, time, row) step started from; h0 at a row's first step."""
    T, B, H2 = output.shape
    H = H2 // 2
    forward_prev = torch.cat([h0[0, None].to(output.dtype), output[:-1, :, :H]])
    reverse_prev = torch.cat([output[1:, :, H:], output.new_zeros(1, B, H)])
    first = torch.arange(T, device=output.device)[:, None, None] == (lengths - 1)[None, :, None]  # [T, B, 1]
    reverse_prev = torch.where(first, h0[1, None].to(output.dtype), reverse_prev)
    return torch.stack([forward_prev, reverse_prev])


def backward(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, bias_hh, h0, c0, lengths,
             output, workspace):
    """Vector-Jacobian product of ``forward``; arguments and results as ``birnn_fast::backward``.

    Returns grad_input (T, B, I), grad_weight_ih (2, G*H, I), grad_weight_hh (2, G*H, H),
    grad_bias_ih, grad_bias_hh (2, G*H), grad_h0 (2, B, H), grad_c0 (2, B, H) or (0,).
    """
    T, B, I, G, H = _check(cell, input, weight_ih, weight_hh, h0, c0, lengths)
    GH = G * H
    if tuple(grad_output.shape) != (T, B, 2 * H):
        raise ValueError(f"Expected grad_output size {(T, B, 2 * H)}, got {list(grad_output.shape)}")
    input, weight_ih, weight_hh, h0, c0, output, workspace, grad_output, grad_h_n, grad_c_n = (
        x.contiguous() for x in (input, weight_ih, weight_hh, h0, c0, output, workspace, grad_output,
                                 grad_h_n, grad_c_n))
    lstm = cell == "LSTM"

    config = _config(cell, input, H, backward=True)
    dgates = torch.zeros(T, B, 2, GH, dtype=torch.float32, device=input.device)
    gbuf = input.new_empty(2, 2, B, GH, dtype=weight_hh.dtype if input.dtype != torch.float32 else torch.float32)
    state = input.new_empty(2 if lstm else 1, 2, B, H, dtype=torch.float32)
    counter = torch.zeros(2, config.n_bprog, dtype=torch.int32, device=input.device)
    grad_h0 = torch.empty_like(h0)
    grad_c0 = torch.empty_like(c0)
    grid = (config.n_hblocks, config.n_bprog, 2)
    birnn_backward_kernel[grid](
        grad_output, grad_h_n, grad_c_n if lstm else grad_h_n, weight_hh, h0, c0 if lstm else h0, lengths,
        output, workspace, dgates, gbuf, state, counter, grad_h0, grad_c0 if lstm else grad_h0,
        T, B, H,
        CELL=CELLS[cell], G=G, W=WORKSPACE[cell], DOT_PRECISION=_dot_precision(input.dtype, input.device),
        **_tiling(config),
    )

    # Weight gradients as GEMMs over all T*B steps at once, in the input's precision (as cuDNN).
    dtype = input.dtype
    dgates_hh = dgates
    if cell == "GRU":
        # The hidden projection of n enters scaled by r.
        # The workspace is unwritten at padded steps, hence the mask.
        valid = (torch.arange(T, device=input.device)[:, None] < lengths[None, :])[..., None, None]  # [T, B, 1, 1]
        dgates_hh = dgates.clone()
        dgates_hh[..., 2 * H:] = torch.where(valid, dgates[..., 2 * H:] * workspace[..., :H], 0.0)
    flat = dgates.view(T * B, 2, GH)
    flat_hh = dgates_hh.view(T * B, 2, GH)
    grad_input = (flat.view(T * B, 2 * GH).to(dtype) @ weight_ih.view(2 * GH, I)).view(T, B, I)
    grad_weight_ih = flat.permute(1, 2, 0).to(dtype) @ input.view(T * B, I)  # [2, GH, I]
    h_prev = _previous_hidden(output, h0, lengths).view(2, T * B, H)
    grad_weight_hh = flat_hh.permute(1, 2, 0).to(dtype) @ h_prev.to(dtype)  # [2, GH, H]
    grad_bias_ih = flat.sum(0).to(bias_hh.dtype)
    grad_bias_hh = flat_hh.sum(0).to(bias_hh.dtype)
    return grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0, grad_c0


def forward_op(cell, input, weights, h0, c0, lengths, save_workspace):
    """``birnn_fast::forward`` (per-direction ``weights``, see ops.py) on ``forward``'s stacked layout."""
    return forward(cell, input, *_stack(weights), h0, c0, lengths, save_workspace)


def backward_op(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace):
    """``birnn_fast::backward`` on ``backward``'s stacked layout; gradients per direction, as ``weights``."""
    weight_ih, weight_hh, _, bias_hh = _stack(weights)
    grad_input, *grad_stacked, grad_h0, grad_c0 = backward(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                                           weight_hh, bias_hh, h0, c0, lengths, output, workspace)
    return grad_input, [grad[d] for d in range(2) for grad in grad_stacked], grad_h0, grad_c0


def _stack(weights):
    """8 parameters, nn.LSTM's order (weight_ih, weight_hh, bias_ih, bias_hh per direction) -> each kind (2, ...)."""
    return [torch.stack(weights[kind::4]) for kind in range(4)]


__all__ = ["forward", "backward", "forward_op", "backward_op", "birnn_forward_kernel", "birnn_backward_kernel",
           "barrier_floor", "barrier_floor_kernel", "select_config", "split_k", "resident_fits",
           "resident_max_k", "Config", "STREAM_TILES", "RESIDENT_TILE", "STREAM_NK", "STREAM_BK",
           "NUM_WARPS", "NUM_STAGES", "MAX_REGISTERS"]
