// The index functions of the cluster kernels, 1:1 with birnn_fast/cuda_schedule.py (same names and
// arguments; the Python model runs the whole schedule through them on the CPU, tests/test_cuda_schedule.py).
// The design: csrc/cuda/README.md.
#pragma once

#include <cstdint>

// Host and device alike: tests/test_cuda_launcher.py compiles them for the host and compares every
// function with its Python twin over ranges of arguments.
#define BIRNN_HD __host__ __device__ __forceinline__

namespace birnn_fast::cuda {

constexpr int kRowsPerCluster = 64;  // ROWS_PER_CLUSTER: the MMA's N, 8 tiles of 8
constexpr int kNTiles = kRowsPerCluster / 8;
constexpr int kFragmentBytes = 512;  // FRAGMENT_BYTES: a warp's m16n8k16 A fragment

// The launch: one layer's pointers and the host's plan (cuda_schedule.Plan), by value. The host
// packs it with ctypes in this order (birnn_fast/cuda_kernels.py, ForwardParams).
struct ForwardParams {
  const void* xg;          // (T, B, 2, H, xg_gates(G)) input projection with the biases (xg_offset)
  const void* w_hh;        // (2, G*H, H)
  const void* b_hh;        // (2, G*H): the GRU reads b_hn from it (r scales W_hn h + b_hn)
  const void* h0;          // (2, B, H)
  const void* c0;          // (2, B, H)
  const int64_t* lengths;  // (B,)
  void* output;            // (T, B, 2*H)
  void* h_n;               // (2, B, H)
  void* c_n;               // (2, B, H)
  float* workspace;        // (T, B, 2, kSaved*H) or null
  int32_t T, B, H;
  int32_t units, cluster, slices, unit_warps, k_tiles, warp_k_tiles, smem_k_tiles, n_tiles;
  int32_t relu;  // the Elman kernel: RNN_RELU (1) or RNN_TANH (0)
};

__host__ __device__ constexpr int m_tiles(int gates) { return (gates + 1) / 2; }

struct Plan {
  const ForwardParams& p;
  int split_k;
  int gates;

