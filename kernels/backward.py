"""The backward kernel of one bidirectional layer (BPTT, the vector-Jacobian product of forward.py)
and its launcher.

Same grid, rounds and barrier as the forward, in reverse time. Per step each program computes its
slice of the gate gradients for each of its blocks and publishes the hidden-projection version to a
double-buffered exchange buffer; it arrives at the barrier, loads the next step's first round's
inputs (grad_out and the forward's results, which nothing in the launch writes) and stores its other
results while the group arrives, then waits; after the barrier, for each block, dh_prev[:, jslice] +=
gbuf(BB, G*H) @ W_hh[:, jslice]. dh and dc live in an fp32 state buffer between the two halves and
between steps; rows not yet started carry them unchanged, so grad_h_n / grad_c_n enter at each row's
own last step, and grad_h0 / grad_c0 are stored at its first. The launcher then computes grad_input,
grad_W_ih, grad_W_hh and the bias gradients as GEMMs and reductions over all steps at once.

TAGGED (VARIANTS' tagged_exchange, off by default) replaces the barrier as the forward's does: each
word of the gate-gradient exchange carries the step that wrote it, and a program's products poll the
words they need (common.tagged_settle) instead of waiting for the whole group; the grid must still be
co-resident.
"""
import torch
import triton
import triton.language as tl

from birnn_fast.cells import CELLS as _CELL_TABLE

from . import config as _config
from .common import (PAD_TAG, barrier_arrive, barrier_wait, batch_block, batch_rows, copy_slices, exchange_issue,
                     exchange_settle, group_counter, group_steps, resident_weights, split_k_dot, tag_of, tagged_words,
                     tf32_rounded, weight_tile, zero_padded_steps)
from . import forward as forward_module
from .forward import check_inputs
from .launch import barrier_counters, launch, compute_cache_keys
from .pointwise import elman_backward, gru_backward, lstm_backward

LSTM = tl.constexpr(_CELL_TABLE["LSTM"].index)
GRU = tl.constexpr(_CELL_TABLE["GRU"].index)
RNN_RELU = tl.constexpr(_CELL_TABLE["RNN_RELU"].index)
# The largest K at which the TAGGED resident products read a gate's words before the previous gate's
# poll and product (two tiles live): at K = 1024 they spill with Triton 3.6 (sm_90), not with 3.9.
EARLY_READ_MAX_K = tl.constexpr(1024 if _config.TRITON_VERSION >= (3, 9) else 512)


