"""The forward kernel of one bidirectional layer and its launcher.

The input projection of every step is one cuBLAS GEMM done by the launcher; the kernel runs the
whole recurrence, one step after another. Program (j, p, d) owns hidden units [j*BH, (j+1)*BH) (all
G gates of them) of direction d for batch blocks p, p + n_bprog, ... of BB rows each, and runs all
of its blocks in every step, one after another, with the same W_hh slice. Between steps their state
is in global memory (L2): h in the exchange buffer below, and in fp32 LSTM c, GRU h. Rows that have
ended are masked out; a block whose rows have all ended is skipped.

Where the program's slice of W_hh fits in shared memory (and the time loop compiles without spills)
it is loaded once, before the time loop (RESIDENT), and the per-step products split K over the
warps: a 3-D tl.dot whose batch is NK chunks of BK, then a sum over the chunks, so no warp repeats
another's work. Otherwise each step streams the slice from L2 in 2-D chunks of BK. With FUSED
(config.fused_gates) a step takes one product of N = 4*BH columns (a unit's gates side by side, the
GRU's fourth zero; N = BH for RNN) instead of one per gate, and a streamed step loads each chunk of
all gates during the previous chunk's product (a register double buffer).

The full h of a step is exchanged through a small double-buffered global buffer, then the n_hblocks
programs of a (direction, batch blocks) group meet at a grid barrier, once per step: a global counter
bumped with release semantics and polled with acquire. A barrier among programs that are not all
resident deadlocks, so the launcher never launches more programs than there are SMs (each takes
several batch blocks instead), and launches a grid with a barrier cooperatively: the driver then
starts all its programs together, or refuses a grid that cannot be resident at once with an error,
instead of a partial launch hanging at the barrier (not yet seen on hardware). TAGGED (a variant, off by
default) replaces the barrier: each exchanged word carries the step that wrote it and the readers poll
the words they need (common.tagged_settle); the grid must still be co-resident.

TIMING (off by default; benchmarks/gpu/phases.py) is a build that stamps %globaltimer through each
step of every program, first round, into timing_ptr (int64, (2, n_bprog, n_hblocks, T, PHASES)):
before the barrier wait, after it, h loaded, the products, the gate math, the exchange store issued,
arrived, the step's other stores issued (common.globaltimer_after: a stamp waits for the values it
follows). The stamps cost a reduction each: the phases add up to more than a step of the default build.

Contract: ``birnn_fast/library.py``. Workspace, (T, B, 2, W*H), at each row's time index:
LSTM i, f, g, o (after their nonlinearity) and c; GRU r, z, n and hn = W_hn h + b_hn.
"""
import torch
import triton
import triton.language as tl

from birnn_fast.cells import CELLS as _CELL_TABLE

from . import config as _config
from .launch import barrier_counters, launch, compute_cache_keys
from .common import (PAD_TAG, barrier_arrive, barrier_wait, batch_block, batch_rows, copy_slices, exchange_issue,
                     exchange_settle, fused_weight_tile, gate_columns, gate_dot, globaltimer, globaltimer_after,
                     globaltimer_of, group_counter, group_steps, resident_weights, split_k_dot, tag_of, tagged_words,
                     tf32_rounded, zero_padded_steps)
from .pointwise import elman_forward, gru_forward, lstm_forward

LSTM = tl.constexpr(_CELL_TABLE["LSTM"].index)
GRU = tl.constexpr(_CELL_TABLE["GRU"].index)
RNN_RELU = tl.constexpr(_CELL_TABLE["RNN_RELU"].index)
# The TIMING build's stamps per step: wait start, wait end, h loaded, products, gate math, exchange
# store, arrived, step end.
PHASES = tl.constexpr(8)


