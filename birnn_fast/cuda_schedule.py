"""The plan and schedule of the CUDA cluster kernels (csrc/cuda), and a CPU model that runs it.

The index functions here are mirrored 1:1, with the same names, in csrc/cuda/schedule.cuh: which
CTA owns which units, which warp which K tiles and batch tiles, where an element sits in an MMA
fragment and in the exchanged h buffers, which buffer and barrier parity a step uses, which time
index a row takes. ``run_forward`` executes the whole forward schedule on the CPU with these
functions (per CTA, per warp, per lane of the MMA fragments, the exchange as asynchronous copies
delivered in a random order, mbarriers with transaction counts), and ``run_backward`` the backward's
likewise (its partial sums delivered as st.async blocks in a random order), so that the first
hardware run is not the first run of the indexing. The design: csrc/cuda/README.md.

A leaf module: numpy and the cells table only (the launcher and the build script import it).
"""
import dataclasses
import math
import random

import numpy as np

from .cells import cell_of

MAX_CLUSTER = 16  # CTAs in a cluster; above 8 the kernel needs the non-portable size attribute
ROWS_PER_CLUSTER = 64  # batch rows a cluster runs: the MMA's N, 8 tiles of 8, in one pass
N_TILES = ROWS_PER_CLUSTER // 8
SMEM_LIMIT = 232448  # bytes of shared memory a CTA may opt in to on sm_90 (227 KiB)
FRAGMENT_BYTES = 512  # one m16n8k16 A fragment of a warp: 32 lanes x 4 registers x 4 bytes
# The kernels' element types: fp32 layers run "tf32" (one TF32 MMA a product, where cuDNN's RNN rule
# says TF32) or "fp32" (3xTF32: a product as exact as IEEE fp32 FMAs, the rule's "ieee").
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}
HALF_DTYPES = ("bf16", "fp16")
FP32_DTYPES = ("tf32", "fp32")
K_TILE_BYTES = 32  # one MMA's K of a row: m16n8k16 of 16-bit elements, m16n8k8 of TF32
SPLITS = (2, 4, 8)  # the split-K factors (S) compiled
REGISTER_TILES = (4, 8)  # the K tiles (R) a warp keeps in registers, compiled
# fp32's (S, R): those its plans reach within shared memory (U = 8, 16, 24 or 32 units a CTA; the
# largest H, by cell and batch: tests/test_cuda_schedule.py's test_fp32_plans). S = 2 keeps 6 K tiles in registers, not 8: a warp then owns 4 batch
# tiles, whose fp32 accumulators and input rows leave no room for 8 (ptxas would spill).
FP32_VARIANTS = ((8, 4), (4, 8), (2, 6))
CELLS_BUILT = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
# The kernels' cell families: RNN_TANH and RNN_RELU are one kernel, told apart by ForwardParams.relu.
FAMILIES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "elman", "RNN_RELU": "elman"}


def kernel_name(cell, dtype, split_k, reg_k_tiles, exchange="cluster"):
    l2 = "_l2" if exchange == "l2" else ""
    return f"birnn_forward_{FAMILIES[cell]}_{dtype}{l2}_s{split_k}_r{reg_k_tiles}"


def cubin_name(cell, dtype="bf16", exchange="cluster"):
    """The cubin (csrc/cuda/build.py's UNITS) holding a cell's forward kernels of a dtype: the 16-bit
    ones in forward_<family>, fp32's (tf32 and fp32) in forward_<family>_fp32; the l2 exchange's in
    forward_<family>_l2 and forward_<family>_l2_fp32 (apart: the cluster cubins stay as they were,
    and sm_80 builds only these)."""
    return (f"forward_{FAMILIES[cell]}" + ("_l2" if exchange == "l2" else "") +
            ("_fp32" if dtype in FP32_DTYPES else ""))


def tile_k(dtype):
    """Elements of K an MMA takes (a K tile): 16 (16-bit) or 8 (TF32), 32 bytes of a row either way."""
    return K_TILE_BYTES // DTYPE_BYTES[dtype]


# (cell, dtype, S, R) of every kernel the cubins hold (one cell per family): forward.cu instantiates
# exactly these (tests/test_cuda_build.py).
INSTANCES = tuple((cell, dtype, split, reg) for cell in ("LSTM", "GRU", "RNN_TANH") for dtype in HALF_DTYPES
                  for split in SPLITS for reg in REGISTER_TILES) + \
    tuple((cell, dtype, split, reg) for cell in ("LSTM", "GRU", "RNN_TANH") for dtype in FP32_DTYPES
          for split, reg in FP32_VARIANTS)


# The l2 exchange's kernels: every (S, R) of the cluster ones, in their own cubins (l2_plan).
L2_INSTANCES = tuple((cell, dtype, split, reg) for cell in ("LSTM", "GRU", "RNN_TANH") for dtype in HALF_DTYPES
                     for split in SPLITS for reg in REGISTER_TILES) + \
    tuple((cell, dtype, split, reg) for cell in ("LSTM", "GRU", "RNN_TANH") for dtype in FP32_DTYPES
          for split, reg in FP32_VARIANTS)
# Per architecture (build.py's names): the SMs the l2 plan may fill with one CTA each, and the
# shared memory a CTA may opt in to. The launcher passes the device's own SM count.
L2_ARCHS = {"90a": (132, SMEM_LIMIT), "100a": (148, SMEM_LIMIT), "80": (108, 166912)}
L2_UNITS = (32, 24, 16, 8)  # the slices the l2 plan tries, fewest CTAs first (S = 2, 2, 4, 8)


