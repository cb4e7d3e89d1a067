"""The plan and schedule of the CUDA cluster kernels (csrc/cuda), and a CPU model that runs it.

The index functions here are mirrored 1:1, with the same names, in csrc/cuda/schedule.cuh: which
CTA owns which units, which warp which K tiles and batch tiles, where an element sits in an MMA
fragment and in the exchanged h buffers, which buffer and barrier parity a step uses, which time
index a row takes. ``run_forward`` executes the whole forward schedule on the CPU with these
functions (per CTA, per warp, per lane of the MMA fragments, the exchange as asynchronous copies
delivered in a random order, mbarriers with transaction counts), so that the first hardware run is
not the first run of the indexing. The design: csrc/cuda/README.md.

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
DTYPE_BYTES = {"bf16": 2, "fp16": 2}
SPLITS = (2, 4, 8)  # the split-K factors (S) compiled
REGISTER_TILES = (4, 8)  # the K tiles (R) a warp keeps in registers, compiled
CELLS_BUILT = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
# The kernels' cell families: RNN_TANH and RNN_RELU are one kernel, told apart by ForwardParams.relu.
FAMILIES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "elman", "RNN_RELU": "elman"}


def kernel_name(cell, dtype, split_k, reg_k_tiles):
    return f"birnn_forward_{FAMILIES[cell]}_{dtype}_s{split_k}_r{reg_k_tiles}"


def cubin_name(cell):
    """The cubin (csrc/cuda/build.py's UNITS) holding a cell's forward kernels."""
    return f"forward_{FAMILIES[cell]}"


# (cell, dtype, S, R) of every kernel the cubin holds (one cell per family): forward.cu instantiates
# exactly these (tests/test_cuda_build.py).
INSTANCES = tuple((cell, dtype, split, reg) for cell in ("LSTM", "GRU", "RNN_TANH") for dtype in DTYPE_BYTES
                  for split in SPLITS for reg in REGISTER_TILES)


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
    k_tiles: int  # ceil(H / 16)
    warp_k_tiles: int  # KW = ceil(k_tiles / S)
    reg_k_tiles: int  # R, the first R of a warp's K tiles, held in registers
    smem_k_tiles: int  # the rest, in shared memory
    n_tiles: int  # batch tiles of 8 of a chunk: ceil(min(B, 64) / 8)
    chunks: int  # clusters per direction: ceil(B / 64)

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
        return 2 * self.slices * self.slice_bytes

    @property
    def wsm_bytes(self):
        return self.unit_warps * self.split_k * self.smem_k_tiles * m_tiles(self.gates) * FRAGMENT_BYTES

    @property
    def partial_bytes(self):
        return self.unit_warps * self.n_tiles * (self.split_k - 1) * m_tiles(self.gates) * FRAGMENT_BYTES

    @property
    def smem_bytes(self):
        """Dynamic shared memory: hbuf, W_hh's shared part, the split-K partials, two mbarriers
        (the layout of smem_layout in schedule.cuh)."""
        return self.hbuf_bytes + self.wsm_bytes + self.partial_bytes + 16

    @property
    def expect_bytes(self):
        """The bytes a CTA's full barrier waits for in a step: one slice from each peer."""
        return (self.cluster - 1) * self.slice_bytes

    @property
    def grid(self):
        return (self.cluster, 2, self.chunks)

    @property
    def kernel(self):
        return kernel_name(self.cell, self.dtype, self.split_k, self.reg_k_tiles)

    @property
    def cubin(self):
        return cubin_name(self.cell)


def plan(cell, hidden, batch, dtype, fit=True):
    """The launch plan of one layer, or a ValueError saying why the kernels cannot take it. With
    ``fit=False`` the limits of the hardware (cluster size, shared memory) are not applied: the
    CPU model runs such plans too."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"the CUDA kernels take {', '.join(DTYPE_BYTES)}, got {dtype}")
    if cell not in CELLS_BUILT and fit:
        raise ValueError(f"the CUDA kernels run {', '.join(CELLS_BUILT)} so far, got {cell}")
    gates = cell_of(cell).gates
    units = max(8, 8 * ceil_div(ceil_div(hidden, MAX_CLUSTER), 8))
    cluster = ceil_div(hidden, units)
    k_tiles = ceil_div(hidden, 16)
    slices = max(cluster, ceil_div(16 * k_tiles, units))
    unit_warps = units // 8
    split_k = max(1, 8 // unit_warps)
    if split_k not in SPLITS and fit:
        raise ValueError(f"H = {hidden} needs {units} units a CTA: more than one cluster of {MAX_CLUSTER} "
                         "CTAs can hold (the multi-cluster kernel is not built)")
    warp_k_tiles = ceil_div(k_tiles, split_k)
    reg_k_tiles = 4 if warp_k_tiles <= 4 else 8
    n_tiles = ceil_div(min(max(batch, 1), ROWS_PER_CLUSTER), 8)
    result = Plan(cell, dtype, hidden, batch, gates, units, cluster, slices, unit_warps, split_k, k_tiles,
                  warp_k_tiles, reg_k_tiles, max(0, warp_k_tiles - reg_k_tiles), n_tiles,
                  ceil_div(max(batch, 1), ROWS_PER_CLUSTER))
    if fit and result.smem_bytes > SMEM_LIMIT:
        raise ValueError(f"H = {hidden}, B = {batch} ({dtype}) needs {result.smem_bytes} bytes of shared memory "
                         f"a CTA, more than {SMEM_LIMIT} (the multi-cluster kernel is not built)")
    return result


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


def h_offset(p, row, col):
    """Element offset of (batch row, column) within a slice block of rows x U: the 16-byte chunks of a
    row XOR-swizzled so that ldmatrix's 8 rows of one chunk fall in distinct banks (rows of a
    power-of-two chunk count share banks periodically; odd counts do not)."""
    chunks = p.units // 8
    chunk = col >> 3
    if chunks > 1 and chunks & (chunks - 1) == 0 and chunks <= 8:
        shift = int(math.log2(8 // chunks))
        chunk ^= (row >> shift) & (chunks - 1)
    return row * p.units + chunk * 8 + (col & 7)


def hbuf_offset(p, buffer, slice_, row, col):
    """Element offset in hbuf[2][slices][rows][U]."""
    return ((buffer * p.slices + slice_) * p.rows) * p.units + h_offset(p, row, col)


def read_buffer(s):
    """The h buffer step s reads (h entering step s); it writes h_{s+1} into the other one."""
    return s & 1


def phase_parity(s):
    """The phase parity of full[read_buffer(s)] that step s >= 1 waits for: full[1] completes for
    steps 1, 3, 5..., full[0] for 2, 4, 6... (each armed at the start, then re-armed by the step that
    waited on it, for the step two later)."""
    return ((s - 1) >> 1) & 1


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
        row, k = a_coords(lanes, regs)  # [32, 4]
        self.a_tiles = {}
        for warp in range(p.unit_warps * p.split_k):
            unit_warp, ks = warp % p.unit_warps, warp // p.unit_warps
            unit = unit_of(p, rank, unit_warp, row & 7)
            for i in range(p.warp_k_tiles):
                kt = warp_k_tile(p, ks, i)
                for mt in range(m_tiles(G)):
                    gate = tile_gate(mt, row)
                    tile = np.zeros((16, 16), dtype=dtype)
                    for e in range(2):
                        kk = 16 * kt + k + e
                        ok = (gate < G) & (unit < H) & (kk < H) & (kt < p.k_tiles)
                        values = weight_hh[np.where(ok, w_row(H, gate, unit), 0), np.where(ok, kk, 0)]
                        assert not tile[row, k + e].any(), "two lanes load one A element"
                        tile[row, k + e] = np.where(ok, values, 0.0)
                    self.a_tiles[warp, i, mt] = tile


def _b_offsets(p, buffer, nt, kt):
    """The hbuf offsets (16, 8) of the B tile (k, n) of batch tile nt, K tile kt, as ldmatrix.x4 reads
    it, and the slices it reads."""
    lanes = np.arange(32)
    row, k = ldmatrix_row(lanes, nt // 2, kt)  # lane -> the row its pointer gives ldmatrix
    slices, cols = h_slice(p, k)
    offsets = np.zeros((16, 8), dtype=np.int64)
    for reg in range(2):
        kk, n = b_coords(lanes, reg)
        matrix = 2 * (nt & 1) + reg  # x4 order: (k0, nt), (k0+8, nt), (k0, nt+1), (k0+8, nt+1)
        source = 8 * matrix + (lanes >> 2)  # the lane whose pointer holds this lane's row
        assert (row[source] == 8 * nt + n).all() and (k[source] == 16 * kt + 8 * reg).all()
        for e in range(2):
            offsets[kk + e, n] = hbuf_offset(p, buffer, slices[source], row[source], cols[source] + 2 * (lanes & 3) + e)
    return offsets, set(slices.tolist())


def run_forward(cell, input, weights, h0, c0, lengths, seed=0, fit=False):
    """``birnn_fast::forward`` computed by the model of the CUDA schedule: (output, h_n, c_n,
    workspace) as numpy arrays of input's dtype (float64 or float32 arrays or CPU tensors), NaN
    where nothing wrote; every cell, without projections, as the kernels. ``seed`` picks the
    interleaving of the CTAs' steps and the copies' deliveries."""
    input, h0, c0 = (np.asarray(x) for x in (input, h0, c0))
    weights = [np.asarray(w) for w in weights]
    lengths = np.asarray(lengths).astype(np.int64)
    T, B, _ = input.shape
    G = cell_of(cell).gates
    if len(weights) != 8:
        raise ValueError("the model runs layers without projections, as the kernels")
    H = weights[1].shape[0] // G
    p = plan(cell, H, B, "bf16", fit=fit)
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
        cta.full[1].arrive_expect_tx(p.expect_bytes)  # for step 1
        cta.full[0].arrive_expect_tx(p.expect_bytes)  # for step 2

    def b_tile(cta, buffer, nt, kt):
        offsets, slices = b_offsets[buffer, nt, kt]
        for slice_ in slices:
            assert cta.tags[buffer, slice_] in (cta.step, -2), "a read of h from another step"
        return cta.hbuf[offsets]

    def compute_step(cta, s):
        d, steps = cta.direction, cta.steps
        buffer = read_buffer(s)
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
        next_buffer = read_buffer(s + 1)
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
        if s + 1 < steps:
            # Our own slice of the next buffer (last read in step s-1: read_done >= s-1), sent to each peer.
            cta.tags[next_buffer, cta.rank] = s + 1
            low = hbuf_offset(p, next_buffer, cta.rank, 0, 0)
            data = cta.hbuf[low:low + p.rows * p.units].copy()
            for peer in clusters[cta.direction, cta.chunk]:
                if peer is not cta:
                    in_flight.append((peer, next_buffer, cta.rank, data, cta, s + 1))

    def deliver(copy):
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
    for cta in ctas:
        cta.steps = cluster_steps(cta)
        prologue(cta)
    while True:
        runnable = [cta for cta in ctas if cta.step < cta.steps and
                    (cta.step == 0 or cta.full[read_buffer(cta.step)].ready(phase_parity(cta.step)))]
        if not runnable and not in_flight:
            break
        choice = rng.randrange(len(runnable) + len(in_flight))
        if choice < len(runnable):
            cta = runnable[choice]
            if cta.step >= 1:
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