@triton.jit
def _round_inputs(grad_out_ptr, out_ptr, ws_ptr, h0_ptr, c0_ptr, s, bb, b_len, d, B, H, offs_j, mask_j,
                  CELL: tl.constexpr, W: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """What the gate gradients of step s on batch block bb (its rows' lengths b_len) read that nothing
    in this launch writes, so that no barrier orders them: grad_out (in its dtype) and the forward's
    results, [BB, BH] each. LSTM: i, f, g, o, c and the previous c (c0 at a row's first step), fp32;
    GRU: r, z, n, hn (fp32) and the previous h (h0 at the first step, in h's dtype); RNN: h. Zeros
    for what a cell lacks."""
    offs_b, _ = batch_rows(bb, B, BB)
    t = tl.where(d == 0, s, b_len - 1 - s)  # [BB] int64
    mask_a = ((t >= 0) & (t < b_len))[:, None] & mask_j[None, :]  # [BB, BH]: 0 <= s < b_len (s = -1 at the end)
    # The time index of the row's previous step (its h and c are this step's inputs).
    t_prev = tl.where(d == 0, t - 1, t + 1)  # [BB]
    has_prev = (t_prev >= 0) & (t_prev < b_len)  # [BB], i.e. s > 0
    mask_prev = mask_a & has_prev[:, None]
    mask_first = mask_a & (~has_prev)[:, None]
    p_state = (d * B + offs_b[:, None]) * H + offs_j[None, :]  # [BB, BH]
    p_ws = ws_ptr + ((t * B + offs_b) * 2 + d)[:, None] * (W * H) + offs_j[None, :]  # [BB, BH]
    p_out = out_ptr + (t[:, None] * B + offs_b[:, None]) * (2 * H) + d * H + offs_j[None, :]
    b_go = tl.load(grad_out_ptr + (t[:, None] * B + offs_b[:, None]) * (2 * H) + d * H + offs_j[None, :],
                   mask=mask_a, other=0.0)
    b_v0 = tl.zeros([BB, BH], dtype=tl.float32)
    b_v1 = b_v0
    b_v2 = b_v0
    b_v3 = b_v0
    b_v4 = b_v0
    b_v5 = b_v0
    if CELL == LSTM:
        b_v0 = tl.load(p_ws, mask=mask_a, other=0.0)
        b_v1 = tl.load(p_ws + H, mask=mask_a, other=0.0)
        b_v2 = tl.load(p_ws + 2 * H, mask=mask_a, other=0.0)
        b_v3 = tl.load(p_ws + 3 * H, mask=mask_a, other=0.0)
        b_v4 = tl.load(p_ws + 4 * H, mask=mask_a, other=0.0)
        p_ws_prev = ws_ptr + ((t_prev * B + offs_b) * 2 + d)[:, None] * (W * H) + 4 * H + offs_j[None, :]
        b_v5 = (tl.load(p_ws_prev, mask=mask_prev, other=0.0)
                + tl.load(c0_ptr + p_state, mask=mask_first, other=0.0).to(tl.float32))
    elif CELL == GRU:
        b_v0 = tl.load(p_ws, mask=mask_a, other=0.0)
        b_v1 = tl.load(p_ws + H, mask=mask_a, other=0.0)
        b_v2 = tl.load(p_ws + 2 * H, mask=mask_a, other=0.0)
        b_v3 = tl.load(p_ws + 3 * H, mask=mask_a, other=0.0)
        p_out_prev = out_ptr + (t_prev[:, None] * B + offs_b[:, None]) * (2 * H) + d * H + offs_j[None, :]
        b_v4 = (tl.load(p_out_prev, mask=mask_prev, other=0.0).to(tl.float32)
                + tl.load(h0_ptr + p_state, mask=mask_first, other=0.0).to(tl.float32))
    else:
        b_v0 = tl.load(p_out, mask=mask_a, other=0.0).to(tl.float32)
    return b_go, b_v0, b_v1, b_v2, b_v3, b_v4, b_v5


@triton.jit
def _exchange_store(p_gb, value, tag, mask_a, mask_b, mask_j, DOT_PRECISION: tl.constexpr,
                    VALUE_TY: tl.constexpr, TAGGED: tl.constexpr):
    """One gate's [BB, BH] gradient into the exchange at p_gb, as the products read it (rounded, in
    VALUE_TY): the active rows' entries (an inactive row's enter only that row's masked products), or
    TAGGED every row of the block, as words tagged with tag (the readers poll them all)."""
    b_dot = tf32_rounded(value, DOT_PRECISION).to(VALUE_TY)
    if TAGGED:
        tl.store(p_gb, tagged_words(b_dot, tag, p_gb.dtype.element_ty), mask=mask_b[:, None] & mask_j[None, :])
    else:
        tl.store(p_gb, b_dot, mask=mask_a)


@triton.jit
def _exchange_read(p_rows, p_tagged_rows, k0, mask_b, K, tag, failed, p_status, max_polls, VALUE_TY: tl.constexpr,
                   TAGGED: tl.constexpr, NK: tl.constexpr, BK: tl.constexpr, PADDED: tl.constexpr = False):
    """(the exchanged K chunk at k0 of rows p_rows, K columns, failed): common.exchange_issue and
    exchange_settle at once."""
    tile = exchange_issue(p_rows, p_tagged_rows, k0, mask_b, K, tag, TAGGED, NK, BK, PADDED)
    return exchange_settle(tile, p_tagged_rows, k0, K, tag, failed, p_status, max_polls, VALUE_TY, TAGGED, NK, BK,
                           PADDED)


@triton.jit(do_not_specialize=["T", "B", "max_polls"])
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
    dgates_ptr,    # (T, B, 2, G*H) fp32: gradient of the input projection
    gbuf_ptr,      # (2, 2, B, G*H) in the matmul dtype: gradient of the hidden projection, [direction,
                   # step parity] (TAGGED: int64 words of fp32, int32 of fp16 / bf16, common.tagged_words;
                   # TAGGED and RESIDENT: (2, 2, B, G*NK*BK), each gate's H words padded, tagged_gate_buffer)
    state_ptr,     # (1 or 2, 2, B, H) fp32: gradients reaching h, and c (LSTM), of each direction and row
    counter_ptr,   # ((2 * programs along batch + 1) * COUNTER_STRIDE,) int32 zeros: barrier counters, status
    grad_h0_ptr,   # (2, B, H)
    grad_c0_ptr,   # (2, B, H) for LSTM
    T, B, H, max_polls,
    CELL: tl.constexpr, G: tl.constexpr, W: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, NK: tl.constexpr, BK: tl.constexpr, RESIDENT: tl.constexpr,
    SYNC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOUBLE_BUFFER: tl.constexpr,
    TAGGED: tl.constexpr = False,  # VARIANTS (launcher)
):
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    d = tl.program_id(2).to(tl.int64)
    n_bprog = tl.num_programs(1)
    n_hblocks = tl.num_programs(0)
    n_bblocks = tl.cdiv(B, BB)
    GH = G * H
    p_counter, p_status = group_counter(counter_ptr)
    failed = tl.zeros([], tl.int32)
    # The products' operand type (W_hh's), in which the gate gradients are exchanged.
    VALUE_TY: tl.constexpr = w_hh_ptr.dtype.element_ty
    # TAGGED: the exchanged words carry their step and the products poll them, no group barrier; the
    # CTA barriers of barrier_wait and the step's end stay (they order this program's state stores
    # before its own later loads of them, by other threads).
    BARRIER: tl.constexpr = SYNC and not TAGGED
    # TAGGED and RESIDENT: each gate's row of the exchange padded to the product's K span (NK*BK) with
    # words the polls take as ready (tagged_gate_buffer), read unclamped (common._tagged_read). GX: a
    # row's words, XG: a gate's.
    PADDED: tl.constexpr = TAGGED and RESIDENT
    if PADDED:
        XG = NK * BK
    else:
        XG = H
    GX = G * XG

    offs_j = pid_h * BH + tl.arange(0, BH)  # [BH]
    mask_j = offs_j < H
    # Gradients reaching h and c after step s; a row's final state is where grad_h_n enters.
    p_dc = state_ptr + 2 * B * H
    copy_slices(grad_h_n_ptr, state_ptr, B, H, BB, BH)
    if CELL == LSTM:
        copy_slices(grad_c_n_ptr, p_dc, B, H, BB, BH)
    tl.debug_barrier()
    steps = group_steps(lengths_ptr, B, BB)
    p_w = w_hh_ptr + d * GH * H
    if RESIDENT:
        # Gate g's rows of W_hh, the program's columns j: W_hh[g*H + k, j], kept in shared memory.
        b_w0, b_w1, b_w2, b_w3 = resident_weights(p_w, offs_j, mask_j, H, H, 1, G, NK, BK)
    # The barrier is split as the forward's: a program arrives right after its last exchange store of
    # the step's gate gradients, then loads the next step's first round's inputs that nothing in this
    # launch writes (grad_out, the forward's results), stores its program-local results, and only
    # then waits: those loads and stores overlap the wait.
    _, _, b_len_first = batch_block(lengths_ptr, pid_b, B, BB)  # the first round's: the same every step
    b_go, b_v0, b_v1, b_v2, b_v3, b_v4, b_v5 = _round_inputs(
        grad_out_ptr, out_ptr, ws_ptr, h0_ptr, c0_ptr, steps - 1, pid_b, b_len_first, d, B, H, offs_j, mask_j,
        CELL, W, BB, BH)
    arrived = tl.zeros([], tl.int32)
    for i in range(0, steps):
        s = steps - 1 - i
        parity = s % 2
        b_go_next, b_v0_next, b_v1_next, b_v2_next, b_v3_next, b_v4_next, b_v5_next = (
            b_go, b_v0, b_v1, b_v2, b_v3, b_v4, b_v5)  # set by the last round
        # The gate gradients of every batch block of the program; the group exchanges them at the barrier.
        for bb in range(pid_b, n_bblocks, n_bprog):
            b_len = b_len_first
            if bb != pid_b:
                _, _, b_len = batch_block(lengths_ptr, bb, B, BB)
                b_go, b_v0, b_v1, b_v2, b_v3, b_v4, b_v5 = _round_inputs(
                    grad_out_ptr, out_ptr, ws_ptr, h0_ptr, c0_ptr, s, bb, b_len, d, B, H, offs_j, mask_j, CELL, W,
                    BB, BH)
            offs_b, mask_b = batch_rows(bb, B, BB)
            p_state = (d * B + offs_b[:, None]) * H + offs_j[None, :]  # [BB, BH]
            active = s < b_len  # [BB]
            mask_a = active[:, None] & mask_j[None, :]  # [BB, BH]
            t = tl.where(d == 0, s, b_len - 1 - s)  # [BB] int64
            # A block none of whose rows has reached step s yet has nothing to do.
            live = s < tl.max(b_len, axis=0)
            b_d0 = tl.zeros([BB, BH], dtype=tl.float32)
            b_d1 = tl.zeros([BB, BH], dtype=tl.float32)
            b_d2 = tl.zeros([BB, BH], dtype=tl.float32)
            b_d3 = tl.zeros([BB, BH], dtype=tl.float32)
            b_dh_direct = tl.zeros([BB, BH], dtype=tl.float32)  # what reaches h_prev other than through W_hh
            b_dc_prev = tl.zeros([BB, BH], dtype=tl.float32)
            if live:
                b_dh = tl.load(state_ptr + p_state, mask=mask_a, other=0.0) + b_go.to(tl.float32)  # [BB, BH]
                b_dh2 = tl.zeros([BB, BH], dtype=tl.float32)  # hidden-projection gradient of GRU's n gate
                if CELL == LSTM:
                    b_dc = tl.load(p_dc + p_state, mask=mask_a, other=0.0)
                    b_d0, b_d1, b_d2, b_d3, b_dc_prev = lstm_backward(b_dh, b_dc, b_v0, b_v1, b_v2, b_v3, b_v4,
                                                                      b_v5)
                    b_dh2 = b_d2
                elif CELL == GRU:
                    b_d0, b_d1, b_d2, b_dh2, b_dh_direct = gru_backward(b_dh, b_v0, b_v1, b_v2, b_v3, b_v4)
                else:
                    b_d0 = elman_backward(b_dh, b_v0, CELL == RNN_RELU)
                p_gb = gbuf_ptr + ((d * 2 + parity) * B + offs_b[:, None]) * GX + offs_j[None, :]
                tag = tag_of(s)
                _exchange_store(p_gb, b_d0, tag, mask_a, mask_b, mask_j, DOT_PRECISION, VALUE_TY, TAGGED)
                if G > 1:
                    _exchange_store(p_gb + XG, b_d1, tag, mask_a, mask_b, mask_j, DOT_PRECISION, VALUE_TY, TAGGED)
                    _exchange_store(p_gb + 2 * XG, b_dh2, tag, mask_a, mask_b, mask_j, DOT_PRECISION, VALUE_TY, TAGGED)
                if G > 3:
                    _exchange_store(p_gb + 3 * XG, b_d3, tag, mask_a, mask_b, mask_j, DOT_PRECISION, VALUE_TY, TAGGED)
            if bb + n_bprog >= n_bblocks:  # the step's last round
                if not TAGGED:
                    arrived = barrier_arrive(p_counter, SYNC)
                b_go_next, b_v0_next, b_v1_next, b_v2_next, b_v3_next, b_v4_next, b_v5_next = _round_inputs(
                    grad_out_ptr, out_ptr, ws_ptr, h0_ptr, c0_ptr, s - 1, pid_b, b_len_first, d, B, H, offs_j,
                    mask_j, CELL, W, BB, BH)
            if live:
                if CELL == LSTM:
                    tl.store(p_dc + p_state, b_dc_prev, mask=mask_a)
                    if s == 0:  # every row's first step
                        tl.store(grad_c0_ptr + p_state, b_dc_prev.to(grad_c0_ptr.dtype.element_ty), mask=mask_a)
                # The product adds what reaches h_prev through W_hh after the barrier.
                tl.store(state_ptr + p_state, b_dh_direct, mask=mask_a)
                p_dg = dgates_ptr + ((t * B + offs_b) * 2 + d)[:, None] * GH + offs_j[None, :]  # [BB, BH]
                tl.store(p_dg, b_d0, mask=mask_a)
                if G > 1:
                    tl.store(p_dg + H, b_d1, mask=mask_a)
                    tl.store(p_dg + 2 * H, b_d2, mask=mask_a)
                if G > 3:
                    tl.store(p_dg + 3 * H, b_d3, mask=mask_a)
        b_go, b_v0, b_v1, b_v2, b_v3, b_v4, b_v5 = (
            b_go_next, b_v0_next, b_v1_next, b_v2_next, b_v3_next, b_v4_next, b_v5_next)
        failed = barrier_wait(p_counter, p_status, arrived, (i + 1) * n_hblocks, failed, max_polls, BARRIER)

        # dh_prev[:, jslice] += sum over gates g of dgates_hh[:, g*H:(g+1)*H] @ W_hh[g*H:(g+1)*H, jslice]
        for bb in range(pid_b, n_bblocks, n_bprog):
            offs_b, mask_b = batch_rows(bb, B, BB)
            b_len = b_len_first
            if bb != pid_b:
                _, _, b_len = batch_block(lengths_ptr, bb, B, BB)
            if s < tl.max(b_len, axis=0):
                mask_a = (s < b_len)[:, None] & mask_j[None, :]  # [BB, BH]
                p_state = (d * B + offs_b[:, None]) * H + offs_j[None, :]  # [BB, BH]
                b_acc = tl.zeros([BB, BH], dtype=tl.float32)
                p_gbuf = gbuf_ptr + ((d * 2 + parity) * B + offs_b[:, None]) * GX  # [BB, 1]
                tag = tag_of(s)
                # TAGGED: rows past B read row B - 1 (its block's writers write it whenever they write
                # the block's rows); their products are dropped as in the default build.
                p_tagged = gbuf_ptr + ((d * 2 + parity) * B + tl.minimum(offs_b, B - 1)[:, None]) * GX  # [BB, 1]
                if RESIDENT and TAGGED and NK * BK <= EARLY_READ_MAX_K:
                    # Each gate's words are read before the previous gate's poll and product, so that
                    # their round trip overlaps them (a poll's loop keeps the compiler from hoisting the
                    # read). Past EARLY_READ_MAX_K, one gate at a time.
                    b_next = exchange_issue(p_gbuf, p_tagged, 0, mask_b, H, tag, TAGGED, NK, BK, PADDED)
                    b_gk = b_next
                    if G > 1:
                        b_next = exchange_issue(p_gbuf + XG, p_tagged + XG, 0, mask_b, H, tag, TAGGED, NK, BK, PADDED)
                    b_gk, failed = exchange_settle(b_gk, p_tagged, 0, H, tag, failed, p_status, max_polls, VALUE_TY,
                                                   TAGGED, NK, BK, PADDED)
                    b_acc = split_k_dot(b_gk, b_w0, b_acc, NK, DOT_PRECISION)
                    if G > 1:
                        b_gk = b_next
                        b_next = exchange_issue(p_gbuf + 2 * XG, p_tagged + 2 * XG, 0, mask_b, H, tag, TAGGED, NK, BK,
                                                PADDED)
                        b_gk, failed = exchange_settle(b_gk, p_tagged + XG, 0, H, tag, failed, p_status, max_polls,
                                                       VALUE_TY, TAGGED, NK, BK, PADDED)
                        b_acc = split_k_dot(b_gk, b_w1, b_acc, NK, DOT_PRECISION)
                        b_gk = b_next
                        if G > 3:
                            b_next = exchange_issue(p_gbuf + 3 * XG, p_tagged + 3 * XG, 0, mask_b, H, tag, TAGGED, NK,
                                                    BK, PADDED)
                        b_gk, failed = exchange_settle(b_gk, p_tagged + 2 * XG, 0, H, tag, failed, p_status,
                                                       max_polls, VALUE_TY, TAGGED, NK, BK, PADDED)
                        b_acc = split_k_dot(b_gk, b_w2, b_acc, NK, DOT_PRECISION)
                    if G > 3:
                        b_gk, failed = exchange_settle(b_next, p_tagged + 3 * XG, 0, H, tag, failed, p_status,
                                                       max_polls, VALUE_TY, TAGGED, NK, BK, PADDED)
                        b_acc = split_k_dot(b_gk, b_w3, b_acc, NK, DOT_PRECISION)
                elif RESIDENT:
                    b_gk, failed = _exchange_read(p_gbuf, p_tagged, 0, mask_b, H, tag, failed, p_status, max_polls,
                                                  VALUE_TY, TAGGED, NK, BK, PADDED)
                    b_acc = split_k_dot(b_gk, b_w0, b_acc, NK, DOT_PRECISION)
                    if G > 1:
                        b_gk, failed = _exchange_read(p_gbuf + XG, p_tagged + XG, 0, mask_b, H, tag, failed, p_status,
                                                      max_polls, VALUE_TY, TAGGED, NK, BK, PADDED)
                        b_acc = split_k_dot(b_gk, b_w1, b_acc, NK, DOT_PRECISION)
                        b_gk, failed = _exchange_read(p_gbuf + 2 * XG, p_tagged + 2 * XG, 0, mask_b, H, tag, failed,
                                                      p_status, max_polls, VALUE_TY, TAGGED, NK, BK, PADDED)
                        b_acc = split_k_dot(b_gk, b_w2, b_acc, NK, DOT_PRECISION)
                    if G > 3:
                        b_gk, failed = _exchange_read(p_gbuf + 3 * XG, p_tagged + 3 * XG, 0, mask_b, H, tag, failed,
                                                      p_status, max_polls, VALUE_TY, TAGGED, NK, BK, PADDED)
                        b_acc = split_k_dot(b_gk, b_w3, b_acc, NK, DOT_PRECISION)
                elif DOUBLE_BUFFER:
                    # Streamed: K runs over all G*H rows of W_hh at once, one chunk at a time, through a
                    # register double buffer as the forward's (the next chunk loaded before this one's
                    # product; TAGGED, its tags checked after the product, the round trip behind it).
                    b_gk, failed = _exchange_read(p_gbuf, p_tagged, 0, mask_b, GH, tag, failed, p_status, max_polls,
                                                  VALUE_TY, TAGGED, NK, BK)
                    b_w = weight_tile(p_w, 0, offs_j, mask_j, GH, H, 1, NK, BK)
                    for k0 in range(0, GH, NK * BK):
                        b_gk_next = exchange_issue(p_gbuf, p_tagged, k0 + NK * BK, mask_b, GH, tag, TAGGED, NK, BK)
                        b_w_next = weight_tile(p_w, k0 + NK * BK, offs_j, mask_j, GH, H, 1, NK, BK)
                        b_acc = split_k_dot(b_gk, b_w, b_acc, NK, DOT_PRECISION)
                        b_gk, failed = exchange_settle(b_gk_next, p_tagged, k0 + NK * BK, GH, tag, failed, p_status,
                                                       max_polls, VALUE_TY, TAGGED, NK, BK)
                        b_w = b_w_next
                else:
                    # The same loop without the double buffer: what Triton before 3.9 builds (its
                    # configurations were checked spill-free by hand with 3.6 in this form).
                    for k0 in range(0, GH, NK * BK):
                        b_gk, failed = _exchange_read(p_gbuf, p_tagged, k0, mask_b, GH, tag, failed, p_status,
                                                      max_polls, VALUE_TY, TAGGED, NK, BK)
                        b_w = weight_tile(p_w, k0, offs_j, mask_j, GH, H, 1, NK, BK)
                        b_acc = split_k_dot(b_gk, b_w, b_acc, NK, DOT_PRECISION)
                b_dh_state = tl.load(state_ptr + p_state, mask=mask_a, other=0.0) + b_acc
                tl.store(state_ptr + p_state, b_dh_state, mask=mask_a)
                if s == 0:  # every row's first step
                    tl.store(grad_h0_ptr + p_state, b_dh_state.to(grad_h0_ptr.dtype.element_ty), mask=mask_a)
        # The next step's gate gradients read the state this one wrote.
        tl.debug_barrier()
    zero_padded_steps(dgates_ptr, lengths_ptr, T, B, H, G, BB, BH)


