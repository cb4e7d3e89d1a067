// The backward (BPTT) of one bidirectional layer: a persistent kernel per (direction, chunk of
// batch rows) cluster, the forward's CTAs owning the same units. Each CTA keeps W_hh's rows of its
// units' gates on chip for all steps (as W_hh^T: M = every unit of the direction, K = its own
// gate-units), computes its units' gate gradients with all their gates in the lanes that own them,
// and sends each peer the partial sum of dh for the peer's units (fp32, st.async into the peer's
// shared memory, completing on its mbarrier). Design and protocol: README.md; the index functions:
// schedule.cuh (1:1 with birnn_fast/cuda_schedule.py, whose run_backward runs this schedule).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cells.cuh"
#include "ptx.cuh"
#include "schedule.cuh"

namespace birnn_fast::cuda {

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(T low, T high) {
  return static_cast<uint32_t>(__half_as_ushort(*reinterpret_cast<const __half*>(&low))) |
         (static_cast<uint32_t>(__half_as_ushort(*reinterpret_cast<const __half*>(&high))) << 16);
}

// The compile-time bounds of a variant (cuda_schedule.backward_bounds): chunk rows 64 take U <= 16,
// 32 take U <= 32; K tiles of kTileK gate-units (32 bytes: 16 16-bit, 8 fp32).
template <int kGates, int kRows, int kTileK = 16>
struct BackwardBounds {
  static constexpr int kMaxUnits = kRows == 64 ? 16 : 32;
  static constexpr int kNTiles = kRows / 8;
  static constexpr int kKTiles = (kGates * kMaxUnits + kTileK - 1) / kTileK;
  static constexpr int kWarpMTiles = (kMaxUnits + 7) / 8;  // ceil(ceil(16 U / 16) / 8 warps)
  static constexpr int kRegisters = kWarpMTiles * kKTiles < 16 ? kWarpMTiles * kKTiles : 16;
  static constexpr int kItems = 2;  // (group, batch tile) pairs a warp: U / 8 * n_tiles <= 16
};

// Register `reg` of the A fragment (W_hh^T) of M tile mt, K tile kt of CTA rank: two elements
// W_hh[gate * H + source, unit] (zeros past H, past the CTA's gate-units and past the M tiles).
template <typename T>
__device__ __forceinline__ uint32_t load_at_register(const BackwardParams& p, const T* w_hh, int rank, int lane,
                                                     int mt, int kt, int reg) {
  int row, k;
  a_coords(lane, reg, row, k);
  const int unit = 16 * mt + row;
  const T zero = static_cast<T>(0.0f);
  T values[2] = {zero, zero};
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int kk = 16 * kt + k + e;
    int gate, source;
    bwd_source(p, rank, kk, gate, source);
    if (mt < p.m_tiles && unit < p.H && kk < p.gates * p.units && source < p.H) {
      values[e] = w_hh[static_cast<int64_t>(w_row(p.H, gate, source)) * p.H + unit];
    }
  }
  return pack_pair(values[0], values[1]);
}

// The fp32 kernels' A register: one element W_hh[gate * H + source, unit] of m16n8k8 (a_coords' k
// halved: the same bytes of the row), zeros as load_at_register's; rounded to TF32 where kPasses is
// 1, kept in fp32 for the 3xTF32 split (split_tf32) where it is 3.
template <int kPasses>
__device__ __forceinline__ uint32_t load_at_register32(const BackwardParams& p, const float* w_hh, int rank,
                                                       int lane, int mt, int kt, int reg) {
  int row, k;
  a_coords(lane, reg, row, k);
  const int unit = 16 * mt + row;
  const int kk = 8 * kt + (k >> 1);
  int gate, source;
  bwd_source(p, rank, kk, gate, source);
  float w = 0.0f;
  if (mt < p.m_tiles && unit < p.H && kk < p.gates * p.units && source < p.H) {
    w = w_hh[static_cast<int64_t>(w_row(p.H, gate, source)) * p.H + unit];
  }
  return kPasses == 1 ? to_tf32(w) : __float_as_uint(w);
}