  BIRNN_HD int rows() const { return 8 * p.n_tiles; }
  BIRNN_HD int slice_elements() const { return rows() * p.units; }
  BIRNN_HD uint32_t slice_bytes(int element_bytes) const { return slice_elements() * element_bytes; }
  BIRNN_HD uint32_t expect_bytes(int element_bytes) const { return (p.cluster - 1) * slice_bytes(element_bytes); }
  BIRNN_HD uint32_t hbuf_bytes(int element_bytes) const { return 2 * p.slices * slice_bytes(element_bytes); }
  BIRNN_HD uint32_t wsm_bytes() const {
    return p.unit_warps * split_k * p.smem_k_tiles * m_tiles(gates) * kFragmentBytes;
  }
  BIRNN_HD uint32_t partial_bytes() const {
    return p.unit_warps * p.n_tiles * (split_k - 1) * m_tiles(gates) * kFragmentBytes;
  }
};

// The hidden unit of lane group `group` (lane / 4) in unit warp `unit_warp` of CTA `rank`.
BIRNN_HD int unit_of(const ForwardParams& p, int rank, int unit_warp, int group) {
  return rank * p.units + 8 * unit_warp + group;
}

// The gate of row `row` (0-15) of M tile `mt`: tile mt holds gates 2mt (rows 0-7) and 2mt+1.
BIRNN_HD int tile_gate(int mt, int row) { return 2 * mt + (row >> 3); }

// The row of W_hh (G*H, H) of one gate of a unit.
BIRNN_HD int w_row(int H, int gate, int unit) { return gate * H + unit; }

// The K tile of step i of split ks's K loop.
BIRNN_HD int warp_k_tile(const ForwardParams& p, int ks, int i) { return ks * p.warp_k_tiles + i; }

// The split whose warp sums batch tile nt and runs its cell math.
template <int kSplitK>
BIRNN_HD constexpr int tile_owner(int nt) { return nt % kSplitK; }

// Where split ks_from leaves its partial of a tile that `owner` sums.
BIRNN_HD int partial_slot(int ks_from, int owner) { return ks_from - (ks_from > owner ? 1 : 0); }

// The 512-byte block of a partial in the partials area.
template <int kSplitK, int kMTiles>
BIRNN_HD int partial_index(const ForwardParams& p, int unit_warp, int nt, int slot, int mt) {
  return ((unit_warp * p.n_tiles + nt) * (kSplitK - 1) + slot) * kMTiles + mt;
}

// The 512-byte block of shared-memory K tile j (past the register tiles) of a warp.
template <int kMTiles>
BIRNN_HD int wsm_index(const ForwardParams& p, int warp, int j, int mt) {
  return (warp * p.smem_k_tiles + j) * kMTiles + mt;
}

// (slice, column) of h's unit k in the exchanged buffers.
BIRNN_HD void h_slice(const ForwardParams& p, int k, int& slice, int& column) {
  slice = k / p.units;
  column = k - slice * p.units;
}

// Element offset of (row, column) in a block of rows of `width` 16-bit elements (a multiple of 8),
// the 16-byte chunks XOR-swizzled so that ldmatrix's 8 rows of one chunk fall in distinct bank
// groups (see the Python): m, the largest power of two dividing the chunk count (at most 8).
BIRNN_HD int swizzled_offset(int width, int row, int column) {
  const int chunks = width >> 3;
  int chunk = column >> 3;
  const int m = (chunks & -chunks) < 8 ? (chunks & -chunks) : 8;
  if (m > 1) {
    int shift = 0;  // log2(8 / m)
    while ((m << shift) < 8) ++shift;
    chunk ^= (row >> shift) & (m - 1);
  }
  return row * width + chunk * 8 + (column & 7);
}

// Element offset of (batch row, column) in a slice block of rows x U.
BIRNN_HD int h_offset(const ForwardParams& p, int row, int column) { return swizzled_offset(p.units, row, column); }

// Element offset in hbuf[2][slices][rows][U].
BIRNN_HD int hbuf_offset(const ForwardParams& p, int buffer, int slice, int row, int column) {
  return (buffer * p.slices + slice) * 8 * p.n_tiles * p.units + h_offset(p, row, column);
}

// Element offset in the fp32 kernels' hbuf[2][slices][rows][U] of 4-byte elements: byte for byte a
// 16-bit one of width 2U (hbuf_offset's swizzle over 16-byte chunks), so that ldmatrix.x4 hands lane
// 4g + q the element (row g, column q) of each 8 x 4 block: the TF32 B fragment.
BIRNN_HD int hbuf_offset32(const ForwardParams& p, int buffer, int slice, int row, int column) {
  return ((buffer * p.slices + slice) * 8 * p.n_tiles * 2 * p.units + swizzled_offset(2 * p.units, row, 2 * column)) >>
         1;
}

// The h buffer step s reads; it writes h_{s+1} into the other.
BIRNN_HD int read_buffer(int s) { return s & 1; }

// The phase parity of full[read_buffer(s)] that step s >= 1 waits for.
BIRNN_HD uint32_t phase_parity(int s) { return ((s - 1) >> 1) & 1; }

// --- The l2 exchange (cuda_schedule.l2_plan; the design: README.md, "The l2 exchange") ------------

// The l2 kernels' launch: the cluster kernels' parameters and the exchange's, packed by the host in
// this order (cuda_kernels.L2Params).
struct L2Params {
  ForwardParams p;
  unsigned long long* words;  // [2][chunks][2][C][word_rows][U] tagged words (exchange_word), tag -1 first
  int32_t* status;            // set to 1 by a poll that gave up (the grid was not resident)
  int32_t chunks, word_rows, partial_slices, max_polls;
};

// The tag of the words carrying h_s (h0 is never exchanged).
BIRNN_HD uint32_t word_tag(int s) { return static_cast<uint32_t>(s); }

// The 64-bit word (low half: 32 bits of h, the word's rows of unit `column`; high half: its tag) of
// (parity, direction, chunk, slice, word row, column) in the exchange buffer.
BIRNN_HD int64_t exchange_word(const ForwardParams& p, int word_rows, int chunks, int parity, int direction, int chunk,
                               int slice, int word_row, int column) {
  return ((((static_cast<int64_t>(parity) * chunks + chunk) * 2 + direction) * p.cluster + slice) * word_rows +
          word_row) * p.units + column;
}

// (slice, word row, column) of the w-th word CTA `rank` stages at a step: the other C-1 slices'.
BIRNN_HD void staged_word(const ForwardParams& p, int word_rows, int rank, int w, int& slice, int& word_row,
                          int& column) {
  const int per_slice = word_rows * p.units;
  const int other = w / per_slice;
  const int within = w - other * per_slice;
  slice = other + (other >= rank ? 1 : 0);
  word_row = within / p.units;
  column = within - word_row * p.units;
}

// The first of the partial_slices h slices the split-K partials take in CTA `rank` (never its own).
BIRNN_HD int partial_slice(int partial_slices, int rank) { return rank >= partial_slices ? 0 : rank + 1; }

// The input projection's slots per unit: 4 (one 8-byte load; GRU's fourth is 0) or 1 (RNN).
BIRNN_HD constexpr int xg_gates(int gates) { return gates > 1 ? 4 : 1; }

// Element offset of (row (t * B + b) * 2 + direction, unit) in xg (T, B, 2, H, xg_gates(G)): a
// unit's gates adjacent, so that the owner of an element loads them at once.
BIRNN_HD int64_t xg_offset(const ForwardParams& p, int64_t base, int unit, int gates) {
  return (base * p.H + unit) * xg_gates(gates);
}

// The time index a row of length `length` takes at step s < length.
BIRNN_HD int step_time(int direction, int s, int length) {
  return direction == 0 ? s : length - 1 - s;
}

// m16n8k16 fragments, lane = 4 * group + quad: (row, k) of A register reg's first element, (row, n)
// of accumulator reg.
BIRNN_HD void a_coords(int lane, int reg, int& row, int& k) {
  row = (lane >> 2) + 8 * (reg & 1);
  k = 2 * (lane & 3) + 8 * (reg >> 1);
}

BIRNN_HD void c_coords(int lane, int reg, int& row, int& n) {
  row = (lane >> 2) + 8 * (reg >> 1);
  n = 2 * (lane & 3) + (reg & 1);
}

// The (batch row, k) lane points ldmatrix.x4 at for batch tiles 2*nt_pair, +1 of K tile k_tile.
BIRNN_HD void ldmatrix_row(int lane, int nt_pair, int k_tile, int& row, int& k) {
  const int matrix = lane >> 3;
  row = 8 * (2 * nt_pair + (matrix >> 1)) + (lane & 7);
  k = 16 * k_tile + 8 * (matrix & 1);
}

// --- The backward (backward.cu; the schedule: cuda_schedule.py's run_backward) ---------------------

constexpr int kBackwardWarps = 8;  // BACKWARD_WARPS

// The launch of the backward, packed by the host in this order (cuda_kernels.BackwardParams).
struct BackwardParams {
  const void* grad_output;  // (T, B, 2*H)
  const void* grad_h_n;     // (2, B, H)
  const void* grad_c_n;     // (2, B, H) for LSTM
  const void* w_hh;         // (2, G*H, H)
  const void* h0;           // (2, B, H)
  const void* c0;           // (2, B, H) for LSTM
  const int64_t* lengths;   // (B,)
  const void* output;       // (T, B, 2*H): the forward's
  const float* workspace;   // (T, B, 2, kSaved*H): the forward's
  float* dgates;            // (T, B, 2, G*H): through W_ih, 0 at padding
  void* grad_h0;            // (2, B, H)
  void* grad_c0;            // (2, B, H) for LSTM
  int32_t T, B, H;
  int32_t gates, units, cluster, chunk_rows, n_tiles, m_tiles, warp_m_tiles, k_tiles, fragment_stride,
      reg_fragments, smem_fragments;
  int32_t relu;
};

struct BackwardPlan {
  const BackwardParams& p;
  BIRNN_HD int rows() const { return 8 * p.n_tiles; }
  BIRNN_HD int width() const { return 16 * p.k_tiles; }
  // dgb's columns in elements of element_bytes: K tiles of 32 bytes (width() of the 16-bit kernels).
  BIRNN_HD int width_of(int element_bytes) const { return 32 / element_bytes * p.k_tiles; }
  BIRNN_HD int groups() const { return p.units >> 3; }
  BIRNN_HD int items() const { return groups() * p.n_tiles; }
  BIRNN_HD uint32_t slot_bytes() const { return p.units * rows() * 4; }
  BIRNN_HD uint32_t recv_bytes() const { return 2 * p.cluster * slot_bytes(); }
  BIRNN_HD uint32_t dgb_bytes(int element_bytes) const { return rows() * width() * element_bytes; }
  BIRNN_HD uint32_t wsm_bytes() const { return kBackwardWarps * p.smem_fragments * kFragmentBytes; }
  BIRNN_HD uint32_t expect_bytes() const { return (p.cluster - 1) * slot_bytes(); }
};

// The step iteration i runs (i = steps: s = -1, grad_h0 only).
BIRNN_HD int bwd_step(int steps, int i) { return steps - 1 - i; }

// A warp's j-th M tile (units 16 mt .. 16 mt + 15).
BIRNN_HD int bwd_warp_m_tile(int warp, int j) { return warp + kBackwardWarps * j; }

// A warp's fragment number of (M tile j, K tile kt), strided by the kernel's compile-time bound on K
// tiles (so that a register fragment's number is known at compile time); the first reg_fragments
// live in registers.
BIRNN_HD int bwd_fragment(const BackwardParams& p, int j, int kt) { return j * p.fragment_stride + kt; }

// The 512-byte block of a fragment past the register ones.
BIRNN_HD int bwd_wsm_index(const BackwardParams& p, int warp, int fragment) {
  return warp * p.smem_fragments + fragment - p.reg_fragments;
}

// (gate, unit) of a CTA's K index kk: its gate-units, a unit's G gates adjacent.
BIRNN_HD void bwd_source(const BackwardParams& p, int rank, int kk, int& gate, int& unit) {
  gate = kk % p.gates;
  unit = rank * p.units + kk / p.gates;
}

// (rank, local group) owning 8-unit group `group` of the direction.
BIRNN_HD void bwd_destination(const BackwardParams& p, int group, int& rank, int& local) {
  rank = group / (p.units >> 3);
  local = group % (p.units >> 3);
}

// (local group, batch tile) of a warp's o-th item.
BIRNN_HD void bwd_item(const BackwardParams& p, int warp, int o, int& group, int& nt) {
  const int q = warp + kBackwardWarps * o;
  group = q / p.n_tiles;
  nt = q % p.n_tiles;
}

// The float2 of recv[2][C][groups][n_tiles][32] a sender's lane leaves for a receiver.
BIRNN_HD int recv_offset(const BackwardParams& p, int buffer, int sender, int group, int nt, int lane) {
  return (((buffer * p.cluster + sender) * (p.units >> 3) + group) * p.n_tiles + nt) * 32 + lane;
}

// Element offset of (batch row, K index) in dgb.
BIRNN_HD int dgb_offset(const BackwardParams& p, int row, int kk) { return swizzled_offset(16 * p.k_tiles, row, kk); }

// Element offset of (batch row, K index) in the fp32 kernels' dgb (rows x 8 k_tiles 4-byte elements):
// byte for byte a 16-bit one of width 16 k_tiles, so that ldmatrix.x4 hands each lane its TF32 B fragment.
BIRNN_HD int dgb_offset32(const BackwardParams& p, int row, int kk) {
  return swizzled_offset(16 * p.k_tiles, row, 2 * kk) >> 1;
}

// The time index of a row's step s - 1 (s >= 1).
BIRNN_HD int previous_time(int direction, int s, int length) { return step_time(direction, s - 1, length); }

}  // namespace birnn_fast::cuda