# Before anything else computes a key: the CUDA wheel's builds are found only under these keys.
compute_cache_keys(birnn_backward_kernel)


def _previous_hidden(output, h0, lengths):
    """(2, T, B, P): the h each (direction, time, row) step started from; h0 at a row's first step."""
    T, B, P2 = output.shape
    P = P2 // 2
    forward_prev = torch.cat([h0[0, None].to(output.dtype), output[:-1, :, :P]])
    reverse_prev = torch.cat([output[1:, :, P:], output.new_zeros(1, B, P)])
    first = torch.arange(T, device=output.device)[:, None, None] == (lengths - 1)[None, :, None]  # [T, B, 1]
    reverse_prev = torch.where(first, h0[1, None].to(output.dtype), reverse_prev)
    return torch.stack([forward_prev, reverse_prev])


def _projection_grads(dgates, grad_output, grad_h_n, weight_hh, workspace, lengths):
    """grad_weight_hr (2, P, H) and grad_h0 (2, B, P) (fp32) of an LSTM with projections, from the
    gate gradients: the gradient reaching each h_t = W_hr m_t is grad_output_t, plus grad_h_n at the
    row's last step, plus W_hh^T of the next step's gate gradients; m_t = o_t * tanh(c_t) comes from
    the workspace (0 at padding, as the gate gradients)."""
    T, B, _, GH = dgates.shape
    H = GH // 4
    rows = torch.arange(B, device=dgates.device)
    grad_weight_hr, grad_h0 = [], []
    for d in range(2):
        # The gradient that step t's gates send back to the h they started from.
        back = dgates[:, :, d] @ weight_hh[d].float()  # [T, B, P]
        dh = grad_output[..., d * back.shape[-1]:(d + 1) * back.shape[-1]].float()
        last = lengths - 1 if d == 0 else torch.zeros_like(lengths)
        dh = dh.index_put((last, rows), grad_h_n[d].float(), accumulate=True)
        if d == 0:
            dh[:-1] += back[1:]  # step t + 1 started from h_t
        else:
            dh[1:] += back[:-1]  # the reverse direction's step t - 1 started from h_t
        m = workspace[:, :, d, 3 * H:4 * H].float() * torch.tanh(workspace[:, :, d, 4 * H:5 * H].float())
        grad_weight_hr.append(dh.reshape(T * B, -1).t() @ m.reshape(T * B, H))
        first = torch.zeros_like(lengths) if d == 0 else lengths - 1
        grad_h0.append(back[first, rows])
    return torch.stack(grad_weight_hr), torch.stack(grad_h0)