template <typename T, int kPasses>
__device__ __forceinline__ uint32_t at_register(const BackwardParams& p, const T* w_hh, int rank, int lane, int mt,
                                                int kt, int reg) {
  if constexpr (sizeof(T) == 4) {
    return load_at_register32<kPasses>(p, w_hh, rank, lane, mt, kt, reg);
  } else {
    return load_at_register<T>(p, w_hh, rank, lane, mt, kt, reg);
  }
}

// The fp32 kernels' partial dh: m16n8k8 TF32 over K tiles of 8 gate-units, twice the 16-bit
// kernels' K tiles. K outer, every M tile's accumulators live: a K tile's B fragments (all batch
// tiles, rounded to TF32 or split into big + small) are read from dgb once and used by every M
// tile, where holding all K tiles' fragments at once (the 16-bit order) would take twice the
// registers. Then each M tile's half tiles go to their owners, as the 16-bit kernels send them.
template <int kPasses, int kKT, int kNT, int kMTW, int kR>
__device__ __forceinline__ void fp32_products(const BackwardParams& p,
                                              const uint32_t (&a)[kR][4], const uint4* wsm, float2* recv,
                                              uint64_t* full, uint32_t dgb_address, uint32_t recv_address, int rank,
                                              int warp, int lane, int rows, int next) {
  float acc[kMTW][kNT][4];
#pragma unroll
  for (int j = 0; j < kMTW; ++j)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[j][nt][r] = 0.0f;
#pragma unroll
  for (int kt = 0; kt < kKT; ++kt) {
    if (kt >= p.k_tiles) continue;
    uint32_t big[kNT / 2][4], small[kNT / 2][4];
#pragma unroll
    for (int pair = 0; pair < kNT / 2; ++pair) {
      if (2 * pair < p.n_tiles) {
        int row, k;
        ldmatrix_row(lane, pair, kt, row, k);
        if (row >= rows) row -= 8;  // the odd last tile's partner: read, never used
        uint32_t b[4];
        ldmatrix_x4(b, dgb_address + 4 * dgb_offset32(p, row, k >> 1));  // k: the 16-bit column
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          if constexpr (kPasses == 1) {
            big[pair][reg] = to_tf32(__uint_as_float(b[reg]));
          } else {
            split_tf32(b[reg], big[pair][reg], small[pair][reg]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kMTW; ++j) {
      if (j >= p.warp_m_tiles || bwd_warp_m_tile(warp, j) >= p.m_tiles) continue;
      const int f = j * kKT + kt;  // bwd_fragment with p.fragment_stride == kKT
      uint32_t a_tile[4];
      if (f < kR) {
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) a_tile[reg] = a[f < kR ? f : 0][reg];
      } else {
        const uint4 v = wsm[bwd_wsm_index(p, warp, f) * 32 + lane];
        a_tile[0] = v.x;
        a_tile[1] = v.y;
        a_tile[2] = v.z;
        a_tile[3] = v.w;
      }
      if constexpr (kPasses == 1) {
#pragma unroll
        for (int pair = 0; pair < kNT / 2; ++pair) {
          if (2 * pair < p.n_tiles) {
            Mma<float>::run(acc[j][2 * pair], a_tile, big[pair][0], big[pair][1]);
            if (2 * pair + 1 < p.n_tiles) Mma<float>::run(acc[j][2 * pair + 1], a_tile, big[pair][2], big[pair][3]);
          }
        }
      } else {
        uint32_t a_big[4], a_small[4];
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) split_tf32(a_tile[reg], a_big[reg], a_small[reg]);
#pragma unroll
        for (int pair = 0; pair < kNT / 2; ++pair) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int nt = 2 * pair + half;
            if (nt < p.n_tiles) {
              // The small products first: they are added to the smaller partial sum.
              Mma<float>::run(acc[j][nt], a_small, big[pair][2 * half], big[pair][2 * half + 1]);
              Mma<float>::run(acc[j][nt], a_big, small[pair][2 * half], small[pair][2 * half + 1]);
              Mma<float>::run(acc[j][nt], a_big, big[pair][2 * half], big[pair][2 * half + 1]);
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kMTW; ++j) {
    const int mt = bwd_warp_m_tile(warp, j);
    if (j >= p.warp_m_tiles || mt >= p.m_tiles) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int owner, group;
      bwd_destination(p, 2 * mt + half, owner, group);
      if (owner >= p.cluster) continue;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        if (nt >= p.n_tiles) continue;
        const int offset = recv_offset(p, next, rank, group, nt, lane);
        if (owner == rank) {
          recv[offset] = make_float2(acc[j][nt][2 * half], acc[j][nt][2 * half + 1]);
        } else {
          store_async_to_peer(map_to_rank(recv_address + 8 * offset, owner), acc[j][nt][2 * half],
                              acc[j][nt][2 * half + 1], map_to_rank(smem_address(&full[next]), owner));
        }
      }
    }
  }
}

// dgb's columns and bytes: rows x width elements of the dtype, K tiles of 32 bytes either way.
template <int kBytes>
__device__ __forceinline__ int dgb_width(const BackwardPlan& plan) {
  if constexpr (kBytes == 4) {
    return plan.width_of(4);
  } else {
    return plan.width();
  }
}

template <int kBytes>
__device__ __forceinline__ uint32_t dgb_bytes(const BackwardPlan& plan) {
  if constexpr (kBytes == 4) {
    return plan.rows() * plan.width_of(4) * 4;
  } else {
    return plan.dgb_bytes(kBytes);
  }
}

// T: the layer's dtype (float: TF32 MMAs, one pass each (kPasses 1) or the 3xTF32 split (kPasses 3)).
template <typename Cell, typename T, int kRows, int kPasses = 1>
__device__ __forceinline__ void backward_kernel(const BackwardParams& p) {
  constexpr int kBytes = sizeof(T);
  using Bounds = BackwardBounds<Cell::kGates, kRows, 32 / kBytes>;
  constexpr int kGates = Cell::kGates;
  constexpr int kNT = Bounds::kNTiles, kKT = Bounds::kKTiles, kMTW = Bounds::kWarpMTiles;
  constexpr int kR = Bounds::kRegisters, kItems = Bounds::kItems;
  constexpr int kSaved = Cell::kSaved > 0 ? Cell::kSaved : 1;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int row_lengths[kRows];

  const BackwardPlan plan{p};
  const int rank = static_cast<int>(cluster_ctarank());
  const int direction = blockIdx.y;
  const int rows0 = blockIdx.z * p.chunk_rows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows = plan.rows();
  const int H = p.H, B = p.B, GH = kGates * p.H;

  float2* recv = reinterpret_cast<float2*>(smem);
  uint4* wsm = reinterpret_cast<uint4*>(smem + plan.recv_bytes());
  T* dgb = reinterpret_cast<T*>(smem + plan.recv_bytes() + plan.wsm_bytes());
  uint64_t* full =
      reinterpret_cast<uint64_t*>(smem + plan.recv_bytes() + plan.wsm_bytes() + dgb_bytes<kBytes>(plan));

  const T* w_hh = static_cast<const T*>(p.w_hh) + static_cast<int64_t>(direction) * GH * H;
  const T* grad_output = static_cast<const T*>(p.grad_output);
  const T* output = static_cast<const T*>(p.output);

  // --- Prologue: barriers, lengths, dgb zero (its K padding and the rows and units past B and H
  // stay 0), W_hh^T on chip, the gradients entering at each row's last step.
  if (threadIdx.x == 0) {
    mbarrier_init(&full[0], 1);
    mbarrier_init(&full[1], 1);
    fence_mbarrier_init();
  }
  for (int r = threadIdx.x; r < kRows; r += blockDim.x) {
    row_lengths[r] = rows0 + r < B ? static_cast<int>(p.lengths[rows0 + r]) : 0;
  }
  for (int e = threadIdx.x; e < rows * dgb_width<kBytes>(plan); e += blockDim.x) dgb[e] = static_cast<T>(0.0f);
  uint32_t a[kR][4];
#pragma unroll
  for (int f = 0; f < kR; ++f) {
    const int j = f / kKT, kt = f % kKT;
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      a[f][reg] = kt < p.k_tiles ? at_register<T, kPasses>(p, w_hh, rank, lane, bwd_warp_m_tile(warp, j), kt, reg)
                                 : 0u;
    }
  }
  for (int j = 0; j < p.warp_m_tiles; ++j) {
    for (int kt = 0; kt < p.k_tiles; ++kt) {
      const int f = bwd_fragment(p, j, kt);
      if (f < kR) continue;
      uint32_t r[4];
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        r[reg] = at_register<T, kPasses>(p, w_hh, rank, lane, bwd_warp_m_tile(warp, j), kt, reg);
      }
      wsm[bwd_wsm_index(p, warp, f) * 32 + lane] = make_uint4(r[0], r[1], r[2], r[3]);
    }
  }
  // The elements this lane owns: item o of the warp, columns e; dh's carry (what reaches h other
  // than through W_hh, grad_h_n until the row's last step) and dc, fp32 for all steps.
  int item_group[kItems], item_nt[kItems];
  bool item_ok[kItems];
  float carry[kItems][2], dc[kItems][2];
#pragma unroll
  for (int o = 0; o < kItems; ++o) {
    bwd_item(p, warp, o, item_group[o], item_nt[o]);
    item_ok[o] = warp + kBackwardWarps * o < plan.items();
    const int unit = rank * p.units + 8 * item_group[o] + (lane >> 2);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int b = rows0 + 8 * item_nt[o] + 2 * (lane & 3) + e;
      const bool ok = item_ok[o] && unit < H && b < B;
      const int64_t at = (static_cast<int64_t>(direction) * B + b) * H + unit;
      carry[o][e] = ok ? static_cast<float>(static_cast<const T*>(p.grad_h_n)[at]) : 0.0f;
      dc[o][e] = ok && Cell::kHasCellState ? static_cast<float>(static_cast<const T*>(p.grad_c_n)[at]) : 0.0f;
    }
  }
  __syncthreads();
  int steps = 0;
  for (int r = 0; r < kRows; ++r) steps = max(steps, row_lengths[r]);
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(&full[1], plan.expect_bytes());  // for iteration 1
    mbarrier_arrive_expect_tx(&full[0], plan.expect_bytes());  // for iteration 2
  }
  // The mbarriers' inits before any peer's complete_tx; dgb's zeros before this CTA's reads.
  cluster_sync();

  const uint32_t recv_address = smem_address(recv);
  const uint32_t dgb_address = smem_address(dgb);
  // --- The recurrence in reverse: iteration i runs step s = steps - 1 - i; i = steps finishes grad_h0.
  for (int i = 0; i <= steps; ++i) {
    const int s = bwd_step(steps, i);
    const int buffer = read_buffer(i), next = read_buffer(i + 1);
    // What the step reads that nothing in the launch writes, loaded before the wait: grad_output,
    // the forward's saved activations and the state the step started from (or its own h).
    float go[kItems][2], saved[kItems][2][kSaved], previous[kItems][2];
#pragma unroll
    for (int o = 0; o < kItems; ++o) {
      const int unit = rank * p.units + 8 * item_group[o] + (lane >> 2);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = 8 * item_nt[o] + 2 * (lane & 3) + e;
        const int b = rows0 + row;
        const int length = row_lengths[row];
        const bool active = item_ok[o] && unit < H && b < B && s >= 0 && s < length;
        go[o][e] = 0.0f;
        previous[o][e] = 0.0f;
#pragma unroll
        for (int slot = 0; slot < kSaved; ++slot) saved[o][e][slot] = 0.0f;
        if (active) {
          const int t = step_time(direction, s, length);
          const int64_t at = static_cast<int64_t>(t) * B + b;
          go[o][e] = static_cast<float>(grad_output[at * 2 * H + direction * H + unit]);
#pragma unroll
          for (int slot = 0; slot < Cell::kSaved; ++slot) {
            saved[o][e][slot] = p.workspace[(at * 2 + direction) * Cell::kSaved * H + slot * H + unit];
          }
          const int64_t state = (static_cast<int64_t>(direction) * B + b) * H + unit;
          const int64_t before = static_cast<int64_t>(s >= 1 ? previous_time(direction, s, length) : 0) * B + b;
          if constexpr (Cell::kPrevious == 0) {  // c_{t-1}
            previous[o][e] = s >= 1 ? p.workspace[(before * 2 + direction) * Cell::kSaved * H + 4 * H + unit]
                                    : static_cast<float>(static_cast<const T*>(p.c0)[state]);
          } else if constexpr (Cell::kPrevious == 1) {  // h_{t-1}
            previous[o][e] = s >= 1 ? static_cast<float>(output[before * 2 * H + direction * H + unit])
                                    : static_cast<float>(static_cast<const T*>(p.h0)[state]);
          } else {  // h_t
            previous[o][e] = static_cast<float>(output[at * 2 * H + direction * H + unit]);
          }
        }
      }
    }
    if (i >= 1) mbarrier_wait_cluster(&full[buffer], phase_parity(i));
    __syncthreads();  // the peers' partial sums (the wait) and our own warps' (plain stores)
    if (i >= 1 && threadIdx.x == 0) {
      // Re-armed for iteration i + 2 only now: every thread of the CTA has seen this phase complete.
      mbarrier_arrive_expect_tx(&full[buffer], plan.expect_bytes());
    }

    // --- The cell's backward of the owned elements.