@triton.jit
def _round_projection(xg_ptr, s, bb, b_len, d, B, H, offs_j, mask_j, G: tl.constexpr, BB: tl.constexpr):
    """The input projection of each gate for the round of step s on batch block bb (its rows' lengths
    b_len), [BB, BH] in xg's dtype (zeros for the gates a cell lacks), loaded without waiting
    (converted where used). Only this program's launch wrote xg before: no barrier orders it."""
    offs_b, _ = batch_rows(bb, B, BB)
    mask_a = (s < b_len)[:, None] & mask_j[None, :]  # [BB, BH]
    t = tl.where(d == 0, s, b_len - 1 - s)  # [BB]
    p_xg = xg_ptr + ((t * B + offs_b) * 2 + d)[:, None] * (G * H) + offs_j[None, :]  # [BB, BH]
    b_x0 = tl.load(p_xg, mask=mask_a, other=0.0)
    b_x1 = b_x0 * 0
    b_x2 = b_x0 * 0
    b_x3 = b_x0 * 0
    if G > 1:
        b_x1 = tl.load(p_xg + H, mask=mask_a, other=0.0)
        b_x2 = tl.load(p_xg + 2 * H, mask=mask_a, other=0.0)
    if G > 3:
        b_x3 = tl.load(p_xg + 3 * H, mask=mask_a, other=0.0)
    return b_x0, b_x1, b_x2, b_x3