# Cheap changes to a step, off by default, as launch options for the device check to A/B (as
# forward.VARIANTS): the launcher's ``variants`` names those to switch on. tagged_exchange: the
# step-tagged exchange of the gate gradients in place of the group barrier (TAGGED).
VARIANTS = {"tagged_exchange": "TAGGED"}


def tagged_gate_buffer(B, G, H, dtype, config, device):
    """The TAGGED build's exchange buffer of common.tagged_words for gate gradients in dtype (the
    products'): (2, 2, B, G*H), or where W_hh is resident (2, 2, B, G*K), K = NK*BK >= H, each gate's
    H words followed by K - H words of common.PAD_TAG and value 0 (the kernel's PADDED reads). Every
    other word's tag -1, which no reader awaits (common.tag_of is never negative): a slot's first
    reader may come at any step (a batch block starts when its longest row does), so no tag of a step
    may stand for "not yet written"."""
    word = torch.int64 if dtype == torch.float32 else torch.int32
    K = config.NK * config.BK if config.RESIDENT else H
    words = torch.full((2, 2, B, G, K), -1, dtype=word, device=device)
    words[..., H:] = PAD_TAG.value << (32 if word == torch.int64 else 16)
    return words.view(2, 2, B, G * K)


def backward(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, bias_hh, h0, c0, lengths,
             output, workspace, config=None, max_polls=None, weight_hr=None, variants=()):
    """The VJP of ``forward`` (``_backward``), its cuBLAS products (dX, the weight gradients) under
    cuDNN's RNN fp32 rule (config.rnn_gemm_precision), as nn.LSTM's."""
    with _config.rnn_gemm_precision():
        return _backward(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, bias_hh, h0, c0,
                         lengths, output, workspace, config, max_polls, weight_hr, variants)