def ceil_div(a, b):
    return -(-a // b)


def m_tiles(gates):
    """M tiles (16 gate rows) per warp: two gates per tile, 8 units each."""
    return ceil_div(gates, 2)


@dataclasses.dataclass(frozen=True)
class Plan:
    cell: str
    dtype: str
    hidden: int  # H
    batch: int  # B
    gates: int  # G
    units: int  # U, hidden units per CTA (a multiple of 8)
    cluster: int  # C, CTAs per cluster (one cluster per direction and chunk of 64 rows)
    slices: int  # slices of U units in an h buffer: C, plus zero slices for the K padding
    unit_warps: int  # U / 8
    split_k: int  # S, warps splitting one unit group's K tiles
    k_tiles: int  # ceil(H / tile_k): 16 (16-bit) or 8 (fp32) columns of W_hh a tile
    warp_k_tiles: int  # KW = ceil(k_tiles / S)
    reg_k_tiles: int  # R, the first R of a warp's K tiles, held in registers
    smem_k_tiles: int  # the rest, in shared memory
    n_tiles: int  # batch tiles of 8 of a chunk: ceil(min(B, 64) / 8)
    chunks: int  # clusters per direction: ceil(B / 64)
    # "cluster": one thread-block cluster a (direction, chunk), h through DSMEM. "l2": C plain CTAs a
    # (direction, chunk), h through L2 as step-tagged words, a cooperative launch (l2_plan).
    exchange: str = "cluster"
    partial_slices: int = 0  # l2: the split-K partials in this many h slices of hbuf (0: their own area)

    @property
    def threads(self):
        return 32 * self.unit_warps * self.split_k

    @property
    def rows(self):
        """Rows of an h slice block (the batch padded to its 8-row tiles)."""
        return 8 * self.n_tiles

    @property
    def slice_bytes(self):
        return self.rows * self.units * DTYPE_BYTES[self.dtype]

    @property
    def hbuf_bytes(self):
        """Two h buffers (the cluster exchange: one receives while the other is read), or one (l2:
        the CTA stages the step's words into it between two CTA barriers)."""
        return (1 if self.exchange == "l2" else 2) * self.slices * self.slice_bytes

    @property
    def wsm_bytes(self):
        return self.unit_warps * self.split_k * self.smem_k_tiles * m_tiles(self.gates) * FRAGMENT_BYTES

    @property
    def partial_bytes(self):
        return self.unit_warps * self.n_tiles * (self.split_k - 1) * m_tiles(self.gates) * FRAGMENT_BYTES

    @property
    def smem_bytes(self):
        """Dynamic shared memory: hbuf, W_hh's shared part, the split-K partials, two mbarriers
        (the layout of smem_layout in schedule.cuh). l2: no mbarriers, and the partials in hbuf's
        slices where partial_slices says so."""
        if self.exchange == "l2":
            return self.hbuf_bytes + self.wsm_bytes + (0 if self.partial_slices else self.partial_bytes)
        return self.hbuf_bytes + self.wsm_bytes + self.partial_bytes + 16

    @property
    def ctas(self):
        """CTAs of the grid, all resident at once (l2: a cooperative launch, one CTA an SM)."""
        return self.cluster * 2 * self.chunks

    @property
    def rows_per_word(self):
        """l2: the rows of one unit a tagged word carries (32 bits of payload: two 16-bit h or one fp32)."""
        return 4 // DTYPE_BYTES[self.dtype]

    @property
    def word_rows(self):
        """l2: tagged words along the rows of a slice (rows / rows_per_word)."""
        return self.rows // self.rows_per_word

    @property
    def exchange_words(self):
        """l2: the 64-bit words of the global exchange buffer: 2 parities x chunks x 2 directions x
        C slices x word_rows x U."""
        return 2 * self.chunks * 2 * self.cluster * self.word_rows * self.units

    @property
    def expect_bytes(self):
        """The bytes a CTA's full barrier waits for in a step: one slice from each peer."""
        return (self.cluster - 1) * self.slice_bytes

    @property
    def grid(self):
        return (self.cluster, 2, self.chunks)

    @property
    def kernel(self):
        return kernel_name(self.cell, self.dtype, self.split_k, self.reg_k_tiles, self.exchange)

    @property
    def cubin(self):
        return cubin_name(self.cell, self.dtype, self.exchange)


def _built_gates(cell, dtype, fit):
    """The cell's gate count, or a ValueError where no kernel is built for the dtype (or, ``fit``, the cell)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"the CUDA kernels take {', '.join(DTYPE_BYTES)}, got {dtype}")
    if cell not in CELLS_BUILT and fit:
        raise ValueError(f"the CUDA kernels run {', '.join(CELLS_BUILT)} so far, got {cell}")
    return cell_of(cell).gates


def plan(cell, hidden, batch, dtype, fit=True):
    """The launch plan of one layer, or a ValueError saying why the kernels cannot take it. With
    ``fit=False`` the limits of the hardware (cluster size, shared memory) are not applied: the
    CPU model runs such plans too."""
    gates = _built_gates(cell, dtype, fit)
    units = max(8, 8 * ceil_div(ceil_div(hidden, MAX_CLUSTER), 8))
    cluster = ceil_div(hidden, units)
    k_tiles = ceil_div(hidden, tile_k(dtype))
    slices = max(cluster, ceil_div(tile_k(dtype) * k_tiles, units))
    unit_warps = units // 8
    split_k = max(1, 8 // unit_warps)
    if split_k not in SPLITS and fit:
        raise ValueError(f"H = {hidden} needs {units} units a CTA: more than one cluster of {MAX_CLUSTER} "
                         "CTAs can hold (l2_plan: the l2 exchange)")
    warp_k_tiles = ceil_div(k_tiles, split_k)
    reg_k_tiles = 4 if warp_k_tiles <= 4 else 8
    if dtype in FP32_DTYPES and split_k == 2 and reg_k_tiles == 8:
        reg_k_tiles = 6
    if fit and dtype in FP32_DTYPES and (split_k, reg_k_tiles) not in FP32_VARIANTS:
        raise ValueError(f"H = {hidden} in fp32 needs {units} units a CTA: its W_hh does not fit one cluster "
                         "(l2_plan: the l2 exchange)")
    n_tiles = ceil_div(min(max(batch, 1), ROWS_PER_CLUSTER), 8)
    result = Plan(cell, dtype, hidden, batch, gates, units, cluster, slices, unit_warps, split_k, k_tiles,
                  warp_k_tiles, reg_k_tiles, max(0, warp_k_tiles - reg_k_tiles), n_tiles,
                  ceil_div(max(batch, 1), ROWS_PER_CLUSTER))
    if fit and result.smem_bytes > SMEM_LIMIT:
        raise ValueError(f"H = {hidden}, B = {batch} ({dtype}) needs {result.smem_bytes} bytes of shared memory "
                         f"a CTA, more than {SMEM_LIMIT} in one cluster (l2_plan: the l2 exchange)")
    return result


def l2_plan(cell, hidden, batch, dtype, sms=L2_ARCHS["90a"][0], smem_limit=SMEM_LIMIT, fit=True):
    """The launch plan of one layer with the l2 exchange (where one cluster a direction cannot hold
    W_hh, and on sm_80), or a ValueError saying why it cannot run. C CTAs a (direction, chunk of 64
    rows), CTA ``rank`` owning U units with all their gates as the cluster plan's, W_hh on chip as
    there; the largest U of L2_UNITS (at most the cluster plan's) whose grid, one CTA an SM, fits
    ``sms`` and whose shared memory fits ``smem_limit``. Every CTA of the grid must be resident at
    once (the readers poll the writers' words): the launch is cooperative and the plan says how many
    CTAs it needs (``ctas``). ``fit=False``: the largest U within ``sms``, shared memory and the
    compiled (S, R) unchecked (the CPU model)."""
    gates = _built_gates(cell, dtype, fit)
    widest = max(8, 8 * ceil_div(ceil_div(hidden, MAX_CLUSTER), 8))
    k_tiles = ceil_div(hidden, tile_k(dtype))
    n_tiles = ceil_div(min(max(batch, 1), ROWS_PER_CLUSTER), 8)
    chunks = ceil_div(max(batch, 1), ROWS_PER_CLUSTER)
    candidates = []
    for units in (u for u in L2_UNITS if u <= widest):
        cluster = ceil_div(hidden, units)
        slices = max(cluster, ceil_div(tile_k(dtype) * k_tiles, units))
        unit_warps = units // 8
        split_k = 8 // unit_warps
        warp_k_tiles = ceil_div(k_tiles, split_k)
        reg_k_tiles = 4 if warp_k_tiles <= 4 else 8
        if dtype in FP32_DTYPES and split_k == 2 and reg_k_tiles == 8:
            reg_k_tiles = 6
        result = Plan(cell, dtype, hidden, batch, gates, units, cluster, slices, unit_warps, split_k, k_tiles,
                      warp_k_tiles, reg_k_tiles, max(0, warp_k_tiles - reg_k_tiles), n_tiles, chunks, "l2")
        # The partials alias hbuf's slices past the CTA's own (partial_slice) where 2P <= C: hbuf holds
        # only staged h, rewritten each step after the CTA barrier that ends the partials' reads.
        needed = ceil_div(result.partial_bytes, result.slice_bytes)
        if result.partial_bytes and 2 * needed <= cluster:
            result = dataclasses.replace(result, partial_slices=needed)
        candidates.append(result)
        built = dtype not in FP32_DTYPES or (split_k, result.reg_k_tiles) in FP32_VARIANTS
        if built and result.ctas <= sms and result.smem_bytes <= smem_limit:
            return result
    if not fit:  # the largest U within the SMs (the model's tests force a U by sms), else the largest
        return next((c for c in candidates if c.ctas <= sms), candidates[0])
    resident = [c for c in candidates if c.ctas <= sms]
    if not resident:
        raise ValueError(f"H = {hidden}, B = {batch} ({dtype}) needs at least {candidates[0].ctas} CTAs resident at "
                         f"once with the l2 exchange (U = {candidates[0].units}), more than the {sms} SMs")
    built = [c for c in resident if dtype not in FP32_DTYPES or (c.split_k, c.reg_k_tiles) in FP32_VARIANTS]
    if not built:
        raise ValueError(f"H = {hidden}, B = {batch} ({dtype}): no compiled (S, R) of the l2 exchange within {sms} SMs")
    raise ValueError(f"H = {hidden}, B = {batch} ({dtype}) needs {min(c.smem_bytes for c in built)} bytes of shared "
                     f"memory a CTA with the l2 exchange within {sms} SMs, more than {smem_limit}")


# --- The index functions (schedule.cuh mirrors each, same name and arguments) -------------------

def unit_of(p, rank, unit_warp, group):
    """The hidden unit of lane group ``group`` (lane // 4) in unit warp ``unit_warp`` of CTA ``rank``."""
    return rank * p.units + 8 * unit_warp + group


def tile_gate(mt, row):
    """The gate of row ``row`` (0-15) of M tile ``mt``: tile mt holds gates 2mt (rows 0-7) and 2mt+1."""
    return 2 * mt + (row >> 3)


def w_row(H, gate, unit):
    """The row of W_hh (G*H, H) of one gate of a unit (torch's gate-major layout)."""
    return gate * H + unit


def warp_k_tile(p, ks, i):
    """The K tile (16 columns) of step ``i`` of split ``ks``'s K loop."""
    return ks * p.warp_k_tiles + i


def tile_owner(p, nt):
    """The split whose warp adds the partial sums of batch tile ``nt`` and runs its cell math."""
    return nt % p.split_k


def partial_slot(ks_from, owner):
    """Where split ``ks_from`` leaves its partial of a tile that ``owner`` sums: its slot among the
    S-1 other splits."""
    return ks_from - (1 if ks_from > owner else 0)


def partial_index(p, unit_warp, nt, slot, mt):
    """The A-fragment-sized (512-byte) block of a partial in the partials area."""
    return ((unit_warp * p.n_tiles + nt) * (p.split_k - 1) + slot) * m_tiles(p.gates) + mt


def wsm_index(p, warp, j, mt):
    """The 512-byte block of smem-resident K tile j (0-based past the register tiles) of a warp."""
    return (warp * p.smem_k_tiles + j) * m_tiles(p.gates) + mt


def h_slice(p, k):
    """(slice, column) of h's unit k in the exchanged buffers: slices of U units."""
    return k // p.units, k % p.units


def swizzled_offset(width, row, col):
    """Element offset of (row, column) in a block of rows of ``width`` 16-bit elements (a multiple of
    8), the 16-byte chunks of a row XOR-swizzled so that ldmatrix's 8 rows of one chunk fall in
    distinct bank groups. Row r starts at bank group (r * chunks) % 8: with m the largest power of two
    dividing the chunk count (at most 8), 8 consecutive rows start at 8 / m groups, each m times; the
    XOR with (r >> log2(8 / m)) % m, which keeps a chunk inside its aligned group of m, spreads them
    (odd counts need none)."""
    chunks = width // 8
    chunk = col >> 3
    m = min(chunks & -chunks, 8)
    if m > 1:
        shift = int(math.log2(8 // m))
        chunk ^= (row >> shift) & (m - 1)
    return row * width + chunk * 8 + (col & 7)


def h_offset(p, row, col):
    """Element offset of (batch row, column) within a slice block of rows x U (swizzled_offset)."""
    return swizzled_offset(p.units, row, col)


def hbuf_offset(p, buffer, slice_, row, col):
    """Element offset in hbuf[2][slices][rows][U]."""
    return ((buffer * p.slices + slice_) * p.rows) * p.units + h_offset(p, row, col)


def hbuf_offset32(p, buffer, slice_, row, col):
    """Element offset in the fp32 kernels' hbuf[2][slices][rows][U] of 4-byte elements, laid out byte
    for byte as a 16-bit one of width 2U (hbuf_offset's swizzle over 16-byte chunks of 4 elements):
    ldmatrix.x4 of 16-bit matrices then hands lane 4g + q the fp32 element (row g, column q) of each
    8 x 4 block, the TF32 B fragment."""
    return ((buffer * p.slices + slice_) * p.rows * 2 * p.units + swizzled_offset(2 * p.units, row, 2 * col)) >> 1


def read_buffer(s):
    """The h buffer step s reads (h entering step s); it writes h_{s+1} into the other one."""
    return s & 1


def phase_parity(s):
    """The phase parity of full[read_buffer(s)] that step s >= 1 waits for: full[1] completes for
    steps 1, 3, 5..., full[0] for 2, 4, 6... (each armed at the start, then re-armed by the step that
    waited on it, for the step two later)."""
    return ((s - 1) >> 1) & 1


def word_tag(s):
    """l2: the tag of the words carrying h_s (h0 is never exchanged: tags start at 1). A word's slot is
    (parity s % 2, slice, word row, column); the launcher fills the buffer with tag -1 first, so no
    word of an earlier launch is taken for this one's."""
    return s


def exchange_word(p, word_rows, chunks, parity, direction, chunk, slice_, word_row, col):
    """l2: the 64-bit word (payload: 32 bits of h, ``rows_per_word`` rows of unit ``col`` of the
    slice; tag: word_tag of its step) in the global buffer [2][chunks][2][C][word_rows][U]: a
    slice's words contiguous (its owner's stores), a word row's U words contiguous (a warp's loads)."""
    return ((((parity * chunks + chunk) * 2 + direction) * p.cluster + slice_) * word_rows + word_row) * p.units + col


def staged_word(p, word_rows, rank, w):
    """l2: (slice, word row, column) of the w-th word CTA ``rank`` stages at a step: every word of the
    other C-1 slices (its own it wrote itself; the K padding's slices are zero and never exchanged)."""
    per_slice = word_rows * p.units
    other = w // per_slice
    within = w - other * per_slice
    return other + (other >= rank) * 1, within // p.units, within % p.units


def partial_slice(partial_slices, rank):
    """l2 with partial_slices = P > 0: the first of the P h slices of hbuf the split-K partials take
    in CTA ``rank``: never its own slice (the cell math reads its h_s there after the partials'
    writes), never the K padding's (zeros the MMA reads): 0 .. P-1, or rank+1 .. rank+P for ranks
    below P (the plan has 2P <= C)."""
    return 0 if rank >= partial_slices else rank + 1


def xg_gates(gates):
    """The input projection's slots per unit: 4 (one 8-byte load; GRU's fourth is 0) or 1 (RNN)."""
    return 4 if gates > 1 else 1


def xg_offset(p, base, unit, gates):
    """Element offset of (row base = (t * B + b) * 2 + direction, unit) in the input projection, laid
    out (T, B, 2, H, xg_gates(G)) by the launcher: a unit's gates adjacent, one load for its owner."""
    return (base * p.hidden + unit) * xg_gates(gates)


def step_time(direction, s, length):
    """The time index row b takes at step s (s < length): forward s, reverse length-1-s."""
    return s if direction == 0 else length - 1 - s


# m16n8k16 fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4*group + quad.
def a_coords(lane, reg):
    """(row, k) of the first of the two elements of A register ``reg`` (0-3) of a lane."""
    group, quad = lane >> 2, lane & 3
    return group + 8 * (reg & 1), 2 * quad + 8 * (reg >> 1)


def b_coords(lane, reg):
    """(k, n) of the first of the two elements of B register ``reg`` (0-1)."""
    group, quad = lane >> 2, lane & 3
    return 2 * quad + 8 * reg, group


def a_coords32(lane, reg):
    """(row, k) of A register ``reg`` (0-3) of m16n8k8 TF32: one element, at half a_coords' k (the
    same bytes of the row)."""
    row, k = a_coords(lane, reg)
    return row, k >> 1


def b_coords32(lane, reg):
    """(k, n) of B register ``reg`` (0-1) of m16n8k8 TF32: one element."""
    group, quad = lane >> 2, lane & 3
    return quad + 4 * reg, group


def c_coords(lane, reg):
    """(row, n) of accumulator ``reg`` (0-3)."""
    group, quad = lane >> 2, lane & 3
    return group + 8 * (reg >> 1), 2 * quad + (reg & 1)


def ldmatrix_row(lane, nt_pair, k_tile):
    """The (batch row, k) whose 8 contiguous elements lane ``lane`` points ldmatrix.x4 at, to load
    the B fragments of batch tiles 2*nt_pair, 2*nt_pair+1 for one K tile: matrices (k0, nt),
    (k0+8, nt), (k0, nt+1), (k0+8, nt+1)."""
    matrix, r = lane >> 3, lane & 7
    return 8 * (2 * nt_pair + (matrix >> 1)) + r, 16 * k_tile + 8 * (matrix & 1)


# --- The CPU model --------------------------------------------------------------------------------

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class _Barrier:
    """An mbarrier: a phase completes when its pending arrivals and its transaction count reach 0."""

    def __init__(self, arrivals):
        self.arrivals, self.pending, self.tx, self.phase = arrivals, arrivals, 0, 0

    def _check(self):
        if self.pending == 0 and self.tx == 0:
            self.phase ^= 1
            self.pending = self.arrivals

    def arrive_expect_tx(self, nbytes):
        self.tx += nbytes
        self.pending -= 1
        self._check()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        assert self.tx > -(1 << 20)
        self._check()

    def ready(self, parity):
        """try_wait.parity: the phase with this parity has completed."""
        return self.phase != parity


class _Cta:
    """One CTA's shared memory and registers in the model."""

    def __init__(self, p, rank, direction, chunk, weight_hh, dtype):
        self.p, self.rank, self.direction, self.chunk = p, rank, direction, chunk
        self.hbuf = np.zeros(2 * p.slices * p.rows * p.units, dtype=dtype)
        self.tags = np.full((2, p.slices), -1)  # the step whose h a slice of a buffer holds; -2: padding
        self.read_done = -1  # the last step whose reads of hbuf are finished
        self.full = [_Barrier(1), _Barrier(1)]
        self.step = 0
        # A fragments of every warp, K tile and M tile as (16, 16) tiles, gathered lane by lane
        # through a_coords (what the kernel loads into registers and shared memory alike).
        G, H = p.gates, p.hidden
        lanes, regs = np.arange(32)[:, None], np.arange(4)[None, :]
        wide = DTYPE_BYTES[p.dtype] == 4
        row, k = (a_coords32 if wide else a_coords)(lanes, regs)  # [32, 4]
        width, per_register = tile_k(p.dtype), 1 if wide else 2
        self.a_tiles = {}
        for warp in range(p.unit_warps * p.split_k):
            unit_warp, ks = warp % p.unit_warps, warp // p.unit_warps
            unit = unit_of(p, rank, unit_warp, row & 7)
            for i in range(p.warp_k_tiles):
                kt = warp_k_tile(p, ks, i)
                for mt in range(m_tiles(G)):
                    gate = tile_gate(mt, row)
                    tile = np.zeros((16, width), dtype=dtype)
                    for e in range(per_register):
                        kk = width * kt + k + e
                        ok = (gate < G) & (unit < H) & (kk < H) & (kt < p.k_tiles)
                        values = weight_hh[np.where(ok, w_row(H, gate, unit), 0), np.where(ok, kk, 0)]
                        assert not tile[row, k + e].any(), "two lanes load one A element"
                        tile[row, k + e] = np.where(ok, values, 0.0)
                    self.a_tiles[warp, i, mt] = tile


def _hbuf_offset(p):
    """The h buffers' offset function of the plan's element size."""
    return hbuf_offset32 if DTYPE_BYTES[p.dtype] == 4 else hbuf_offset


def _b_offsets(p, buffer, nt, kt):
    """The hbuf offsets (tile_k, 8) of the B tile (k, n) of batch tile nt, K tile kt, as ldmatrix.x4
    reads it, and the slices it reads. fp32: the kernel halves ldmatrix_row's k (its 16-bit column)
    and each lane gets one element of its 16-byte row, B fragment b_coords32."""
    lanes = np.arange(32)
    wide = DTYPE_BYTES[p.dtype] == 4
    row, k = ldmatrix_row(lanes, nt // 2, kt)  # lane -> the row its pointer gives ldmatrix
    if wide:
        k = k >> 1
    slices, cols = h_slice(p, k)
    width, half = tile_k(p.dtype), tile_k(p.dtype) // 2
    offsets = np.zeros((width, 8), dtype=np.int64)
    for reg in range(2):
        kk, n = (b_coords32 if wide else b_coords)(lanes, reg)
        matrix = 2 * (nt & 1) + reg  # x4 order: (k0, nt), (k0+half, nt), (k0, nt+1), (k0+half, nt+1)
        source = 8 * matrix + (lanes >> 2)  # the lane whose pointer holds this lane's row
        assert (row[source] == 8 * nt + n).all() and (k[source] == width * kt + half * reg).all()
        if wide:
            offsets[kk, n] = hbuf_offset32(p, buffer, slices[source], row[source], cols[source] + (lanes & 3))
            continue
        for e in range(2):
            offsets[kk + e, n] = hbuf_offset(p, buffer, slices[source], row[source], cols[source] + 2 * (lanes & 3) + e)
    return offsets, set(slices.tolist())


def run_forward(cell, input, weights, h0, c0, lengths, seed=0, fit=False, kernel_dtype="bf16", exchange="cluster",
                parities=2, sms=L2_ARCHS["90a"][0]):
    """``birnn_fast::forward`` computed by the model of the CUDA schedule: (output, h_n, c_n,
    workspace) as numpy arrays of input's dtype (float64 or float32 arrays or CPU tensors), NaN
    where nothing wrote; every cell, without projections, as the kernels. ``seed`` picks the
    interleaving of the CTAs' steps and the copies' deliveries; ``kernel_dtype`` the kernels' plan
    and fragment layouts (16-bit: "bf16"; fp32: "tf32" or "fp32", one layout), the arithmetic
    being input's. ``exchange="l2"``: the l2 plan (``sms``) and exchange, each tagged word a store
    of its own landing at a random time; ``parities`` the slots a word has by step (2, the kernel's;
    1 shows why one is not enough: an AssertionError)."""
    input, h0, c0 = (np.asarray(x) for x in (input, h0, c0))
    weights = [np.asarray(w) for w in weights]
    lengths = np.asarray(lengths).astype(np.int64)
    T, B, _ = input.shape
    G = cell_of(cell).gates
    if len(weights) != 8:
        raise ValueError("the model runs layers without projections, as the kernels")
    H = weights[1].shape[0] // G
    l2 = exchange == "l2"
    p = l2_plan(cell, H, B, kernel_dtype, sms=sms, fit=fit) if l2 else plan(cell, H, B, kernel_dtype, fit=fit)
    hbuf_offset = _hbuf_offset(p)
    dtype = input.dtype
    rng = random.Random(seed)
    output = np.full((T, B, 2 * H), np.nan, dtype=dtype)
    h_n = np.full((2, B, H), np.nan, dtype=dtype)
    c_n = np.full((2, B, H) if cell == "LSTM" else (0,), np.nan, dtype=dtype)
    workspace = np.full((T, B, 2, cell_of(cell).saved * H), np.nan, dtype=dtype)
    xg = np.zeros((T, B, 2, H, xg_gates(G)), dtype=dtype)  # the launcher's GEMM, biases included, unit-major
    b_hn = np.zeros((2, H), dtype=dtype)  # GRU: r scales W_hn h + b_hn, so b_hn stays apart
    for d in range(2):
        bias = weights[4 * d + 2] + weights[4 * d + 3]
        if cell == "GRU":
            bias[2 * H:] = weights[4 * d + 2][2 * H:]
            b_hn[d] = weights[4 * d + 3][2 * H:]
        projection = input @ weights[4 * d].T + bias  # [T, B, G*H]
        xg[:, :, d, :, :G] = projection.reshape(T, B, G, H).transpose(0, 1, 3, 2)
    xg = xg.reshape(-1)
    b_offsets = {(buffer, nt, kt): _b_offsets(p, buffer, nt, kt)
                 for buffer in range(2) for nt in range(p.n_tiles) for kt in range(p.k_tiles)}
    clusters = {(d, chunk): [_Cta(p, rank, d, chunk, weights[4 * d + 1], dtype) for rank in range(p.cluster)]
                for d in range(2) for chunk in range(p.chunks)}
    in_flight = []  # (destination CTA, buffer, slice, data, source CTA, step of the data)
    lanes, columns = np.arange(32)[:, None], np.arange(2)[None, :]  # an owner's elements: [32, 2]
    # l2: the global buffer of tagged words of each (direction, chunk): tags and payloads (the
    # rows_per_word values of a word) of [parity][slice][word row][column], filled with tag -1 by
    # the launcher. A word is one store and one load (single-copy atomic): its tag and payload land
    # together. in_flight holds ("word", group, slot, values, tag) stores not yet visible.
    words, arrived = {}, {}  # arrived[(direction, chunk)][tag]: words landed with that tag, by slice
    if l2:
        rpw = p.rows_per_word
        for key in clusters:
            words[key] = (np.full((parities, p.cluster, p.word_rows, p.units), -1),
                          np.zeros((parities, p.cluster, p.word_rows, p.units, rpw), dtype=dtype))
            arrived[key] = {}

    def owned(cta, unit_warp, nt):
        """The (unit, batch row, chunk row) of each owner lane's two elements of batch tile nt: [32, 2]."""
        unit = np.broadcast_to(unit_of(p, cta.rank, unit_warp, lanes >> 2), (32, 2))
        row = 8 * nt + 2 * (lanes & 3) + columns
        return unit, cta.chunk * ROWS_PER_CLUSTER + row, row

    def cluster_steps(cta):
        """The steps of a cluster: the longest of its chunk's rows."""
        return int(lengths[cta.chunk * ROWS_PER_CLUSTER:(cta.chunk + 1) * ROWS_PER_CLUSTER].max())

    def prologue(cta):
        # h0 into buffer 0, every slice (no exchange needed for it); buffer 1 and the K padding zero.
        d = cta.direction
        cta.staged = 0  # l2: the last step whose words the CTA has read (h0: none to read)
        for slice_ in range(p.slices):
            padding = slice_ >= p.cluster
            cta.tags[:, slice_] = (-2, -2) if padding else (0, -1)
            row, col = np.meshgrid(np.arange(p.rows), np.arange(p.units), indexing="ij")
            b, k = cta.chunk * ROWS_PER_CLUSTER + row, slice_ * p.units + col
            ok = (b < B) & (k < H)
            values = h0[d, np.minimum(b, B - 1), np.minimum(k, H - 1)]
            cta.hbuf[hbuf_offset(p, 0, slice_, row, col)] = np.where(ok, values, 0.0)
        # The owners' c (fp32 registers in the kernel; 0 for cells without): [unit warp, nt, lane,
        # column]. Their h lives in the h buffers only: an ended row passes it on from the buffer it
        # reads to the next.
        cta.c = np.zeros((p.unit_warps, p.n_tiles, 32, 2), dtype=dtype)
        for unit_warp in range(p.unit_warps):
            for nt in range(p.n_tiles):
                unit, b, _ = owned(cta, unit_warp, nt)
                ok = (unit < H) & (b < B)
                if cell == "LSTM":
                    cta.c[unit_warp, nt] = np.where(ok, c0[d, np.minimum(b, B - 1), np.minimum(unit, H - 1)], 0.0)
        if not l2:
            cta.full[1].arrive_expect_tx(p.expect_bytes)  # for step 1
            cta.full[0].arrive_expect_tx(p.expect_bytes)  # for step 2

    def l2_ready(cta, s):
        """Every word CTA ``cta`` stages at step s has landed with word_tag(s) (the kernel's polls
        succeed; l2_stage checks each word's tag itself)."""
        counts = arrived[cta.direction, cta.chunk].get(word_tag(s))
        if counts is None:
            return p.cluster == 1  # one CTA a direction: nothing to stage
        return int(counts.sum() - counts[cta.rank]) == (p.cluster - 1) * p.word_rows * p.units

    def l2_stage(cta, s):
        """The polls and staging of step s: every word of the other slices, as the kernel's threads
        walk them (staged_word), into hbuf (buffer 0) rows rows_per_word * word_row + j."""
        tags, values = words[cta.direction, cta.chunk]
        seen = np.zeros((p.cluster, p.word_rows, p.units), dtype=np.int64)
        slice_, word_row, col = staged_word(p, p.word_rows, cta.rank, np.arange((p.cluster - 1) * p.word_rows * p.units))
        assert (slice_ != cta.rank).all() and (0 <= slice_).all() and (slice_ < p.cluster).all()
        index = exchange_word(p, p.word_rows, p.chunks, s % 2, cta.direction, cta.chunk, slice_, word_row, col)
        assert (0 <= index).all() and (index < p.exchange_words).all()
        assert (tags[s % parities, slice_, word_row, col] == word_tag(s)).all(), "a word of another step staged"
        np.add.at(seen, (slice_, word_row, col), 1)
        for j in range(rpw):
            cta.hbuf[hbuf_offset(p, 0, slice_, rpw * word_row + j, col)] = values[s % parities, slice_, word_row, col, j]
        others = [slice_ for slice_ in range(p.cluster) if slice_ != cta.rank]
        assert (seen[others] == 1).all() and (seen[cta.rank] == 0).all(), "a word staged twice or not at all"
        cta.tags[0, others] = s
        cta.staged = s

    def l2_publish(cta, s, h_slice_values):
        """The owners' stores of h_{s+1} (their slice): one word a lane and batch tile (16-bit: its two
        rows, e = 0, 1) or two (fp32: one a row), tag word_tag(s + 1), each landing on its own."""
        written = np.zeros((p.word_rows, p.units), dtype=np.int64)
        for unit_warp, nt, h in h_slice_values:
            col = np.broadcast_to(8 * unit_warp + (lanes >> 2), (32, 2))
            row = 8 * nt + 2 * (lanes & 3) + columns  # [32, 2]
            for lane in range(32):
                for e in range(2 // rpw):
                    word_row = row[lane, rpw * e] // rpw
                    assert all(row[lane, rpw * e + j] == rpw * word_row + j for j in range(rpw))
                    payload = h[lane, rpw * e:rpw * e + rpw].copy()
                    written[word_row, col[lane, 0]] += 1
                    in_flight.append(("word", (cta.direction, cta.chunk), ((s + 1) % parities, cta.rank, word_row,
                                                                             col[lane, 0]), payload, s + 1, cta))
        assert (written == 1).all(), "a word of the slice written twice or not at all in a step"

    def l2_deliver(copy):
        _, key, slot, payload, tag, writer = copy
        tags, values = words[key]
        old = tags[slot]
        assert old < tag, "a word's stores landed out of their order"
        readers = [cta for cta in clusters[key] if cta is not writer]
        assert old < 1 or all(reader.staged >= old for reader in readers), \
            "a word overwrote one a reader had not read yet"
        tags[slot] = tag
        values[slot] = payload
        counts = arrived[key].setdefault(tag, np.zeros(p.cluster, dtype=np.int64))
        counts[slot[1]] += 1
        return [reader for reader in readers if reader.step == tag]

    def b_tile(cta, buffer, nt, kt):
        offsets, slices = b_offsets[buffer, nt, kt]
        for slice_ in slices:
            assert cta.tags[buffer, slice_] in (cta.step, -2), "a read of h from another step"
        return cta.hbuf[offsets]

    def compute_step(cta, s):
        d, steps = cta.direction, cta.steps
        buffer = 0 if l2 else read_buffer(s)
        if l2 and s >= 1:
            l2_stage(cta, s)
        acc = {}
        for warp in range(p.unit_warps * p.split_k):
            unit_warp, ks = warp % p.unit_warps, warp // p.unit_warps
            for nt in range(p.n_tiles):
                for mt in range(m_tiles(G)):
                    total = np.zeros((16, 8), dtype=dtype)
                    for i in range(p.warp_k_tiles):
                        kt = warp_k_tile(p, ks, i)
                        if kt < p.k_tiles:
                            total += cta.a_tiles[warp, i, mt] @ b_tile(cta, buffer, nt, kt)
                    acc[unit_warp, ks, nt, mt] = total
        cta.read_done = s
        # The reduce-scatter: every split but the owner leaves its partial in its slot.
        partials = {}
        for (unit_warp, ks, nt, mt), value in acc.items():
            owner = tile_owner(p, nt)
            if ks != owner:
                index = partial_index(p, unit_warp, nt, partial_slot(ks, owner), mt)
                assert index not in partials and 0 <= index * FRAGMENT_BYTES < p.partial_bytes
                partials[index] = value
        if l2 and p.partial_slices:
            # The partials in hbuf's slices (after a CTA barrier: every warp's products are done):
            # never the CTA's own slice or the K padding; garbage there until the next step's staging.
            first = partial_slice(p.partial_slices, cta.rank)
            assert not first <= cta.rank < first + p.partial_slices and first + p.partial_slices <= p.cluster
            assert p.partial_bytes <= p.partial_slices * p.slice_bytes
            for slice_ in range(first, first + p.partial_slices):
                low = hbuf_offset(p, 0, slice_, 0, 0)
                cta.hbuf[low:low + p.rows * p.units] = np.nan
                cta.tags[0, slice_] = -3
        next_buffer = 0 if l2 else read_buffer(s + 1)
        published = []
        for unit_warp in range(p.unit_warps):
            for nt in range(p.n_tiles):
                owner = tile_owner(p, nt)
                tiles = []
                for mt in range(m_tiles(G)):
                    total = acc[unit_warp, owner, nt, mt].copy()
                    for ks in range(p.split_k):
                        if ks != owner:
                            total += partials[partial_index(p, unit_warp, nt, partial_slot(ks, owner), mt)]
                    tiles.append(total)
                unit, b, row = owned(cta, unit_warp, nt)
                pre = []
                for gate in range(G):
                    tile_row, n = c_coords(lanes, 2 * (gate & 1) + columns)
                    assert (tile_gate(gate >> 1, tile_row) == gate).all() and (n == row - 8 * nt).all()
                    assert (unit_of(p, cta.rank, unit_warp, tile_row & 7) == unit).all()
                    pre.append(tiles[gate >> 1][tile_row, n])
                valid = (unit < H) & (b < B)
                length = lengths[np.minimum(b, B - 1)]
                active = valid & (s < length)
                padding = valid & (s >= length)
                output[s, b[padding], d * H + unit[padding]] = 0.0
                for slot in range(cell_of(cell).saved):
                    workspace[s, b[padding], d, slot * H + unit[padding]] = 0.0
                t = np.broadcast_to(step_time(d, s, length), length.shape)
                base = (np.where(active, t, 0) * B + np.minimum(b, B - 1)) * 2 + d
                gx = [xg[xg_offset(p, base, np.minimum(unit, H - 1), G) + gate] for gate in range(G)]
                slices, cols = h_slice(p, unit)
                assert (slices == cta.rank).all()
                h_prev = cta.hbuf[hbuf_offset(p, buffer, slices, row, cols)]
                c_new = cta.c[unit_warp, nt]
                if cell == "LSTM":
                    i, f, o = (_sigmoid(gx[j] + pre[j]) for j in (0, 1, 3))
                    g = np.tanh(gx[2] + pre[2])
                    c_new = f * cta.c[unit_warp, nt] + i * g
                    h_new = o * np.tanh(c_new)
                    saved = (i, f, g, o, c_new)
                elif cell == "GRU":
                    r, z = (_sigmoid(gx[j] + pre[j]) for j in (0, 1))
                    hidden_n = pre[2] + b_hn[d, np.minimum(unit, H - 1)]
                    n = np.tanh(gx[2] + r * hidden_n)
                    h_new = (1 - z) * n + z * h_prev
                    saved = (r, z, n, hidden_n)
                else:
                    h_new = np.tanh(gx[0] + pre[0]) if cell == "RNN_TANH" else np.maximum(gx[0] + pre[0], 0.0)
                    saved = ()
                h = np.where(active, h_new, h_prev)
                cta.c[unit_warp, nt] = np.where(active, c_new, cta.c[unit_warp, nt])
                output[t[active], b[active], d * H + unit[active]] = h_new[active]
                for slot, value in enumerate(saved):
                    workspace[t[active], b[active], d, slot * H + unit[active]] = value[active]
                last = active & (s == length - 1)
                h_n[d, b[last], unit[last]] = h_new[last]
                if cell == "LSTM":
                    c_n[d, b[last], unit[last]] = c_new[last]
                cta.hbuf[hbuf_offset(p, next_buffer, slices, row, cols)] = h
                published.append((unit_warp, nt, h))
        if l2:
            cta.tags[0, cta.rank] = s + 1
            if s + 1 < steps and p.cluster > 1:  # (one CTA a direction: no reader, nothing to publish)
                l2_publish(cta, s, published)
        elif s + 1 < steps:
            # Our own slice of the next buffer (last read in step s-1: read_done >= s-1), sent to each peer.
            cta.tags[next_buffer, cta.rank] = s + 1
            low = hbuf_offset(p, next_buffer, cta.rank, 0, 0)
            data = cta.hbuf[low:low + p.rows * p.units].copy()
            for peer in clusters[cta.direction, cta.chunk]:
                if peer is not cta:
                    in_flight.append((peer, next_buffer, cta.rank, data, cta, s + 1))

    def deliver(copy):
        if copy[0] == "word":
            return l2_deliver(copy)
        peer, buffer, slice_, data, source, step = copy
        # A bulk copy reads its source while in flight: the source must still hold that step's h,
        # and the peer must have finished reading what it overwrites (the h of step - 2).
        assert source.tags[buffer, source.rank] == step, "a copy's source was overwritten before it was read"
        assert peer.read_done >= step - 2, "a copy overwrote an h slice the peer had not finished reading"
        assert peer.tags[buffer, slice_] in (-1, step - 2)
        low = hbuf_offset(p, buffer, slice_, 0, 0)
        peer.hbuf[low:low + p.rows * p.units] = data
        peer.tags[buffer, slice_] = step
        peer.full[buffer].complete_tx(p.slice_bytes)

    ctas = [cta for group in clusters.values() for cta in group]
    for index, cta in enumerate(ctas):
        cta.index = index
        cta.steps = cluster_steps(cta)
        prologue(cta)

    def l2_can_run(cta):
        return cta.step < cta.steps and (cta.step == 0 or l2_ready(cta, cta.step))

    # l2: only a CTA's step (its own) or a word landing (the readers waiting for its tag) changes
    # whether a CTA can run.
    runnable = {cta.index for cta in ctas if l2_can_run(cta)} if l2 else set()
    while l2 and (runnable or in_flight):
        order = sorted(runnable)
        choice = rng.randrange(len(order) + len(in_flight))
        if choice < len(order):
            cta = ctas[order[choice]]
            compute_step(cta, cta.step)
            cta.step += 1
            affected = [cta]
        else:
            in_flight[choice - len(order)], in_flight[-1] = in_flight[-1], in_flight[choice - len(order)]
            affected = deliver(in_flight.pop())
        for cta in affected:
            (runnable.add if l2_can_run(cta) else runnable.discard)(cta.index)
    while not l2:
        runnable = [cta for cta in ctas if cta.step < cta.steps and
                    (cta.step == 0 or (l2_ready(cta, cta.step) if l2 else
                                       cta.full[read_buffer(cta.step)].ready(phase_parity(cta.step))))]
        if not runnable and not in_flight:
            break
        choice = rng.randrange(len(runnable) + len(in_flight))
        if choice < len(runnable):
            cta = runnable[choice]
            if cta.step >= 1 and not l2:
                # Re-armed for step + 2 (the kernel: after the step's first CTA barrier, once every
                # thread has seen this phase complete).
                cta.full[read_buffer(cta.step)].arrive_expect_tx(p.expect_bytes)
            compute_step(cta, cta.step)
            cta.step += 1
        else:
            deliver(in_flight.pop(choice - len(runnable)))
    assert all(cta.step == cta.steps for cta in ctas), "a CTA waits for h that never comes: the schedule deadlocks"
    # Steps past a chunk's longest row are padding for every row of the chunk.
    for cta in ctas:
        rows = slice(cta.chunk * ROWS_PER_CLUSTER, (cta.chunk + 1) * ROWS_PER_CLUSTER)
        units = slice(cta.rank * p.units, (cta.rank + 1) * p.units)
        output[cta.steps:, rows, cta.direction * H:(cta.direction + 1) * H][..., units] = 0.0
        for slot in range(cell_of(cell).saved):
            workspace[cta.steps:, rows, cta.direction, slot * H:(slot + 1) * H][..., units] = 0.0
    return output, h_n, c_n, workspace


# --- The backward (BPTT) -------------------------------------------------------------------------
#
# Per direction and chunk of rows a cluster of the forward's C CTAs, CTA rank owning the same U
# units. Iteration i = 0 .. steps runs step s = steps - 1 - i (the last, s = -1, only finishes
# grad_h0): the owners of (unit, row) elements add the partial sums of dh that reached them, run the
# cell's backward and write their dgates (the exchange's version: the GRU's n gate scaled by r) into
# the CTA's own B operand, dgb (rows x width, K = the CTA's G*U gate-units); then every warp multiplies
# its M tiles of W_hh^T (all C*U units, K = the CTA's gate-units: W_hh's rows of the CTA's units,
# on chip for all steps) by dgb and sends each 8-unit half tile of partial dh, fp32, to the CTA that
# owns those units (st.async into its recv[next][rank], completing on its full[next] mbarrier).
# Why partial sums and not dgates: csrc/cuda/README.md.

BACKWARD_WARPS = 8
# Chunk rows -> the largest U its kernels take; the plan takes the first that fits (r64 keeps the
# batch of 64 in one cluster for H <= 256, r32 halves the receive buffers for H <= 512).
BACKWARD_VARIANTS = {64: 16, 32: 32}
BACKWARD_MAX_REGISTER_FRAGMENTS = 16


def backward_kernel_name(cell, dtype, chunk_rows):
    return f"birnn_backward_{FAMILIES[cell]}_{dtype}_r{chunk_rows}"


def backward_cubin_name(cell, dtype="bf16"):
    """The cubin holding a cell's backward kernels of a dtype: backward_<family>, fp32's (tf32 and
    fp32) in backward_<family>_fp32."""
    return f"backward_{FAMILIES[cell]}" + ("_fp32" if dtype in FP32_DTYPES else "")


BACKWARD_INSTANCES = tuple((cell, dtype, rows) for cell in ("LSTM", "GRU", "RNN_TANH")
                           for dtype in HALF_DTYPES + FP32_DTYPES for rows in BACKWARD_VARIANTS)


def backward_bounds(gates, chunk_rows, dtype="bf16"):
    """The compile-time bounds of a variant (backward.cu's template arguments): (n tiles, local K
    tiles, M tiles a warp, register fragments a warp). A K tile is 32 bytes of dgb's row: 16 16-bit
    or 8 fp32 gate-units."""
    units = BACKWARD_VARIANTS[chunk_rows]
    k_tiles = ceil_div(gates * units, tile_k(dtype))
    warp_m_tiles = ceil_div(ceil_div(MAX_CLUSTER * units, 16), BACKWARD_WARPS)
    return chunk_rows // 8, k_tiles, warp_m_tiles, min(BACKWARD_MAX_REGISTER_FRAGMENTS, warp_m_tiles * k_tiles)


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    cell: str
    dtype: str
    hidden: int  # H
    batch: int  # B
    gates: int  # G
    units: int  # U, as the forward's
    cluster: int  # C, as the forward's
    chunk_rows: int  # batch rows a cluster runs (64 or 32: the variant)
    n_tiles: int  # batch tiles of 8 of a chunk
    chunks: int  # clusters per direction
    m_tiles: int  # M tiles of 16 units covering all C*U units
    warp_m_tiles: int  # M tiles a warp: warp + 8 j
    k_tiles: int  # K tiles (tile_k: 16 16-bit or 8 fp32) of a CTA's G*U gate-units
    fragment_stride: int  # the variant's bound on k_tiles: fragment j * stride + kt
    reg_fragments: int  # R: the first R of a warp's (M tile, K tile) fragments in registers
    smem_fragments: int  # the rest, in shared memory

    warps = BACKWARD_WARPS

    @property
    def threads(self):
        return 32 * self.warps

    @property
    def rows(self):
        return 8 * self.n_tiles

    @property
    def width(self):
        """Columns of dgb (elements of the dtype): the CTA's G*U gate-units padded to its K tiles."""
        return tile_k(self.dtype) * self.k_tiles

    @property
    def groups(self):
        """8-unit groups a CTA owns."""
        return self.units // 8

    @property
    def slot_bytes(self):
        """One sender's partials for one receiver: U units x rows, fp32."""
        return self.units * self.rows * 4

    @property
    def recv_bytes(self):
        return 2 * self.cluster * self.slot_bytes

    @property
    def dgb_bytes(self):
        return self.rows * self.width * DTYPE_BYTES[self.dtype]

    @property
    def wsm_bytes(self):
        return self.warps * self.smem_fragments * FRAGMENT_BYTES

    @property
    def smem_bytes(self):
        """recv, W_hh^T's shared part, dgb, two mbarriers (backward.cu's layout)."""
        return self.recv_bytes + self.wsm_bytes + self.dgb_bytes + 16

    @property
    def expect_bytes(self):
        return (self.cluster - 1) * self.slot_bytes

    @property
    def items(self):
        """(group, batch tile) pairs of a CTA's elements, 32 lanes x 2 rows each."""
        return self.groups * self.n_tiles

    @property
    def grid(self):
        return (self.cluster, 2, self.chunks)

    @property
    def kernel(self):
        return backward_kernel_name(self.cell, self.dtype, self.chunk_rows)

    @property
    def cubin(self):
        return backward_cubin_name(self.cell, self.dtype)


def backward_plan(cell, hidden, batch, dtype, fit=True):
    """The backward's launch plan of one layer (its units and cluster are the forward's), or a
    ValueError saying why the kernels cannot take it; ``fit=False`` as plan's."""
    forward = plan(cell, hidden, batch, dtype, fit=fit)
    gates, units, cluster = forward.gates, forward.units, forward.cluster
    m_tiles_ = ceil_div(cluster * units, 16)
    variants = [rows for rows, largest in BACKWARD_VARIANTS.items() if units <= largest]
    if not variants:
        if fit:
            raise ValueError(f"H = {hidden} needs {units} units a CTA, more than the backward's kernels take")
        variants = [32]
    result = None
    for rows in variants:
        _, bound_k, _, bound_r = backward_bounds(gates, rows, dtype)
        warp_m_tiles = ceil_div(m_tiles_, BACKWARD_WARPS)
        k_tiles = ceil_div(gates * units, tile_k(dtype))
        stride = max(bound_k, k_tiles)  # the bound, or (fit=False) enough
        fragments = (warp_m_tiles - 1) * stride + k_tiles
        registers = min(bound_r, fragments)
        n_tiles = ceil_div(min(max(batch, 1), rows), 8)
        result = BackwardPlan(cell, dtype, hidden, batch, gates, units, cluster, rows, n_tiles,
                              ceil_div(max(batch, 1), rows), m_tiles_, warp_m_tiles, k_tiles, stride, registers,
                              fragments - registers)
        if not fit or result.smem_bytes <= SMEM_LIMIT:
            return result
    raise ValueError(f"H = {hidden}, B = {batch} ({dtype}): the backward needs {result.smem_bytes} bytes of shared "
                     f"memory a CTA, more than {SMEM_LIMIT}")


# The backward's index functions (schedule.cuh mirrors each).

def bwd_step(steps, i):
    """The step iteration i runs (the last iteration, i = steps, runs s = -1: grad_h0 only)."""
    return steps - 1 - i


def bwd_warp_m_tile(p, warp, j):
    """The M tile (units 16 mt .. 16 mt + 15 of the direction) of a warp's j-th."""
    return warp + p.warps * j


def bwd_fragment(p, j, kt):
    """A warp's fragment number of (its M tile j, K tile kt), strided by the variant's bound on K
    tiles (a register fragment's number is then known at compile time): the first reg_fragments in
    registers."""
    return j * p.fragment_stride + kt


def bwd_wsm_index(p, warp, fragment):
    """The 512-byte block of a fragment past the register ones in shared memory."""
    return warp * p.smem_fragments + fragment - p.reg_fragments


def bwd_source(p, rank, kk):
    """(gate, unit) of a CTA's K index kk (its gate-units, unit-major: a unit's G gates adjacent)."""
    return kk % p.gates, rank * p.units + kk // p.gates


def bwd_destination(p, group):
    """(rank, local group) owning 8-unit group ``group`` (units 8 group .. +7) of the direction."""
    return group // p.groups, group % p.groups


def bwd_item(p, warp, o):
    """(local group, batch tile) of a warp's o-th item: its lanes own units 8 group + lane / 4, rows
    8 nt + 2 (lane % 4) + e (e = 0, 1), the accumulator layout of a half M tile."""
    q = warp + p.warps * o
    return q // p.n_tiles, q % p.n_tiles


def recv_offset(p, buffer, sender, group, nt, lane):
    """The float2 of recv[2][C][groups][n_tiles][32] a sender's lane leaves for a receiver."""
    return (((buffer * p.cluster + sender) * p.groups + group) * p.n_tiles + nt) * 32 + lane


def dgb_offset(p, row, kk):
    """Element offset of (batch row, K index) in dgb (rows x width, swizzled for ldmatrix)."""
    return swizzled_offset(p.width, row, kk)


def dgb_offset32(p, row, kk):
    """Element offset of (batch row, K index) in the fp32 kernels' dgb (rows x width of 4-byte
    elements), laid out byte for byte as a 16-bit one of width 2 * width (hbuf_offset32's way):
    ldmatrix.x4 then hands each lane its TF32 B fragment."""
    return swizzled_offset(2 * p.width, row, 2 * kk) >> 1


def _dgb_offset(p):
    """dgb's offset function of the plan's element size."""
    return dgb_offset32 if DTYPE_BYTES[p.dtype] == 4 else dgb_offset


def previous_time(direction, s, length):
    """The time index of a row's step s - 1 (s >= 1): where the state step s started from was saved."""
    return step_time(direction, s - 1, length)


def cell_backward(cell, dh, dc, saved, previous):
    """The cell's backward on one element (cells.cuh's twin): (dgates through W_ih, through W_hh,
    dc_prev, what reaches h_prev other than through W_hh). saved: the workspace's slots; previous:
    LSTM c_{t-1}, GRU h_{t-1}, RNN h_t."""
    zero = np.zeros_like(dh)
    if cell == "LSTM":
        i, f, g, o, c = saved
        tc = np.tanh(c)
        dcell = dc + dh * o * (1 - tc * tc)
        d = [dcell * g * i * (1 - i), dcell * previous * f * (1 - f), dcell * i * (1 - g * g), dh * tc * o * (1 - o)]
        return d, d, dcell * f, zero
    if cell == "GRU":
        r, z, n, hidden_n = saved
        dn = dh * (1 - z) * (1 - n * n)
        d = [dn * hidden_n * r * (1 - r), dh * (previous - n) * z * (1 - z), dn]
        return d, d[:2] + [dn * r], zero, dh * z
    if cell == "RNN_RELU":
        d = [np.where(previous > 0, dh, 0.0)]
    else:
        d = [dh * (1 - previous * previous)]
    return d, d, zero, zero


class _BackwardCta:
    def __init__(self, p, rank, direction, chunk, weight_hh, dtype):
        self.p, self.rank, self.direction, self.chunk = p, rank, direction, chunk
        self.recv = np.zeros((2, p.cluster, p.groups, p.n_tiles, 32, 2), dtype=dtype)
        self.tags = np.full((2, p.cluster, p.groups, p.n_tiles), -1)  # the iteration a block is for
        self.read_done = -1  # the last iteration whose reads of recv are finished
        self.dgb = np.zeros(p.rows * p.width, dtype=dtype)
        self.full = [_Barrier(1), _Barrier(1)]
        self.step = 0
        G, H = p.gates, p.hidden
        lanes, regs = np.arange(32)[:, None], np.arange(4)[None, :]
        wide = DTYPE_BYTES[p.dtype] == 4
        row, k = (a_coords32 if wide else a_coords)(lanes, regs)
        width, per_register = tile_k(p.dtype), 1 if wide else 2
        # Per warp and M tile j: W_hh^T (16 units, K) gathered lane by lane, fragment by fragment, as
        # the kernel loads its registers and shared memory.
        self.a = {}
        fragments = set()
        for warp in range(p.warps):
            for j in range(p.warp_m_tiles):
                mt = bwd_warp_m_tile(p, warp, j)
                tile = np.zeros((16, p.width), dtype=dtype)
                for kt in range(p.k_tiles):
                    f = bwd_fragment(p, j, kt)
                    assert f not in fragments and 0 <= f < p.reg_fragments + p.smem_fragments
                    fragments.add(f)
                    if f >= p.reg_fragments:
                        assert 0 <= bwd_wsm_index(p, warp, f) * FRAGMENT_BYTES < p.wsm_bytes
                    for e in range(per_register):
                        kk = width * kt + k + e
                        unit = 16 * mt + row
                        gate, source = bwd_source(p, rank, kk)
                        ok = (mt < p.m_tiles) & (unit < H) & (kk < G * p.units) & (source < H)
                        values = weight_hh[np.where(ok, gate * H + source, 0), np.where(ok, unit, 0)]
                        assert not tile[row, kk].any(), "two lanes load one A element"
                        tile[row, kk] = np.where(ok, values, 0.0)
                fragments.clear()
                self.a[warp, j] = tile


def _dgb_gather(p):
    """The dgb offsets (width, rows) of the B operand as the kernel's ldmatrix.x4 reads it, every K
    tile and batch tile. fp32: the kernel halves ldmatrix_row's k (its 16-bit column) and each lane
    gets one element of its 16-byte row, B fragment b_coords32."""
    lanes = np.arange(32)
    wide = DTYPE_BYTES[p.dtype] == 4
    width, half = tile_k(p.dtype), tile_k(p.dtype) // 2
    offsets = np.zeros((p.width, p.rows), dtype=np.int64)
    for kt in range(p.k_tiles):
        for nt in range(p.n_tiles):
            row, k = ldmatrix_row(lanes, nt // 2, kt)
            if wide:
                k = k >> 1
            for reg in range(2):
                kk, n = (b_coords32 if wide else b_coords)(lanes, reg)
                matrix = 2 * (nt & 1) + reg
                source = 8 * matrix + (lanes >> 2)
                assert (row[source] == 8 * nt + n).all() and (k[source] == width * kt + half * reg).all()
                if wide:
                    offsets[width * kt + kk, 8 * nt + n] = dgb_offset32(p, row[source], k[source] + (lanes & 3))
                    continue
                for e in range(2):
                    offsets[16 * kt + kk + e, 8 * nt + n] = dgb_offset(p, row[source], k[source] + 2 * (lanes & 3) + e)
    assert sorted(offsets.ravel().tolist()) == list(range(p.rows * p.width))
    return offsets


def run_backward(cell, grad_output, grad_h_n, grad_c_n, weights, h0, c0, lengths, output, workspace, seed=0,
                 fit=False, kernel_dtype="bf16"):
    """The recurrent part of ``birnn_fast::backward`` computed by the model of the CUDA backward's
    schedule: (dgates (T, B, 2, G*H), grad_h0, grad_c0) as numpy arrays (NaN where nothing wrote),
    from the forward's output and workspace (the Triton layout). ``seed`` picks the interleaving of
    the CTAs' iterations and of the partial sums' deliveries; ``kernel_dtype`` the kernels' plan and
    fragment layouts (16-bit: "bf16"; fp32: "tf32" or "fp32", one layout), the arithmetic being
    output's."""
    grad_output, grad_h_n, grad_c_n, h0, c0, output, workspace = (
        np.asarray(x) for x in (grad_output, grad_h_n, grad_c_n, h0, c0, output, workspace))
    weights = [np.asarray(w) for w in weights]
    lengths = np.asarray(lengths).astype(np.int64)
    T, B, _ = output.shape
    G, W = cell_of(cell).gates, cell_of(cell).saved
    H = weights[1].shape[0] // G
    p = backward_plan(cell, H, B, kernel_dtype, fit=fit)
    dgb_at = _dgb_offset(p)
    dtype = output.dtype
    rng = random.Random(seed)
    dgates = np.full((T, B, 2, G * H), np.nan, dtype=dtype)
    grad_h0 = np.full((2, B, H), np.nan, dtype=dtype)
    grad_c0 = np.full((2, B, H) if cell == "LSTM" else (0,), np.nan, dtype=dtype)
    gather = _dgb_gather(p)
    clusters = {(d, chunk): [_BackwardCta(p, rank, d, chunk, weights[4 * d + 1], dtype) for rank in range(p.cluster)]
                for d in range(2) for chunk in range(p.chunks)}
    in_flight = []  # (receiver, buffer, sender, group, nt, [32, 2] data, iteration)
    lanes, columns = np.arange(32)[:, None], np.arange(2)[None, :]
    # (tile row, column) of each lane's accumulator registers 2 half, 2 half + 1: [32, 2] each.
    accumulator = [c_coords(lanes, 2 * half + columns) for half in range(2)]

    def elements(cta, warp, o):
        """(unit, batch row, chunk row, valid) of a warp's item o: [32, 2] each."""
        group, nt = bwd_item(p, warp, o)
        unit = np.broadcast_to(cta.rank * p.units + 8 * group + (lanes >> 2), (32, 2))
        row = 8 * nt + 2 * (lanes & 3) + columns
        b = cta.chunk * p.chunk_rows + row
        return group, nt, unit, b, row, (unit < H) & (b < B) & (group < p.groups) & (nt < p.n_tiles)

    def items(cta):
        for warp in range(p.warps):
            for o in range(ceil_div(p.items, p.warps)):
                if warp + p.warps * o < p.items:
                    yield warp, o

    def prologue(cta):
        d = cta.direction
        cta.carry, cta.dc = {}, {}
        for warp, o in items(cta):
            _, _, unit, b, _, ok = elements(cta, warp, o)
            at = (d, np.minimum(b, B - 1), np.minimum(unit, H - 1))
            cta.carry[warp, o] = np.where(ok, grad_h_n[at], 0.0)
            cta.dc[warp, o] = np.where(ok, grad_c_n[at], 0.0) if cell == "LSTM" else np.zeros((32, 2), dtype)
        cta.full[1].arrive_expect_tx(p.expect_bytes)
        cta.full[0].arrive_expect_tx(p.expect_bytes)

    def iteration(cta, i):
        d, steps = cta.direction, cta.steps
        s = bwd_step(steps, i)
        buffer, next_buffer = read_buffer(i), read_buffer(i + 1)
        for warp, o in items(cta):
            group, nt, unit, b, row, ok = elements(cta, warp, o)
            total = np.zeros((32, 2), dtype=dtype)
            if i >= 1:
                for sender in range(p.cluster):  # in rank order: the same sum every run
                    assert cta.tags[buffer, sender, group, nt] == i, "a partial sum of another iteration"
                    total = total + cta.recv[buffer, sender, group, nt]
            length = lengths[np.minimum(b, B - 1)]
            bb, uu = np.minimum(b, B - 1), np.minimum(unit, H - 1)
            if s < 0:  # every valid row's first step is done: what reached h0 and c0
                grad_h0[d, b[ok], unit[ok]] = (cta.carry[warp, o] + total)[ok]
                if cell == "LSTM":
                    grad_c0[d, b[ok], unit[ok]] = cta.dc[warp, o][ok]
                continue
            active = ok & (s < length)
            padding = ok & (s >= length)
            t = np.where(active, step_time(d, s, length), s)
            dh = cta.carry[warp, o] + total + grad_output[t, bb, d * H + uu]
            saved = [workspace[t, bb, d, slot * H + uu] for slot in range(W)]
            # previous: LSTM c and GRU h where step s started (saved at the row's previous time
            # index; c0 / h0 at its first step), RNN the step's own h.
            t_prev = np.clip(previous_time(d, s, length), 0, T - 1) if s >= 1 else None
            if cell == "LSTM":
                previous = workspace[t_prev, bb, d, 4 * H + uu] if s >= 1 else c0[d, bb, uu]
            elif cell == "GRU":
                previous = output[t_prev, bb, d * H + uu] if s >= 1 else h0[d, bb, uu]
            else:
                previous = output[t, bb, d * H + uu]
            d_ih, d_hh, dc_prev, direct = cell_backward(cell, dh, cta.dc[warp, o], saved, previous)
            for gate in range(G):
                dgates[t[active], b[active], d, gate * H + unit[active]] = d_ih[gate][active]
                dgates[s, b[padding], d, gate * H + unit[padding]] = 0.0
                kk = (unit - cta.rank * p.units) * G + gate
                cta.dgb[dgb_at(p, row, kk)] = np.where(active, d_hh[gate], 0.0)
            cta.carry[warp, o] = np.where(active, direct, cta.carry[warp, o])
            cta.dc[warp, o] = np.where(active, dc_prev, cta.dc[warp, o])
        cta.read_done = i
        if s < 0:
            return
        # The K padding of dgb (past G*U) stays as the prologue left it: 0.
        b_operand = cta.dgb[gather]  # [width, rows]
        for warp in range(p.warps):
            for j in range(p.warp_m_tiles):
                mt = bwd_warp_m_tile(p, warp, j)
                if mt >= p.m_tiles:
                    continue
                acc = cta.a[warp, j] @ b_operand  # [16, rows]
                for nt in range(p.n_tiles):
                    for half in range(2):
                        rank, group = bwd_destination(p, 2 * mt + half)
                        if rank >= p.cluster:
                            continue
                        tile_row, n = accumulator[half]
                        data = acc[tile_row, 8 * nt + n]  # [32, 2]: a lane's accumulator pair
                        receiver = clusters[cta.direction, cta.chunk][rank]
                        if receiver is cta:  # our own units: plain stores, ordered by the CTA barrier
                            assert cta.tags[next_buffer, cta.rank, group, nt] in (-1, i - 1)
                            cta.recv[next_buffer, cta.rank, group, nt] = data
                            cta.tags[next_buffer, cta.rank, group, nt] = i + 1
                        else:
                            in_flight.append((receiver, next_buffer, cta.rank, group, nt, data, i + 1))

    def deliver(copy):
        receiver, buffer, sender, group, nt, data, i = copy
        assert receiver.read_done >= i - 2, "a partial sum overwrote one the receiver had not read"
        assert receiver.tags[buffer, sender, group, nt] in (-1, i - 2)
        receiver.recv[buffer, sender, group, nt] = data
        receiver.tags[buffer, sender, group, nt] = i
        receiver.full[buffer].complete_tx(32 * 8)

    ctas = [cta for group in clusters.values() for cta in group]
    for index, cta in enumerate(ctas):
        cta.index = index
        cta.steps = int(lengths[cta.chunk * p.chunk_rows:(cta.chunk + 1) * p.chunk_rows].max())
        prologue(cta)

    def can_run(cta):
        return cta.step <= cta.steps and (cta.step == 0 or
                                          cta.full[read_buffer(cta.step)].ready(phase_parity(cta.step)))

    # Only an iteration (of its CTA) or a delivery (to its receiver) changes whether a CTA can run.
    runnable = {cta.index for cta in ctas if can_run(cta)}
    while runnable or in_flight:
        order = sorted(runnable)
        choice = rng.randrange(len(order) + len(in_flight))
        if choice < len(order):
            cta = ctas[order[choice]]
            if cta.step >= 1:
                cta.full[read_buffer(cta.step)].arrive_expect_tx(p.expect_bytes)
            iteration(cta, cta.step)
            cta.step += 1
        else:
            cta = in_flight[choice - len(order)][0]
            deliver(in_flight.pop(choice - len(order)))
        (runnable.add if can_run(cta) else runnable.discard)(cta.index)
    assert all(cta.step == cta.steps + 1 for cta in ctas), "a CTA waits for partial sums that never come"
    for cta in ctas:
        rows = slice(cta.chunk * p.chunk_rows, (cta.chunk + 1) * p.chunk_rows)
        for gate in range(G):
            units = slice(gate * H + cta.rank * p.units, gate * H + min(H, (cta.rank + 1) * p.units))
            dgates[cta.steps:, rows, cta.direction, units] = 0.0
    return dgates, grad_h0, grad_c0