@triton.jit(do_not_specialize=["T", "B", "max_polls"])
def birnn_forward_kernel(
    xg_ptr,        # (T, B, 2, G*H) input projection + biases (GRU: b_hn excluded)
    w_hh_ptr,      # (2, G*H, H)
    b_hh_ptr,      # (2, G*H), read for GRU's b_hn only
    h0_ptr,        # (2, B, H)
    c0_ptr,        # (2, B, H) for LSTM
    lengths_ptr,   # (B,) int64
    out_ptr,       # (T, B, 2*H)
    h_n_ptr,       # (2, B, H)
    c_n_ptr,       # (2, B, H) for LSTM
    ws_ptr,        # (T, B, 2, W*H), written only if SAVE (for a backward pass)
    hbuf_ptr,      # (2, 2, B, H) in the matmul dtype: [direction, step parity]; parity 0 holds h0
                   # (TAGGED: int64 words of fp32, int32 of fp16 / bf16, common.tagged_words; TAGGED and
                   # RESIDENT: (2, 2, BP, NK*BK), B rounded up to BB rows of H words each, all padded,
                   # tagged_exchange_buffer)
    state_ptr,     # (2, B, H) fp32 between steps: LSTM c, GRU h (unused by RNN)
    counter_ptr,   # ((2 * programs along batch + 1) * COUNTER_STRIDE,) int32 zeros: barrier counters, status
    T, B, H, max_polls,
    CELL: tl.constexpr, G: tl.constexpr, W: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, NK: tl.constexpr, BK: tl.constexpr, RESIDENT: tl.constexpr,
    SYNC: tl.constexpr, DOT_PRECISION: tl.constexpr, SAVE: tl.constexpr, FUSED: tl.constexpr,
    TIMING: tl.constexpr = False, timing_ptr=None,  # the stamped build (module docstring)
    PREFETCH_STATE: tl.constexpr = False, RED_ARRIVE: tl.constexpr = False,  # VARIANTS options (launcher)
    TAGGED: tl.constexpr = False,
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
    # The products' operand type (W_hh's), in which h is exchanged.
    VALUE_TY: tl.constexpr = w_hh_ptr.dtype.element_ty
    # TAGGED: the exchanged words carry their step and the readers poll them (common.tagged_settle), no
    # group barrier; the CTA barrier at the top of a step stays (it orders a step's state stores before
    # the next step's loads of them, by other threads).
    BARRIER: tl.constexpr = SYNC and not TAGGED
    # TAGGED and RESIDENT: each row of the exchange padded to the product's K span (NK*BK), and the rows
    # to the batch blocks' (n_bblocks*BB), with words the polls take as ready (tagged_exchange_buffer),
    # read unclamped (common._tagged_read). HX: a row's words; BX: a slot's rows.
    PADDED: tl.constexpr = TAGGED and RESIDENT
    if PADDED:
        HX = NK * BK
        BX = n_bblocks * BB
    else:
        HX = H
        BX = B

    offs_j = pid_h * BH + tl.arange(0, BH)  # [BH]
    mask_j = offs_j < H
    if CELL == LSTM:
        copy_slices(c0_ptr, state_ptr, B, H, BB, BH)
    if CELL == GRU:
        copy_slices(h0_ptr, state_ptr, B, H, BB, BH)
    tl.debug_barrier()
    steps = group_steps(lengths_ptr, B, BB)
    p_w = w_hh_ptr + d * GH * H
    # FUSED: one product of N = NG*BH columns for all gates (fused_weight_tile), else one per gate.
    NG: tl.constexpr = 1 if G == 1 else 4
    b_w0, b_w1, b_w2, b_w3 = 0.0, 0.0, 0.0, 0.0  # streamed: loaded chunk by chunk in the step loop
    if RESIDENT:
        # W_hh^T[k, j] of gate g is W_hh[g*H + j, k]. Loop-invariant dot operands: Triton keeps
        # them in shared memory for the whole launch (loaded after the loops above, so that their
        # registers are not held across them).
        if FUSED:
            b_w0 = fused_weight_tile(p_w, 0, pid_h * BH, H, 1, H, G, NG, NK, BK, BH)
        else:
            b_w0, b_w1, b_w2, b_w3 = resident_weights(p_w, offs_j, mask_j, H, 1, H, G, NK, BK)
    if CELL == GRU:
        b_bhn = tl.load(b_hh_ptr + d * GH + 2 * H + offs_j, mask=mask_j, other=0.0).to(tl.float32)
    # Each step runs every batch block of the program in turn ("rounds"), on the same W_hh slice,
    # then the group meets once. The barrier is split: a program arrives right after its last h
    # exchange store of the step, stores its other results, and only then waits, at the top of the
    # next step: those stores overlap the wait. With PREFETCH the next step's first round also loads
    # its input projection there (program-local: nothing another program writes). Without, each round
    # loads it after its products: where W_hh streams, or the products run on the FMA units (fp32
    # without TF32), the projection tiles held across the products would take registers those need
    # (spills), and one more load after a product that long costs little.
    PREFETCH: tl.constexpr = RESIDENT and not (DOT_PRECISION == "ieee" and VALUE_TY == tl.float32)
    _, _, b_len_first = batch_block(lengths_ptr, pid_b, B, BB)  # the first round's: the same every step
    if PREFETCH:
        b_x0, b_x1, b_x2, b_x3 = _round_projection(xg_ptr, 0, pid_b, b_len_first, d, B, H, offs_j, mask_j, G, BB)
    arrived = tl.zeros([], tl.int32)
    p_time = timing_ptr
    if TIMING:
        p_time = timing_ptr + ((d * n_bprog + pid_b) * n_hblocks + pid_h) * T * PHASES
    for s in range(0, steps):
        parity = s % 2
        if TIMING:
            tl.store(p_time + s * PHASES, globaltimer())
        failed = barrier_wait(p_counter, p_status, arrived, s * n_hblocks, failed, max_polls, BARRIER)
        if TIMING:
            tl.store(p_time + s * PHASES + 1, globaltimer())
        if PREFETCH:
            b_x0_next, b_x1_next, b_x2_next, b_x3_next = b_x0, b_x1, b_x2, b_x3  # set by the last round
        for bb in range(pid_b, n_bblocks, n_bprog):
            b_len = b_len_first
            if bb != pid_b:
                _, _, b_len = batch_block(lengths_ptr, bb, B, BB)
                if PREFETCH:
                    b_x0, b_x1, b_x2, b_x3 = _round_projection(xg_ptr, s, bb, b_len, d, B, H, offs_j, mask_j, G, BB)
            offs_b, mask_b = batch_rows(bb, B, BB)
            active = s < b_len  # [BB]
            mask_a = active[:, None] & mask_j[None, :]  # [BB, BH]
            p_state = (d * B + offs_b[:, None]) * H + offs_j[None, :]  # [BB, BH]
            t = tl.where(d == 0, s, b_len - 1 - s)  # [BB] int64; negative where inactive
            # A block whose rows have all ended is done: no program of the group reads it again.
            live = s < tl.max(b_len, axis=0)
            b_h_new = tl.zeros([BB, BH], dtype=tl.float32)
            b_c_new = tl.zeros([BB, BH], dtype=tl.float32)
            b_s0 = tl.zeros([BB, BH], dtype=tl.float32)  # the activations the workspace saves
            b_s1 = tl.zeros([BB, BH], dtype=tl.float32)
            b_s2 = tl.zeros([BB, BH], dtype=tl.float32)
            b_s3 = tl.zeros([BB, BH], dtype=tl.float32)
            if live:
                if PREFETCH_STATE and G > 1:
                    # This program's own state of the last step (LSTM c, GRU h), loaded before the
                    # products so that its round trip overlaps them: the CTA barrier that ends the
                    # barrier wait orders the last step's stores of it before this load.
                    b_state_prev = tl.load(state_ptr + p_state, mask=mask_a, other=0.0)
                p_hbuf = hbuf_ptr + ((d * 2 + parity) * B + offs_b[:, None]) * HX  # [BB, 1]
                tag = tag_of(s)
                # TAGGED: rows past B read row B - 1 (its block's writers write it whenever they write
                # the block's rows), or PADDED their padding; their products are dropped as in the
                # default build. PADDED, a block's addresses are one base and constant offsets (the
                # clamped rows' take a register pair per row and element, held across the poll's loop:
                # the resident tile of K = 1024 spills with Triton 3.6).
                if PADDED:
                    p_tagged = (hbuf_ptr + ((d * 2 + parity) * BX + bb * BB) * HX
                                + (tl.arange(0, BB) * HX)[:, None])  # [BB, 1]
                else:
                    p_tagged = hbuf_ptr + ((d * 2 + parity) * B + tl.minimum(offs_b, B - 1)[:, None]) * HX  # [BB, 1]
                if FUSED:
                    acc = tl.zeros([BB, NG * BH], dtype=tl.float32)
                    b_hk = exchange_issue(p_hbuf, p_tagged, 0, mask_b, H, tag, TAGGED, NK, BK, PADDED)
                    b_hk, failed = exchange_settle(b_hk, p_tagged, 0, H, tag, failed, p_status, max_polls, VALUE_TY,
                                                   TAGGED, NK, BK, PADDED)  # [NK, BB, BK], or [BB, BK]
                    if TIMING:
                        if bb == pid_b:
                            tl.store(p_time + s * PHASES + 2, globaltimer_after(b_hk))
                    if RESIDENT:  # a single pass (NK * BK >= H)
                        acc = split_k_dot(b_hk, b_w0, acc, NK, DOT_PRECISION)
                    else:
                        # A register double buffer: chunk k0 + BK is loaded before chunk k0's product,
                        # so that its round trip to L2 overlaps the product. (tl.range's num_stages
                        # pipelining would issue the loads as cp.async, which drops the .cg the
                        # exchanged h needs.)
                        b_wk = fused_weight_tile(p_w, 0, pid_h * BH, H, 1, H, G, NG, 1, BK, BH)
                        for k0 in range(0, H, BK):
                            b_hk_next = exchange_issue(p_hbuf, p_tagged, k0 + BK, mask_b, H, tag, TAGGED, 1, BK)
                            b_wk_next = fused_weight_tile(p_w, k0 + BK, pid_h * BH, H, 1, H, G, NG, 1, BK, BH)
                            acc = tl.dot(b_hk, b_wk, acc, input_precision=DOT_PRECISION)
                            # TAGGED: its tags are checked after this product, the round trip behind it.
                            b_hk, failed = exchange_settle(b_hk_next, p_tagged, k0 + BK, H, tag, failed, p_status,
                                                           max_polls, VALUE_TY, TAGGED, 1, BK)
                            b_wk = b_wk_next
                    acc0, acc1, acc2, acc3 = gate_columns(acc, BB, BH, NG)
                else:
                    acc0 = tl.zeros([BB, BH], dtype=tl.float32)
                    acc1 = tl.zeros([BB, BH], dtype=tl.float32)
                    acc2 = tl.zeros([BB, BH], dtype=tl.float32)
                    acc3 = tl.zeros([BB, BH], dtype=tl.float32)
                    for k0 in range(0, H, NK * BK):  # a single pass when RESIDENT (NK * BK >= H)
                        b_hk = exchange_issue(p_hbuf, p_tagged, k0, mask_b, H, tag, TAGGED, NK, BK, PADDED)
                        b_hk, failed = exchange_settle(b_hk, p_tagged, k0, H, tag, failed, p_status, max_polls,
                                                       VALUE_TY, TAGGED, NK, BK, PADDED)  # [NK, BB, BK], or [BB, BK]
                        if TIMING:  # streamed: the first chunk's (later loads count as products)
                            if (bb == pid_b) & (k0 == 0):
                                tl.store(p_time + s * PHASES + 2, globaltimer_after(b_hk))
                        acc0 = gate_dot(acc0, b_hk, b_w0, p_w, k0, offs_j, mask_j, H, 1, H, RESIDENT, NK, BK,
                                        DOT_PRECISION)
                        if G > 1:
                            acc1 = gate_dot(acc1, b_hk, b_w1, p_w + H * H, k0, offs_j, mask_j, H, 1, H, RESIDENT,
                                            NK, BK, DOT_PRECISION)
                            acc2 = gate_dot(acc2, b_hk, b_w2, p_w + 2 * H * H, k0, offs_j, mask_j, H, 1, H,
                                            RESIDENT, NK, BK, DOT_PRECISION)
                        if G > 3:
                            acc3 = gate_dot(acc3, b_hk, b_w3, p_w + 3 * H * H, k0, offs_j, mask_j, H, 1, H,
                                            RESIDENT, NK, BK, DOT_PRECISION)
                if TIMING:
                    if bb == pid_b:
                        b_done = tl.maximum(globaltimer_after(acc0), globaltimer_after(acc3))  # first and last gate
                        tl.store(p_time + s * PHASES + 3, b_done)
                # The input projection joins after the products: they need not wait for it.
                if not PREFETCH:
                    b_x0, b_x1, b_x2, b_x3 = _round_projection(xg_ptr, s, bb, b_len, d, B, H, offs_j, mask_j, G, BB)
                if CELL == LSTM:
                    if PREFETCH_STATE:
                        b_c_prev = b_state_prev
                    else:
                        b_c_prev = tl.load(state_ptr + p_state, mask=mask_a, other=0.0)
                    b_s0, b_s1, b_s2, b_s3, b_c_new, b_h_new = lstm_forward(
                        acc0 + b_x0.to(tl.float32), acc1 + b_x1.to(tl.float32), acc2 + b_x2.to(tl.float32),
                        acc3 + b_x3.to(tl.float32), b_c_prev)
                elif CELL == GRU:
                    # r multiplies W_hn h + b_hn as a whole, so the n gate keeps its x part apart.
                    b_s3 = acc2 + b_bhn[None, :]
                    if PREFETCH_STATE:
                        b_h_prev = b_state_prev
                    else:
                        b_h_prev = tl.load(state_ptr + p_state, mask=mask_a, other=0.0)
                    b_s0, b_s1, b_s2, b_h_new = gru_forward(acc0 + b_x0.to(tl.float32), acc1 + b_x1.to(tl.float32),
                                                            b_x2.to(tl.float32), b_s3, b_h_prev)
                else:
                    b_h_new = elman_forward(acc0 + b_x0.to(tl.float32), CELL == RNN_RELU)
                if TIMING:
                    if bb == pid_b:
                        tl.store(p_time + s * PHASES + 4, globaltimer_after(b_h_new))
                # An ended row's h is left as it was: it enters only that row's (masked) products.
                p_next = hbuf_ptr + ((d * 2 + 1 - parity) * BX + offs_b[:, None]) * HX + offs_j[None, :]
                # The exchanged h is an operand of the products alone: rounded as they read it.
                b_h_dot = tf32_rounded(b_h_new, DOT_PRECISION).to(VALUE_TY)
                if TAGGED:
                    # Every row of the block, ended ones too: the readers poll them all (tagged_settle).
                    tl.store(p_next, tagged_words(b_h_dot, tag_of(s + 1), hbuf_ptr.dtype.element_ty),
                             mask=mask_b[:, None] & mask_j[None, :])
                else:
                    tl.store(p_next, b_h_dot, mask=mask_a)
                if TIMING:
                    if bb == pid_b:
                        tl.store(p_time + s * PHASES + 5, globaltimer())
            if bb + n_bprog >= n_bblocks:  # the step's last round
                if not TAGGED:
                    arrived = barrier_arrive(p_counter, SYNC, RED_ARRIVE)
                if TIMING:
                    tl.store(p_time + s * PHASES + 6, globaltimer_of(arrived))
                if PREFETCH:
                    b_x0_next, b_x1_next, b_x2_next, b_x3_next = _round_projection(
                        xg_ptr, s + 1, pid_b, b_len_first, d, B, H, offs_j, mask_j, G, BB)
            if live:
                row = (t * B + offs_b) * 2 + d  # [BB]
                p_ws = ws_ptr + row[:, None] * (W * H) + offs_j[None, :]  # [BB, BH]
                mask_last = mask_a & (s == b_len - 1)[:, None]  # each row's final state, once
                if CELL == LSTM:
                    tl.store(state_ptr + p_state, b_c_new, mask=mask_a)
                    tl.store(c_n_ptr + p_state, b_c_new.to(c_n_ptr.dtype.element_ty), mask=mask_last)
                    if SAVE:
                        tl.store(p_ws, b_s0, mask=mask_a)
                        tl.store(p_ws + H, b_s1, mask=mask_a)
                        tl.store(p_ws + 2 * H, b_s2, mask=mask_a)
                        tl.store(p_ws + 3 * H, b_s3, mask=mask_a)
                        tl.store(p_ws + 4 * H, b_c_new, mask=mask_a)
                elif CELL == GRU:
                    tl.store(state_ptr + p_state, b_h_new, mask=mask_a)
                    if SAVE:
                        tl.store(p_ws, b_s0, mask=mask_a)
                        tl.store(p_ws + H, b_s1, mask=mask_a)
                        tl.store(p_ws + 2 * H, b_s2, mask=mask_a)
                        tl.store(p_ws + 3 * H, b_s3, mask=mask_a)
                tl.store(h_n_ptr + p_state, b_h_new.to(h_n_ptr.dtype.element_ty), mask=mask_last)
                p_out = out_ptr + (t[:, None] * B + offs_b[:, None]) * (2 * H) + d * H + offs_j[None, :]
                tl.store(p_out, b_h_new.to(out_ptr.dtype.element_ty), mask=mask_a)
        if PREFETCH:
            b_x0, b_x1, b_x2, b_x3 = b_x0_next, b_x1_next, b_x2_next, b_x3_next
        if TIMING:
            tl.store(p_time + s * PHASES + 7, globaltimer())
    zero_padded_steps(out_ptr, lengths_ptr, T, B, H, 1, BB, BH)
    if SAVE:
        zero_padded_steps(ws_ptr, lengths_ptr, T, B, H, W, BB, BH)


# Before anything else computes a key: the CUDA wheel's builds are found only under these keys.
compute_cache_keys(birnn_forward_kernel)


def check_inputs(cell, input, weight_ih, weight_hh, h0, c0, lengths, weight_hr=None):
    """(T, B, I, G, H, P) of a layer's stacked arguments, or the error naming the first that is wrong."""
    if cell not in _config.CELLS:
        raise ValueError(f"unknown cell {cell!r}; expected one of {sorted(_config.CELLS)}")
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16 input, got {input.dtype}")
    if input.dim() != 3:
        raise ValueError(f"Expected input of 3 dimensions (T, B, I), got {list(input.shape)}")
    if weight_hr is not None and cell != "LSTM":
        raise ValueError(f"weight_hr (proj_size) is for LSTM only, got cell {cell}")
    T, B, I = input.shape
    G = _config.GATES[cell]
    H, P = weight_hh.shape[1] // G, weight_hh.shape[-1]
    expected = {"weight_ih": (weight_ih, (2, G * H, I)), "weight_hh": (weight_hh, (2, G * H, P)),
                "h0": (h0, (2, B, P)), "c0": (c0, (2, B, H) if cell == "LSTM" else (0,)),
                "lengths": (lengths, (B,))}
    if weight_hr is not None:
        expected["weight_hr"] = (weight_hr, (2, P, H))
    elif P != H:
        raise ValueError(f"Expected weight_hh size {(2, G * H, H)} without weight_hr, got {list(weight_hh.shape)}")
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"Expected {name} size {shape}, got {list(tensor.shape)}")
    for name in ("weight_ih", "weight_hh") + (("weight_hr",) if weight_hr is not None else ()):
        if expected[name][0].dtype != input.dtype:
            raise TypeError(f"Expected {name} of dtype {input.dtype}, got {expected[name][0].dtype}")
    if lengths.dtype != torch.int64 or lengths.device != input.device:
        raise TypeError(f"Expected lengths int64 on {input.device}, got {lengths.dtype} on {lengths.device}")
    return T, B, I, G, H, P