def _backward(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, bias_hh, h0, c0, lengths,
              output, workspace, config=None, max_polls=None, weight_hr=None, variants=()):
    """Vector-Jacobian product of ``forward``; results as ``birnn_fast::backward`` (library.py), weights
    stacked; config, max_polls and weight_hr as forward's; variants: names of VARIANTS to launch with.

    Returns grad_input (T, B, I), grad_weight_ih (2, G*H, I), grad_weight_hh (2, G*H, P),
    grad_bias_ih, grad_bias_hh (2, G*H), grad_h0 (2, B, P), grad_c0 (2, B, H) or (0,), and with
    weight_hr grad_weight_hr (2, P, H).
    """
    T, B, I, G, H, P = check_inputs(cell, input, weight_ih, weight_hh, h0, c0, lengths, weight_hr)
    GH = G * H
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; expected some of {sorted(VARIANTS)}")
    if tuple(grad_output.shape) != (T, B, 2 * P):
        raise ValueError(f"Expected grad_output size {(T, B, 2 * P)}, got {list(grad_output.shape)}")
    if B == 0:
        grads = [input.new_zeros(input.shape), torch.zeros_like(weight_ih), torch.zeros_like(weight_hh),
                 torch.zeros_like(bias_hh), torch.zeros_like(bias_hh), torch.empty_like(h0), torch.empty_like(c0)]
        return tuple(grads) + ((torch.zeros_like(weight_hr),) if weight_hr is not None else ())
    input, weight_ih, weight_hh, h0, c0, output, workspace, grad_output, grad_h_n, grad_c_n = (
        x.contiguous() for x in (input, weight_ih, weight_hh, h0, c0, output, workspace, grad_output,
                                 grad_h_n, grad_c_n))
    lstm = cell == "LSTM"
    recurrent, grad_m, grad_m_n, h0_m = weight_hh, grad_output, grad_h_n, h0
    if weight_hr is not None:
        # The kernel runs on m (forward.projected_recurrence): the gradients reaching m through W_hr.
        weight_hr = weight_hr.contiguous()
        recurrent = forward_module.projected_recurrence(weight_hh, weight_hr)
        grad_m = torch.cat([grad_output[..., d * P:(d + 1) * P] @ weight_hr[d] for d in range(2)], dim=-1)
        grad_m_n = torch.stack([grad_h_n[d] @ weight_hr[d] for d in range(2)])
        h0_m = h0.new_zeros(2, B, H)

    if config is None:
        config = _config.launch_config(cell, B, H, input.dtype, input.device, backward=True)
    precision = _config.dot_precision(input.dtype, input.device)
    recurrent = _config.tf32_rounded(recurrent, precision)  # as the forward's
    dgates = torch.empty(T, B, 2, GH, dtype=torch.float32, device=input.device)
    if "tagged_exchange" in variants:
        gbuf = tagged_gate_buffer(B, G, H, recurrent.dtype, config, input.device)
    else:
        gbuf = input.new_empty(2, 2, B, GH, dtype=recurrent.dtype)
    state = input.new_empty(2 if lstm else 1, 2, B, H, dtype=torch.float32)
    counters = barrier_counters(config, input.device)
    grad_h0 = torch.empty_like(h0_m)
    grad_c0 = torch.empty_like(c0)
    launch(birnn_backward_kernel, config, counters,
           grad_m, grad_m_n, grad_c_n if lstm else grad_m_n, recurrent, h0_m, c0 if lstm else h0_m, lengths,
           output, workspace, dgates, gbuf, state, counters, grad_h0, grad_c0 if lstm else grad_h0,
           T, B, H, max_polls=_config.max_polls(input.device) if max_polls is None else max_polls,
           CELL=_config.CELLS[cell], G=G, W=_config.WORKSPACE[cell],
           DOT_PRECISION=precision,
           DOUBLE_BUFFER=_config.double_buffered_backward(), **{VARIANTS[name]: True for name in variants})

    # Weight gradients as GEMMs over all T*B steps at once, in the input's precision (as cuDNN).
    dtype = input.dtype
    dgates_hh = dgates
    if cell == "GRU":
        # The hidden projection of n enters scaled by r (0 at padding, as the gate gradients).
        dgates_hh = dgates.clone()
        dgates_hh[..., 2 * H:] *= workspace[..., :H]
    flat = dgates.view(T * B, 2, GH)
    flat_hh = dgates_hh.view(T * B, 2, GH)
    grad_input = (flat.view(T * B, 2 * GH).to(dtype) @ weight_ih.view(2 * GH, I)).view(T, B, I)
    grad_weight_ih = flat.permute(1, 2, 0).to(dtype) @ input.view(T * B, I)  # [2, GH, I]
    h_prev = _previous_hidden(output, h0, lengths).view(2, T * B, P)
    grad_weight_hh = flat_hh.permute(1, 2, 0).to(dtype) @ h_prev.to(dtype)  # [2, GH, P]
    grad_bias_ih = flat.sum(0).to(bias_hh.dtype)
    grad_bias_hh = flat_hh.sum(0).to(bias_hh.dtype)
    if weight_hr is None:
        return grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0, grad_c0
    grad_weight_hr, grad_h0 = _projection_grads(dgates, grad_output, grad_h_n, weight_hh, workspace, lengths)
    return (grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0.to(h0.dtype), grad_c0,
            grad_weight_hr.to(weight_hr.dtype))