#pragma unroll
    for (int o = 0; o < kItems; ++o) {
      if (!item_ok[o]) continue;
      const int group = item_group[o], nt = item_nt[o];
      const int local = 8 * group + (lane >> 2);
      const int unit = rank * p.units + local;
      // dh through W_hh: the C partial sums in rank order (the same sum every run).
      float2 total = make_float2(0.0f, 0.0f);
      if (i >= 1) {
        for (int sender = 0; sender < p.cluster; ++sender) {
          const float2 v = recv[recv_offset(p, buffer, sender, group, nt, lane)];
          total.x += v.x;
          total.y += v.y;
        }
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = 8 * nt + 2 * (lane & 3) + e;
        const int b = rows0 + row;
        if (unit >= H || b >= B) continue;
        const int length = row_lengths[row];
        const float through_w = e == 0 ? total.x : total.y;
        const int64_t state = (static_cast<int64_t>(direction) * B + b) * H + unit;
        if (s < 0) {  // every row's first step is done
          static_cast<T*>(p.grad_h0)[state] = static_cast<T>(carry[o][e] + through_w);
          if (Cell::kHasCellState) static_cast<T*>(p.grad_c0)[state] = static_cast<T>(dc[o][e]);
          continue;
        }
        float d[kGates], d_hh[kGates];
        if (s < length) {
          const float dh = carry[o][e] + through_w + go[o][e];
          float direct;
          Cell::backward(dh, dc[o][e], saved[o][e], previous[o][e], d, d_hh, direct, p.relu);
          carry[o][e] = direct;
          const int64_t at = static_cast<int64_t>(step_time(direction, s, length)) * B + b;
#pragma unroll
          for (int g = 0; g < kGates; ++g) p.dgates[(at * 2 + direction) * GH + g * H + unit] = d[g];
        } else {  // padding: 0 at time index s; the row's dh and dc wait for its last step
#pragma unroll
          for (int g = 0; g < kGates; ++g) {
            d_hh[g] = 0.0f;
            p.dgates[((static_cast<int64_t>(s) * B + b) * 2 + direction) * GH + g * H + unit] = 0.0f;
          }
        }
        // The CTA's B operand: a unit's G gates adjacent (one 8-byte store for the LSTM's four, one
        // 16-byte store in fp32).
        if constexpr (kBytes == 4) {
          if constexpr (kGates == 4) {
            *reinterpret_cast<float4*>(dgb + dgb_offset32(p, row, local * 4)) =
                make_float4(d_hh[0], d_hh[1], d_hh[2], d_hh[3]);
          } else {
#pragma unroll
            for (int g = 0; g < kGates; ++g) dgb[dgb_offset32(p, row, local * kGates + g)] = d_hh[g];
          }
        } else if constexpr (kGates == 4) {
          *reinterpret_cast<uint2*>(dgb + dgb_offset(p, row, local * 4)) =
              make_uint2(pack_pair(static_cast<T>(d_hh[0]), static_cast<T>(d_hh[1])),
                         pack_pair(static_cast<T>(d_hh[2]), static_cast<T>(d_hh[3])));
        } else {
#pragma unroll
          for (int g = 0; g < kGates; ++g) dgb[dgb_offset(p, row, local * kGates + g)] = static_cast<T>(d_hh[g]);
        }
      }
    }
    if (s < 0) break;
    __syncthreads();  // dgb complete

    if constexpr (kBytes == 4) {
      fp32_products<kPasses, kKT, kNT, kMTW, kR>(p, a, wsm, recv, full, dgb_address, recv_address, rank, warp,
                                                 lane, rows, next);
    } else {
      // --- Partial dh of every unit from this CTA's gate gradients: B fragments of all K tiles once,
      // then each of the warp's M tiles, sent to the units' owner as soon as it is summed.
      uint32_t bf[kKT][kNT / 2][4];
  #pragma unroll
      for (int kt = 0; kt < kKT; ++kt) {
  #pragma unroll
        for (int pair = 0; pair < kNT / 2; ++pair) {
          if (kt < p.k_tiles && 2 * pair < p.n_tiles) {
            int row, k;
            ldmatrix_row(lane, pair, kt, row, k);
            if (row >= rows) row -= 8;  // the odd last tile's partner: read, never used
            ldmatrix_x4(bf[kt][pair], dgb_address + kBytes * dgb_offset(p, row, k));
          }
        }
      }
  #pragma unroll
      for (int j = 0; j < kMTW; ++j) {
        const int mt = bwd_warp_m_tile(warp, j);
        if (j >= p.warp_m_tiles || mt >= p.m_tiles) continue;
        float acc[kNT][4];
  #pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
  #pragma unroll
          for (int r = 0; r < 4; ++r) acc[nt][r] = 0.0f;
  #pragma unroll
        for (int kt = 0; kt < kKT; ++kt) {
          if (kt >= p.k_tiles) continue;
          constexpr int kStride = kKT;
          const int f = j * kStride + kt;  // bwd_fragment with p.fragment_stride == kKT
          uint32_t a_tile[4];
          if (f < kR) {
  #pragma unroll
            for (int reg = 0; reg < 4; ++reg) a_tile[reg] = a[f < kR ? f : 0][reg];
          } else {
            const uint4 v = wsm[bwd_wsm_index(p, warp, f) * 32 + lane];
            a_tile[0] = v.x;
            a_tile[1] = v.y;
            a_tile[2] = v.z;
            a_tile[3] = v.w;
          }
  #pragma unroll
          for (int pair = 0; pair < kNT / 2; ++pair) {
            if (2 * pair < p.n_tiles) {
              Mma<T>::run(acc[2 * pair], a_tile, bf[kt][pair][0], bf[kt][pair][1]);
              if (2 * pair + 1 < p.n_tiles) Mma<T>::run(acc[2 * pair + 1], a_tile, bf[kt][pair][2], bf[kt][pair][3]);
            }
          }
        }
        // Each half tile (8 units) to its owner's recv[next][rank]: the accumulator pair of a lane is
        // the receiver's (unit, two rows) element pair.
  #pragma unroll
        for (int half = 0; half < 2; ++half) {
          int owner, group;
          bwd_destination(p, 2 * mt + half, owner, group);
          if (owner >= p.cluster) continue;
  #pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            if (nt >= p.n_tiles) continue;
            const int offset = recv_offset(p, next, rank, group, nt, lane);
            if (owner == rank) {
              recv[offset] = make_float2(acc[nt][2 * half], acc[nt][2 * half + 1]);
            } else {
              store_async_to_peer(map_to_rank(recv_address + 8 * offset, owner), acc[nt][2 * half],
                                  acc[nt][2 * half + 1], map_to_rank(smem_address(&full[next]), owner));
            }
          }
        }
      }
    }
  }

  // --- Time indices past the chunk's longest row: padding of every row.
  for (int e = threadIdx.x; e < (p.T - steps) * rows * p.units; e += blockDim.x) {
    const int s = steps + e / (rows * p.units);
    const int row = e / p.units % rows;
    const int u = rank * p.units + e % p.units;
    const int b = rows0 + row;
    if (b < B && u < H) {
      const int64_t at = static_cast<int64_t>(s) * B + b;
      for (int g = 0; g < kGates; ++g) p.dgates[(at * 2 + direction) * GH + g * H + u] = 0.0f;
    }
  }
  // No CTA leaves while a peer may still store into its shared memory.
  cluster_sync();
}

}  // namespace birnn_fast::cuda