def workspace_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def projected_recurrence(weight_hh, weight_hr):
    """W_hh W_hr (2, G*H, H): with a projection, h_t = W_hr m_t (m_t = o_t * tanh(c_t)), so the next
    step's W_hh h_t is (W_hh W_hr) m_t, and the kernels run on m, K = H, one exchange per step; the
    product is taken in fp32."""
    return (weight_hh.float() @ weight_hr.float()).to(weight_hh.dtype)


def first_steps(lengths):
    """(2, B) int64: the time index of each row's first step, forward direction (0) and reverse."""
    return torch.stack([torch.zeros_like(lengths), lengths - 1])


def forward(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, save_workspace=True, config=None,
            max_polls=None, weight_hr=None, timing=None, variants=()):
    """One bidirectional layer (``_forward``), its cuBLAS products under cuDNN's RNN fp32 rule
    (config.rnn_gemm_precision), as nn.LSTM's."""
    with _config.rnn_gemm_precision():
        return _forward(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, save_workspace,
                        config, max_polls, weight_hr, timing, variants)


# Cheap changes to a step, off by default, as launch options for the device check to A/B
# (benchmarks/gpu/phases.py --variants): the launcher's ``variants`` names those to switch on.
# red_arrive is compiled only (inline PTX): the interpreter refuses it. tagged_exchange: the step-tagged
# exchange in place of the group barrier (TAGGED), which the device check A/Bs on the LSTM; its resident
# builds (bf16 LSTM, GRU and RNN up to K = 1024) compile for sm_90 without spills with Triton 3.9 and 3.6.
VARIANTS = {"prefetch_state": "PREFETCH_STATE", "red_arrive": "RED_ARRIVE", "tagged_exchange": "TAGGED"}
COMPILED_ONLY = {"red_arrive"}


