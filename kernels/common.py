"""Triton helpers both kernels share: W_hh tiles, exchanged operands, the split-K product, the
group barrier, and the batch blocks a program owns."""
import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # exp of a non-positive argument only: no overflow for large |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


# The K chunks of the per-step products: with NK > 1 a 3-D batch of NK chunks of BK (split across
# the warps), with NK == 1 a plain 2-D tile (a 3-D batch of one costs registers in Triton 3.6).
@triton.jit
def weight_tile(p, k0, offs_j, mask_j, H, stride_k, stride_j, NK: tl.constexpr, BK: tl.constexpr):
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
def resident_weights(p_w, offs_j, mask_j, H, stride_k, stride_j, G: tl.constexpr, NK: tl.constexpr,
                     BK: tl.constexpr):
    """weight_tile of every gate over all of K, gate g at p_w + g*H*H; entries past G repeat gate 0."""
    b_w0 = weight_tile(p_w, 0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
    b_w1 = b_w0
    b_w2 = b_w0
    b_w3 = b_w0
    if G > 1:
        tl.debug_barrier()
        b_w1 = weight_tile(p_w + H * H, 0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
        tl.debug_barrier()
        b_w2 = weight_tile(p_w + 2 * H * H, 0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
    if G > 3:
        tl.debug_barrier()
        b_w3 = weight_tile(p_w + 3 * H * H, 0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
    return b_w0, b_w1, b_w2, b_w3


@triton.jit
def fused_weight_tile(p, k0, j0, H, stride_k, stride_j, G: tl.constexpr, NG: tl.constexpr, NK: tl.constexpr,
                      BK: tl.constexpr, BH: tl.constexpr):
    """[NK, BK, NG*BH] ([BK, NG*BH] if NK == 1): the weight_tile of every gate side by side, column
    NG*jj + g holding gate g of unit j0 + jj, i.e. W[k, g*H + j0 + jj] at p + k*stride_k +
    (g*H + j0 + jj)*stride_j (k0 <= k < k0 + NK*BK, k < H); zeros for gates past G. A unit's gates
    are neighbours so that gate_columns takes them apart within each thread's registers."""
    offs_n = tl.arange(0, NG * BH)
    gate = offs_n % NG
    unit = j0 + offs_n // NG
    offs_col = gate * H + unit  # [NG*BH]
    mask_n = (gate < G) & (unit < H)
    if NK == 1:
        offs_k = k0 + tl.arange(0, BK)[:, None]  # [BK, 1]
        tile = tl.load(p + offs_k * stride_k + offs_col[None, :] * stride_j, mask=(offs_k < H) & mask_n[None, :],
                       other=0.0)
    else:
        offs_k = k0 + tl.arange(0, NK)[:, None, None] * BK + tl.arange(0, BK)[None, :, None]  # [NK, BK, 1]
        tile = tl.load(p + offs_k * stride_k + offs_col[None, None, :] * stride_j,
                       mask=(offs_k < H) & mask_n[None, None, :], other=0.0)
    return tile


@triton.jit
def gate_columns(acc, BB: tl.constexpr, BH: tl.constexpr, NG: tl.constexpr):
    """The [BB, BH] gates of acc, a [BB, NG*BH] product with fused_weight_tile's columns: 4 of them
    (NG = 4), or acc and copies of it (NG = 1)."""
    acc0, acc1, acc2, acc3 = acc, acc, acc, acc
    if NG == 4:
        pairs = tl.reshape(acc, [BB, BH, 2, 2])  # [row, unit, gate // 2, gate % 2]
        even, odd = tl.split(pairs)  # gates 0, 2 and 1, 3: [BB, BH, 2]
        acc0, acc2 = tl.split(even)
        acc1, acc3 = tl.split(odd)
    return acc0, acc1, acc2, acc3


@triton.jit
def exchanged_tile(p_rows, k0, mask_b, H, NK: tl.constexpr, BK: tl.constexpr):
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
def tf32_rounded(x, DOT_PRECISION: tl.constexpr):
    """x (fp32) rounded to the nearest TF32, ties away from zero (PTX cvt.rna.tf32), where the dots run
    in TF32: the MMA truncates its fp32 operands instead, a bias that every product and step adds to
    (2.2-2.8x cuDNN's TF32 error on an H200). Exact in the MMA: the low 13 bits are zero."""
    if DOT_PRECISION == "tf32":
        bits = x.to(tl.uint32, bitcast=True)
        x = (((bits + 0x1000) >> 13) << 13).to(tl.float32, bitcast=True)
    return x


@triton.jit
def split_k_dot(a, w, acc, NK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a[NK, BB, BK] @ w[NK, BK, BH] summed over the NK chunks (K split across the warps), or
    acc + a[BB, BK] @ w[BK, BH]: [BB, BH] fp32."""
    if NK == 1:
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(tl.dot(a, w, input_precision=DOT_PRECISION), axis=0)
    return acc


@triton.jit
def gate_dot(acc, a, b_w, p_w, k0, offs_j, mask_j, H, stride_k, stride_j, RESIDENT: tl.constexpr,
             NK: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ one gate's K chunk of W: b_w when RESIDENT, else the chunk at k0 of the W at p_w,
    loaded here, right before its product (loading every gate's chunk first spills in Triton 3.6)."""
    if not RESIDENT:
        b_w = weight_tile(p_w, k0, offs_j, mask_j, H, stride_k, stride_j, NK, BK)
    return split_k_dot(a, b_w, acc, NK, DOT_PRECISION)


# The group barrier's counters and status word, one 128-byte line each (COUNTER_STRIDE int32), so
# that the polls of one group do not share a line with another group's arrivals.
COUNTER_STRIDE = tl.constexpr(32)


@triton.jit
def group_counter(counter_ptr):
    """The counter of the program's group (direction, programs along batch), and the launch's status
    word after all counters: set to 1 by a program whose barrier wait timed out."""
    group = tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    return counter_ptr + group * COUNTER_STRIDE, counter_ptr + 2 * tl.num_programs(1) * COUNTER_STRIDE


@triton.jit
def barrier_arrive(p_counter, SYNC: tl.constexpr, RED: tl.constexpr = False):
    """This program has written its part of the step: returns the arrivals counted so far, itself
    included. RED: a non-returning add (PTX red, by one thread) instead of the returning atomic, which
    waits for its answer; returns 0 then (the wait polls at once). Compiled only: the interpreter has
    no inline PTX."""
    # The CTA barrier orders every thread's global writes before the release (cumulativity); alone it
    # suffices when the group is a single program.
    tl.debug_barrier()
    arrived = tl.zeros([], tl.int32)
    if SYNC:
        if RED:
            arrived = tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
                "@p red.release.gpu.global.add.s32 [$1], 1; mov.u32 $0, 0; }",
                "=r,l", [p_counter], dtype=tl.int32, is_pure=False, pack=1)
        else:
            arrived = tl.atomic_add(p_counter, 1, sem="release", scope="gpu") + 1
    return arrived


@triton.jit
def barrier_wait(p_counter, p_status, arrived, target, failed, max_polls, SYNC: tl.constexpr):
    """Wait until the group's counter reaches target (arrived: what barrier_arrive saw). A wait that
    has not seen it after max_polls polls gives up: it sets the status word, and returns failed = 1, so
    that the program's later waits return at once and the launch ends (its results are then garbage,
    and the launcher raises). A GPU that cannot hold the whole grid at once fails so instead of
    hanging."""
    if SYNC:
        if failed == 0:
            polls = tl.zeros([], tl.int32)
            while (arrived < target) & (polls < max_polls):
                arrived = tl.atomic_add(p_counter, 0, sem="acquire", scope="gpu")
                polls += 1
            if arrived < target:
                tl.atomic_xchg(p_status, 1, sem="relaxed", scope="gpu")
                failed = tl.full([], 1, tl.int32)
    # Every thread reads after the acquire.
    tl.debug_barrier()
    return failed


@triton.jit
def group_barrier(p_counter, p_status, target, failed, max_polls, SYNC: tl.constexpr):
    """All programs of a group have finished the step once the counter reaches target: barrier_arrive
    then barrier_wait. Returns failed."""
    arrived = barrier_arrive(p_counter, SYNC)
    return barrier_wait(p_counter, p_status, arrived, target, failed, max_polls, SYNC)


# The step-tagged exchange (TAGGED): each word of the exchange buffer holds one operand value and the
# step that wrote it, so a reader polls the words it needs, one round trip, instead of a barrier. A
# word is int64 (fp32 value in the low half) or int32 (fp16 / bf16 value in the low half), written
# and read whole: a reader sees a value together with its own step's tag, never another's.


# The tag of a padding word (PADDED reads: the columns k >= H of a row padded to the chunks' span, value
# 0): a poll takes it as ready whatever step it awaits. Negative, so no step's tag (tag_of).
PAD_TAG = tl.constexpr(-2)


@triton.jit
def tag_of(step):
    """The tag of the words a kernel exchanges for step ``step`` (the forward's h_step, h0's 0; the
    backward's gate gradients of step ``step``): step modulo 2^15, which fits the high half of either
    word with its sign bit clear (a negative tag is never awaited). A double-buffered slot holds the
    words of the step two before (or after, in the backward) or of the one awaited, never steps 2^15
    apart."""
    return (tl.zeros([], tl.int64) + step % 32768).to(tl.int32)  # step: a loop index, int in the interpreter


@triton.jit
def tagged_words(value, tag, word_ty: tl.constexpr):
    """value (fp32, or fp16 / bf16 as the dots read it) packed with tag into word_ty (int64, int32)."""
    if word_ty == tl.int64:
        words = (value.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF) | (tag.to(tl.int64) << 32)
    else:
        words = (value.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (tag.to(tl.int32) << 16)
    return words


@triton.jit
def word_values(words, value_ty: tl.constexpr):
    """The values of tagged_words, in value_ty."""
    if words.dtype == tl.int64:
        values = words.to(tl.int32).to(value_ty, bitcast=True)
    else:
        values = words.to(tl.int16).to(value_ty, bitcast=True)
    return values


@triton.jit
def word_tags(words):
    """The tags of tagged_words."""
    return words >> (32 if words.dtype == tl.int64 else 16)


@triton.jit
def _ready(words, tag, PADDED: tl.constexpr):
    """1 if every word carries tag (PADDED: or PAD_TAG), else 0 (a reduction over the program's threads)."""
    tags = word_tags(words)
    if PADDED:
        ready = (tags == tag) | (tags == PAD_TAG)
    else:
        ready = tags == tag
    return tl.min(ready.to(tl.int32), axis=None)


@triton.jit
def _tagged_read(p_rows, k0, H, tag, NK: tl.constexpr, BK: tl.constexpr, PADDED: tl.constexpr = False):
    """The words of exchanged_tile's elements (rows p_rows, every one a row the writers write each
    step of a live block), and _ready of them. Unmasked: k past H reads word H - 1, or PADDED (rows
    padded to k0 + NK*BK with words of PAD_TAG) the padding itself: contiguous addresses, no clamp
    (the clamped addresses take a register pair per element: the resident tile of K = 1024 spills).
    A masked read (a predicate per element, and the mask again in the check) makes ptxas wait for each
    load before issuing the next. .cg loads, as exchanged_tile's: at L2, where the writers' words land
    (a load served from L1 could be stale); they stay in the poll's loop (the tests read the SASS)."""
    if NK == 1:
        offs_k = k0 + tl.arange(0, BK)[None, :]  # [1, BK]
        p = p_rows + (offs_k if PADDED else tl.minimum(offs_k, H - 1))
    else:
        offs_k = k0 + tl.arange(0, NK)[:, None, None] * BK + tl.arange(0, BK)[None, None, :]  # [NK, 1, BK]
        p = p_rows[None, :, :] + (offs_k if PADDED else tl.minimum(offs_k, H - 1))
    words = tl.load(p, cache_modifier=".cg")
    return words, _ready(words, tag, PADDED)


@triton.jit
def tagged_issue(p_rows, k0, H, tag, NK: tl.constexpr, BK: tl.constexpr, PADDED: tl.constexpr = False):
    """The first read of a tagged tile (tagged_settle waits for its tags), that may be issued early,
    e.g. during the previous chunk's product."""
    words, _ = _tagged_read(p_rows, k0, H, tag, NK, BK, PADDED)
    return words


@triton.jit
def tagged_settle(words, p_rows, k0, H, tag, failed, p_status, max_polls, value_ty: tl.constexpr,
                  NK: tl.constexpr, BK: tl.constexpr, PADDED: tl.constexpr = False):
    """exchanged_tile of a tagged buffer, values in value_ty (0 past H), from words (tagged_issue's
    read of it): re-read until every word carries tag. A poll that has not seen them after max_polls
    reads gives up as barrier_wait does (status word set, failed = 1: the program's later polls
    return at once, the launcher raises). Returns (tile, failed)."""
    ready = _ready(words, tag, PADDED)
    polls = tl.zeros([], tl.int32)
    while (ready == 0) & (failed == 0) & (polls < max_polls):
        words, ready = _tagged_read(p_rows, k0, H, tag, NK, BK, PADDED)
        polls += 1
    if (ready == 0) & (failed == 0):
        # A plain store: the host reads it after the launch, and any program that sets it sets 1.
        tl.store(p_status, 1)
        failed = tl.full([], 1, tl.int32)
    values = word_values(words, value_ty)
    if not PADDED:  # (the padding's values are 0)
        if NK == 1:
            in_h = (k0 + tl.arange(0, BK) < H)[None, :]  # [1, BK]
        else:
            in_h = (k0 + tl.arange(0, NK)[:, None, None] * BK + tl.arange(0, BK)[None, None, :]) < H  # [NK, 1, BK]
        values = tl.where(in_h, values, 0.0).to(value_ty)
    return values, failed


@triton.jit
def exchange_issue(p_rows, p_tagged_rows, k0, mask_b, H, tag, TAGGED: tl.constexpr, NK: tl.constexpr,
                   BK: tl.constexpr, PADDED: tl.constexpr = False):
    """The read of an exchanged tile, to pass to exchange_settle: exchanged_tile's of p_rows (rows of
    mask_b), or TAGGED the words of p_tagged_rows (tagged_issue, PADDED as there)."""
    if TAGGED:
        tile = tagged_issue(p_tagged_rows, k0, H, tag, NK, BK, PADDED)
    else:
        tile = exchanged_tile(p_rows, k0, mask_b, H, NK, BK)
    return tile


@triton.jit
def exchange_settle(tile, p_tagged_rows, k0, H, tag, failed, p_status, max_polls, value_ty: tl.constexpr,
                    TAGGED: tl.constexpr, NK: tl.constexpr, BK: tl.constexpr, PADDED: tl.constexpr = False):
    """(the exchanged tile, failed) of exchange_issue's read: TAGGED, once its words carry tag
    (tagged_settle, PADDED as there); else the tile itself."""
    if TAGGED:
        tile, failed = tagged_settle(tile, p_tagged_rows, k0, H, tag, failed, p_status, max_polls, value_ty, NK, BK,
                                     PADDED)
    return tile, failed


@triton.jit
def batch_rows(bb, B, BB: tl.constexpr):
    """Rows [bb*BB, (bb+1)*BB) of batch block bb: their int64 indices and mask (< B)."""
    offs_b = bb * BB + tl.arange(0, BB).to(tl.int64)
    return offs_b, offs_b < B


@triton.jit
def batch_block(lengths_ptr, bb, B, BB: tl.constexpr):
    """batch_rows of batch block bb, and their lengths (0 past B)."""
    offs_b, mask_b = batch_rows(bb, B, BB)
    return offs_b, mask_b, tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)


@triton.jit
def group_steps(lengths_ptr, B, BB: tl.constexpr):
    """The longest row of the program's batch blocks: the steps of its group, which shares them."""
    steps = tl.full([], 0, tl.int64)
    for bb in range(tl.program_id(1), tl.cdiv(B, BB), tl.num_programs(1)):
        _, _, b_len = batch_block(lengths_ptr, bb, B, BB)
        steps = tl.maximum(steps, tl.max(b_len, axis=0))
    return steps


@triton.jit
def copy_slices(src_ptr, dst_ptr, B, H, BB: tl.constexpr, BH: tl.constexpr):
    """dst[d, b, j] = src[d, b, j] of (2, B, H) tensors, for the program's rows and units, in dst's dtype."""
    offs_j = tl.program_id(0) * BH + tl.arange(0, BH)
    for bb in range(tl.program_id(1), tl.cdiv(B, BB), tl.num_programs(1)):
        offs_b, mask_b = batch_rows(bb, B, BB)
        mask = mask_b[:, None] & (offs_j < H)[None, :]
        p = (tl.program_id(2) * B + offs_b[:, None]) * H + offs_j[None, :]
        tl.store(dst_ptr + p, tl.load(src_ptr + p, mask=mask).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def zero_padded_steps(ptr, lengths_ptr, T, B, H, N: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """ptr: a (T, B, 2, N*H) tensor; zeros at every t >= lengths[b] of the program's rows, units and
    direction (the kernels write every other element): the padding is defined without a memset of the
    whole tensor."""
    offs_j = tl.program_id(0) * BH + tl.arange(0, BH)  # [BH]
    mask_j = offs_j < H
    d = tl.program_id(2)
    b_zero = tl.zeros([BB, BH], dtype=ptr.dtype.element_ty)
    for bb in range(tl.program_id(1), tl.cdiv(B, BB), tl.num_programs(1)):
        offs_b, mask_b, b_len = batch_block(lengths_ptr, bb, B, BB)
        b_len = tl.where(mask_b, b_len, T)  # rows past B: nothing to pad
        for t in range(tl.min(b_len, axis=0), T):
            mask = (t >= b_len)[:, None] & mask_b[:, None] & mask_j[None, :]  # [BB, BH]
            p = ptr + ((t * B + offs_b[:, None]) * 2 + d) * (N * H) + offs_j[None, :]  # [BB, BH]
            for n in tl.static_range(N):
                tl.store(p + n * H, b_zero, mask=mask)


@triton.jit
def globaltimer():
    """The GPU's nanosecond clock (%globaltimer), read where this stands in the program (volatile)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def globaltimer_of(x):
    """%globaltimer read by each thread once its elements of x have arrived: the read is predicated on
    them, a dependency the scheduler must honour (a plain read could issue before a load returns)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $1, 2147483647; @p mov.u64 $0, %globaltimer; "
        "@!p mov.u64 $0, %globaltimer; }", "=l,r", [bits], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def globaltimer_after(x):
    """%globaltimer once every element of the tile x has arrived: read after a reduction over x (the CTA
    waits for all its threads; a scalar stamp holds fewer registers than one per element)."""
    return globaltimer_of(tl.max(x, axis=None))