// One entry per (cell family, dtype, chunk rows): the names and the list are
// cuda_schedule.backward_kernel_name / BACKWARD_INSTANCES; one cubin per family (-DBIRNN_FAMILY).
#define BIRNN_BACKWARD_KERNEL(CELL, NAME, DTYPE, TYPE, ROWS, PASSES)                             \
  extern "C" __global__ void __launch_bounds__(256, 1)                                            \
      birnn_backward_##NAME##_##DTYPE##_r##ROWS(const birnn_fast::cuda::BackwardParams p) {       \
    birnn_fast::cuda::backward_kernel<birnn_fast::cuda::CELL, TYPE, ROWS, PASSES>(p);             \
  }
#define BIRNN_BACKWARD_INSTANCE(CELL, NAME, DTYPE, TYPE, ROWS) BIRNN_BACKWARD_KERNEL(CELL, NAME, DTYPE, TYPE, ROWS, 1)
#define BIRNN_BACKWARD_VARIANTS(CELL, NAME)                                  \
  BIRNN_BACKWARD_INSTANCE(CELL, NAME, bf16, __nv_bfloat16, 64)               \
  BIRNN_BACKWARD_INSTANCE(CELL, NAME, bf16, __nv_bfloat16, 32)               \
  BIRNN_BACKWARD_INSTANCE(CELL, NAME, fp16, __half, 64)                      \
  BIRNN_BACKWARD_INSTANCE(CELL, NAME, fp16, __half, 32)