def timing_buffer(config, steps, device):
    """The TIMING build's stamps of a launch with ``config``: int64 (2, n_bprog, n_hblocks, T, PHASES),
    -1 where no stamp was written (steps a group skipped)."""
    return torch.full((2, config.n_bprog, config.n_hblocks, steps, PHASES.value), -1, dtype=torch.int64,
                      device=device)


def tagged_exchange_buffer(h0, config):
    """The TAGGED build's exchange buffer of common.tagged_words for a launch with ``config``: h0 (2, B, H),
    in the products' dtype, in slot 0 with step 0's tag (0), slot 1 zeros (tag 0, which no reader of it
    awaits): (2, 2, B, H), or where W_hh is resident (2, 2, BP, K), K = NK*BK >= H and BP = the batch
    blocks' rows (B rounded up to BB), each row's H words followed by K - H words of common.PAD_TAG and
    value 0, and BP - B rows of them, in both slots (the kernel's PADDED reads)."""
    bits = 32 if h0.dtype == torch.float32 else 16
    if bits == 32:
        words = h0.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    else:
        words = h0.view(torch.int16).to(torch.int32) & 0xFFFF
    words = torch.stack([words, torch.zeros_like(words)], dim=1)
    if not config.RESIDENT:
        return words
    B, H = h0.shape[-2:]
    padded = words.new_full((2, 2, triton.cdiv(B, config.BB) * config.BB, config.NK * config.BK),
                            PAD_TAG.value << bits)
    padded[:, :, :B, :H] = words
    return padded


def _forward(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, save_workspace=True, config=None,
             max_polls=None, weight_hr=None, timing=None, variants=()):
    """One bidirectional layer; results as ``birnn_fast::forward`` (library.py), weights stacked.

    input: (T, B, I); weight_ih: (2, G*H, I); weight_hh: (2, G*H, P); bias_*: (2, G*H);
    h0: (2, B, P); c0: (2, B, H) ((0,) unless LSTM); lengths: (B,) int64; weight_hr: (2, P, H) for an
    LSTM with projections (P = proj_size), else None and P = H. config: the launch's
    ``config.Config``, by default ``config.launch_config``'s; max_polls: the bound of a barrier wait
    (default ``config.max_polls``), past which the launch raises a RuntimeError.
    timing: a ``timing_buffer(config, T, device)`` to launch the TIMING build into (a GPU's: the
    interpreter has no clock to read), or None. variants: names of VARIANTS to launch with.
    Returns output (T, B, 2*P), h_n (2, B, P), c_n (2, B, H) or (0,), workspace (T, B, 2, W*H),
    or (0,) without save_workspace.
    """
    T, B, I, G, H, P = check_inputs(cell, input, weight_ih, weight_hh, h0, c0, lengths, weight_hr)
    GH = G * H
    workspace_shape = (T, B, 2, _config.WORKSPACE[cell] * H) if save_workspace else (0,)
    workspace = input.new_empty(workspace_shape, dtype=workspace_dtype(input.dtype))
    if B == 0:
        return input.new_zeros(T, 0, 2 * P), torch.empty_like(h0), torch.empty_like(c0), workspace
    input, weight_ih, weight_hh, h0, c0 = (x.contiguous() for x in (input, weight_ih, weight_hh, h0, c0))
    bias_hh = bias_hh.contiguous()
    bias = bias_ih + bias_hh
    if cell == "GRU":
        bias[:, 2 * H:] = bias_ih[:, 2 * H:]
    xg = torch.addmm(bias.reshape(1, 2 * GH).to(input.dtype), input.view(T * B, I),
                     weight_ih.view(2 * GH, I).t())  # [T*B, 2*G*H]
    recurrent = weight_hh
    if weight_hr is not None:
        # h0 enters only each row's first step, through W_hh: there in the input projection; the
        # kernel starts from m = 0.
        recurrent = projected_recurrence(weight_hh, weight_hr)
        xg = xg.view(T, B, 2, GH)
        rows = torch.arange(B, device=input.device)
        for d, t in enumerate(first_steps(lengths)):
            xg[t, rows, d] = (xg[t, rows, d].float() + h0[d].float() @ weight_hh[d].float().t()).to(xg.dtype)
        h0 = h0.new_zeros(2, B, H)

    if config is None:
        config = _config.launch_config(cell, B, H, input.dtype, input.device, backward=False)
    output = input.new_empty(T, B, 2 * H)
    h_n = input.new_empty(2, B, H)
    c_n = torch.empty_like(c0)
    precision = _config.dot_precision(input.dtype, input.device)
    # The products' operands, h and W_hh, rounded to TF32 where the dots take it (kernel: tf32_rounded).
    recurrent = _config.tf32_rounded(recurrent, precision)
    h0_dot = _config.tf32_rounded(h0, precision).to(recurrent.dtype)  # as the products read it
    if "tagged_exchange" in variants:
        hbuf = tagged_exchange_buffer(h0_dot, config)
    else:
        hbuf = input.new_empty(2, 2, B, H, dtype=recurrent.dtype)
        hbuf[:, 0].copy_(h0_dot)
    state = input.new_empty((2, B, H) if cell in ("LSTM", "GRU") else (0,), dtype=torch.float32)  # RNN: none
    counters = barrier_counters(config, input.device)
    stamps = {}
    if timing is not None:
        if _config.interpreted(input.device):
            raise ValueError("the TIMING build reads the GPU's %globaltimer: the Triton interpreter has none")
        expected = (2, config.n_bprog, config.n_hblocks, T, PHASES.value)
        if tuple(timing.shape) != expected or timing.dtype != torch.int64:
            raise ValueError(f"Expected timing int64 of size {expected}, got {timing.dtype} {list(timing.shape)}")
        stamps = dict(TIMING=True, timing_ptr=timing)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; expected some of {sorted(VARIANTS)}")
    if _config.interpreted(input.device) and COMPILED_ONLY & set(variants):
        raise ValueError(f"variants {sorted(COMPILED_ONLY & set(variants))} run compiled only (inline PTX): "
                         "the Triton interpreter has none")
    stamps.update({VARIANTS[name]: True for name in variants})
    launch(birnn_forward_kernel, config, counters,
           xg, recurrent, bias_hh, h0, c0 if cell == "LSTM" else h0, lengths,
           output, h_n, c_n if cell == "LSTM" else h_n, workspace, hbuf, state, counters,
           T, B, H, max_polls=_config.max_polls(input.device) if max_polls is None else max_polls,
           CELL=_config.CELLS[cell], G=G, W=_config.WORKSPACE[cell],
           DOT_PRECISION=precision, SAVE=save_workspace, FUSED=config.FUSED, **stamps)
    if weight_hr is not None:
        # The projection of every step at once: output and h_n are W_hr m (0 where m is, at padding).
        weight_hr = weight_hr.contiguous()
        output = torch.cat([output[..., d * H:(d + 1) * H] @ weight_hr[d].t() for d in range(2)], dim=-1)
        h_n = torch.stack([h_n[d] @ weight_hr[d].t() for d in range(2)])
    return output, h_n, c_n, workspace