// fp32 layers: tf32 (one TF32 MMA a product) and fp32 (3xTF32), in their own cubin (-DBIRNN_FP32).
#define BIRNN_BACKWARD_FP32(CELL, NAME)                   \
  BIRNN_BACKWARD_KERNEL(CELL, NAME, tf32, float, 64, 1)   \
  BIRNN_BACKWARD_KERNEL(CELL, NAME, tf32, float, 32, 1)   \
  BIRNN_BACKWARD_KERNEL(CELL, NAME, fp32, float, 64, 3)   \
  BIRNN_BACKWARD_KERNEL(CELL, NAME, fp32, float, 32, 3)

#if defined(BIRNN_FP32)
#if BIRNN_FAMILY == 0  // lstm
BIRNN_BACKWARD_FP32(LstmCell, lstm)
#endif
#if BIRNN_FAMILY == 1  // gru
BIRNN_BACKWARD_FP32(GruCell, gru)
#endif
#if BIRNN_FAMILY == 2  // elman
BIRNN_BACKWARD_FP32(ElmanCell, elman)
#endif
#else
#if BIRNN_FAMILY == 0  // lstm
BIRNN_BACKWARD_VARIANTS(LstmCell, lstm)
#endif
#if BIRNN_FAMILY == 1  // gru
BIRNN_BACKWARD_VARIANTS(GruCell, gru)
#endif
#if BIRNN_FAMILY == 2  // elman
BIRNN_BACKWARD_VARIANTS(ElmanCell, elman)
#endif
#endif
