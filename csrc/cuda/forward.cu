// The forward pass of one bidirectional layer: a persistent kernel per (direction, chunk of 64
// batch rows) cluster that keeps W_hh on chip for all T steps and exchanges h between the cluster's
// CTAs through distributed shared memory. Design and exchange protocol: README.md; the index
// functions: schedule.cuh (1:1 with birnn_fast/cuda_schedule.py, whose model runs this schedule).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cells.cuh"
#include "ptx.cuh"
#include "schedule.cuh"

// Thread-block clusters, DSMEM, bulk copies and mbarrier transaction counts exist from sm_90: below
// it only the l2 exchange's kernels (-DBIRNN_L2) are built, which use none of them.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900 && !defined(BIRNN_L2)
#error "the cluster kernels need sm_90 or later: build only the l2 units (-DBIRNN_L2) for this architecture"
#endif

namespace birnn_fast::cuda {

template <typename T>
__device__ __forceinline__ uint32_t pack(T low, T high) {
  return static_cast<uint32_t>(__half_as_ushort(*reinterpret_cast<const __half*>(&low))) |
         (static_cast<uint32_t>(__half_as_ushort(*reinterpret_cast<const __half*>(&high))) << 16);
}

template <typename T>
__device__ __forceinline__ float to_float(uint16_t bits);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}
template <>
__device__ __forceinline__ float to_float<__half>(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

// The A fragment register `reg` of M tile mt, K tile kt of a warp: two W_hh elements (zeros past H
// and past the cell's gates).
template <typename T, int kGates>
__device__ __forceinline__ uint32_t load_a_register(const ForwardParams& p, const T* w_hh, int rank, int unit_warp,
                                                    int lane, int mt, int kt, int reg) {
  int row, k;
  a_coords(lane, reg, row, k);
  const int gate = tile_gate(mt, row);
  const int unit = unit_of(p, rank, unit_warp, row & 7);
  const int kk = 16 * kt + k;
  const T zero = static_cast<T>(0.0f);
  T low = zero, high = zero;
  if (gate < kGates && unit < p.H && kt < p.k_tiles) {
    const T* w = w_hh + static_cast<int64_t>(w_row(p.H, gate, unit)) * p.H;
    if (kk < p.H) low = w[kk];
    if (kk + 1 < p.H) high = w[kk + 1];
  }
  return pack(low, high);
}

// The fp32 kernels' A register: one W_hh element of m16n8k8 (a_coords' k halved: the same bytes of
// the row), zeros past H and past the cell's gates; rounded to TF32 where kPasses is 1, kept in fp32
// for the 3xTF32 split (split_tf32) where it is 3.
template <int kGates, int kPasses>
__device__ __forceinline__ uint32_t load_a_register32(const ForwardParams& p, const float* w_hh, int rank,
                                                      int unit_warp, int lane, int mt, int kt, int reg) {
  int row, k;
  a_coords(lane, reg, row, k);
  const int gate = tile_gate(mt, row);
  const int unit = unit_of(p, rank, unit_warp, row & 7);
  const int kk = 8 * kt + (k >> 1);
  float w = 0.0f;
  if (gate < kGates && unit < p.H && kt < p.k_tiles && kk < p.H) {
    w = w_hh[static_cast<int64_t>(w_row(p.H, gate, unit)) * p.H + kk];
  }
  return kPasses == 1 ? to_tf32(w) : __float_as_uint(w);
}

template <typename T, int kGates, int kPasses>
__device__ __forceinline__ uint32_t a_register(const ForwardParams& p, const T* w_hh, int rank, int unit_warp,
                                               int lane, int mt, int kt, int reg) {
  if constexpr (sizeof(T) == 4) {
    return load_a_register32<kGates, kPasses>(p, w_hh, rank, unit_warp, lane, mt, kt, reg);
  } else {
    return load_a_register<T, kGates>(p, w_hh, rank, unit_warp, lane, mt, kt, reg);
  }
}

// Offset of (buffer, slice, row, column) in hbuf, of elements of kBytes.
template <int kBytes>
__device__ __forceinline__ int hbuf_at(const ForwardParams& p, int buffer, int slice, int row, int column) {
  if constexpr (kBytes == 4) {
    return hbuf_offset32(p, buffer, slice, row, column);
  } else {
    return hbuf_offset(p, buffer, slice, row, column);
  }
}

// The fp32 kernels' input rows of the owned elements at step s (the step loop's loads, as a function
// for kLateX): prefetched to L1 only, or loaded into x (0 where inactive).
template <int kGates, int kOwned, int kSplitK, typename XgRow>
__device__ __forceinline__ void load_x(const ForwardParams& p, XgRow (&x)[kOwned][2], const int* row_lengths,
                                       const float* xg, bool prefetch_only, int s, int ks, int lane, int unit,
                                       int direction, int rows0) {
#pragma unroll
  for (int o = 0; o < kOwned; ++o) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int row = 8 * (ks + kSplitK * o) + 2 * (lane & 3) + e;
      const int length = row_lengths[row];
      const bool active = unit < p.H && ks + kSplitK * o < p.n_tiles && s < length;
      const int64_t base = (static_cast<int64_t>(step_time(direction, s, length)) * p.B + rows0 + row) * 2 + direction;
      const XgRow* source = reinterpret_cast<const XgRow*>(xg + xg_offset(p, base, unit, kGates));
      if (prefetch_only) {
        if (active) prefetch_l1(source);
      } else {
        x[o][e] = active ? *source : XgRow{};
      }
    }
  }
}

// The l2 exchange's polls and staging at step s >= 1: every word of the other C-1 slices, kL2Batch
// loads in flight a thread, re-read until each carries word_tag(s), then its payload into hbuf (the
// single buffer, where the MMA reads it: h_offset's swizzle). A poll that has not seen its tags
// after max_polls rounds gives up: status set, `failed` kept, no later poll of the thread waits (the
// launcher raises; a grid that is not resident at once then ends instead of hanging the GPU).
constexpr int kL2Batch = 8;
template <int kBytes>
__device__ __forceinline__ void l2_stage(const ForwardParams& p, const L2Params& x, unsigned char* hbuf, int rank,
                                         int direction, int s, bool& failed) {
  const int per_step = (p.cluster - 1) * x.word_rows * p.units;
  const uint32_t tag = word_tag(s);
  const unsigned long long* words = x.words;
  for (int first = threadIdx.x; first < per_step; first += kL2Batch * blockDim.x) {
    unsigned long long w[kL2Batch];
    int64_t at[kL2Batch];
#pragma unroll
    for (int u = 0; u < kL2Batch; ++u) {
      int slice, word_row, column;
      staged_word(p, x.word_rows, rank, min(first + u * static_cast<int>(blockDim.x), per_step - 1), slice, word_row,
                  column);
      at[u] = exchange_word(p, x.word_rows, x.chunks, s & 1, direction, blockIdx.z, slice, word_row, column);
      w[u] = load_relaxed_gpu(words + at[u]);
    }
    for (int polls = 0; !failed; ++polls) {
      bool ready = true;
#pragma unroll
      for (int u = 0; u < kL2Batch; ++u) ready &= static_cast<uint32_t>(w[u] >> 32) == tag;
      if (ready) break;
      if (polls >= x.max_polls) {
        *x.status = 1;  // a plain store: the host reads it after the launch; every writer writes 1
        failed = true;
        break;
      }
#pragma unroll
      for (int u = 0; u < kL2Batch; ++u) {
        if (static_cast<uint32_t>(w[u] >> 32) != tag) w[u] = load_relaxed_gpu(words + at[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kL2Batch; ++u) {
      const int i = first + u * static_cast<int>(blockDim.x);
      if (i < per_step) {
        int slice, word_row, column;
        staged_word(p, x.word_rows, rank, i, slice, word_row, column);
        const uint32_t payload = static_cast<uint32_t>(w[u]);
        if constexpr (kBytes == 4) {
          reinterpret_cast<uint32_t*>(hbuf)[hbuf_offset32(p, 0, slice, word_row, column)] = payload;
        } else {  // rows 2 word_row (low half) and 2 word_row + 1 of the unit
          uint16_t* h16 = reinterpret_cast<uint16_t*>(hbuf);
          h16[hbuf_offset(p, 0, slice, 2 * word_row, column)] = static_cast<uint16_t>(payload & 0xffff);
          h16[hbuf_offset(p, 0, slice, 2 * word_row + 1, column)] = static_cast<uint16_t>(payload >> 16);
        }
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ uint32_t bits_of(T value) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(value);
  } else {
    return static_cast<uint32_t>(__half_as_ushort(*reinterpret_cast<const __half*>(&value)));
  }
}

// One bidirectional layer's forward; kSplitK warps share a unit group's K tiles, the first kRegKT
// of each warp's K tiles stay in registers. T: the layer's dtype (float: TF32 MMAs, one pass each
// (kPasses 1) or the 3xTF32 split (kPasses 3)). kL2: the l2 exchange instead of
// the cluster's (exchange: its parameters): plain CTAs, rank blockIdx.x, one h buffer staged from L2 each
// step.
template <typename Cell, typename T, int kSplitK, int kRegKT, int kPasses = 1, bool kL2 = false>
__device__ __forceinline__ void forward_kernel(const ForwardParams& p, const L2Params* exchange = nullptr) {
  constexpr int kGates = Cell::kGates;
  constexpr int kMT = m_tiles(kGates);
  constexpr int kOwned = (kNTiles + kSplitK - 1) / kSplitK;  // batch tiles a warp runs the cell math of
  constexpr int kBytes = sizeof(T);
  constexpr int kXg = xg_gates(kGates);
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int row_lengths[kRowsPerCluster];

  const Plan plan{p, kSplitK, kGates};
  int rank;
  if constexpr (kL2) {
    rank = blockIdx.x;
  } else {
    rank = static_cast<int>(cluster_ctarank());
  }
  const int direction = blockIdx.y;
  const int rows0 = blockIdx.z * kRowsPerCluster;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int unit_warp = warp % p.unit_warps, ks = warp / p.unit_warps;
  const int rows = plan.rows();
  const int H = p.H, B = p.B, GH = kGates * p.H;

  T* hbuf = reinterpret_cast<T*>(smem);
  // l2: one h buffer, and the partials in its slices partial_slice .. + partial_slices where the plan
  // puts them there (no mbarriers).
  const uint32_t hbuf_bytes = kL2 ? plan.hbuf_bytes(kBytes) / 2 : plan.hbuf_bytes(kBytes);
  uint4* wsm = reinterpret_cast<uint4*>(smem + hbuf_bytes);
  float4* partials = reinterpret_cast<float4*>(smem + hbuf_bytes + plan.wsm_bytes());
  bool alias_partials = false;
  if constexpr (kL2) {
    alias_partials = exchange->partial_slices > 0;
    if (alias_partials) {
      partials = reinterpret_cast<float4*>(smem + partial_slice(exchange->partial_slices, rank) * plan.slice_bytes(kBytes));
    }
  }
  uint64_t* full =
      reinterpret_cast<uint64_t*>(smem + plan.hbuf_bytes(kBytes) + plan.wsm_bytes() + plan.partial_bytes());

  const T* w_hh = static_cast<const T*>(p.w_hh) + static_cast<int64_t>(direction) * GH * H;
  const T* xg = static_cast<const T*>(p.xg);
  T* output = static_cast<T*>(p.output);

  // --- Prologue: barriers, lengths, h0 into buffer 0, buffer 1 zero, W_hh on chip, the state.
  if constexpr (!kL2) {
    if (threadIdx.x == 0) {
      mbarrier_init(&full[0], 1);
      mbarrier_init(&full[1], 1);
      fence_mbarrier_init();
    }
  }
  for (int r = threadIdx.x; r < kRowsPerCluster; r += blockDim.x) {
    row_lengths[r] = rows0 + r < B ? static_cast<int>(p.lengths[rows0 + r]) : 0;
  }
  const T zero = static_cast<T>(0.0f);
  for (int e = threadIdx.x; e < p.slices * plan.slice_elements(); e += blockDim.x) {
    const int slice = e / plan.slice_elements(), within = e % plan.slice_elements();
    const int row = within / p.units, column = within % p.units;
    const int b = rows0 + row, k = slice * p.units + column;
    const T* h0 = static_cast<const T*>(p.h0);
    hbuf[hbuf_at<kBytes>(p, 0, slice, row, column)] =
        (b < B && k < H) ? h0[(static_cast<int64_t>(direction) * B + b) * H + k] : zero;
    if constexpr (!kL2) hbuf[hbuf_at<kBytes>(p, 1, slice, row, column)] = zero;
  }
  uint32_t a[kRegKT][kMT][4];
#pragma unroll
  for (int i = 0; i < kRegKT; ++i) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        a[i][mt][reg] = i < p.warp_k_tiles ? a_register<T, kGates, kPasses>(p, w_hh, rank, unit_warp, lane, mt,
                                                                            warp_k_tile(p, ks, i), reg)
                                           : 0u;
      }
    }
  }
  for (int j = 0; j < p.smem_k_tiles; ++j) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      uint32_t r[4];
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        r[reg] = a_register<T, kGates, kPasses>(p, w_hh, rank, unit_warp, lane, mt, warp_k_tile(p, ks, kRegKT + j),
                                                reg);
      }
      wsm[wsm_index<kMT>(p, warp, j, mt) * 32 + lane] = make_uint4(r[0], r[1], r[2], r[3]);
    }
  }
  // c of the elements this lane owns (batch tiles nt = ks + kSplitK * o, columns e), fp32 in
  // registers for all T steps. Their h is kept in the h buffers (in T, as it is exchanged): a row
  // that has ended passes its h on from the buffer it reads to the one it writes.
  const int unit = unit_of(p, rank, unit_warp, lane >> 2);
  float c[kOwned][2];
#pragma unroll
  for (int o = 0; o < kOwned; ++o) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int b = rows0 + 8 * (ks + kSplitK * o) + 2 * (lane & 3) + e;
      const bool ok = unit < H && b < B && ks + kSplitK * o < p.n_tiles;
      const int64_t at = (static_cast<int64_t>(direction) * B + b) * H + unit;
      c[o][e] = ok && Cell::kHasCellState ? static_cast<float>(static_cast<const T*>(p.c0)[at]) : 0.0f;
    }
  }
  // The GRU's b_hn of this lane's unit (it enters n's hidden part, which r scales).
  const int64_t hidden_bias_at = static_cast<int64_t>(direction) * GH + Cell::kHiddenBiasGate * H + unit;
  const float hidden_bias = Cell::kHiddenBiasGate >= 0 && unit < H
                                ? static_cast<float>(static_cast<const T*>(p.b_hh)[hidden_bias_at])
                                : 0.0f;
  __syncthreads();
  int steps = 0;
  for (int r = 0; r < kRowsPerCluster; ++r) steps = max(steps, row_lengths[r]);
  bool failed = false;  // l2: a poll of this thread gave up (l2_stage)
  if constexpr (!kL2) {
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(&full[1], plan.expect_bytes(kBytes));  // for step 1
      mbarrier_arrive_expect_tx(&full[0], plan.expect_bytes(kBytes));  // for step 2
    }
    // The buffers' generic-proxy writes above before any peer's bulk copy into them; the barriers'
    // inits before any peer's complete_tx.
    fence_proxy_async();
    cluster_sync();
  }

  // --- The recurrence.
  for (int s = 0; s < steps; ++s) {
    const int buffer = kL2 ? 0 : read_buffer(s), next = kL2 ? 0 : read_buffer(s + 1);
    // The input projection of the owned elements, loaded before the wait (no peer writes it): a
    // unit's gates are adjacent in xg (the launcher's layout), one load an element. Where the fp32
    // rows would not fit the registers beside W_hh's and the accumulators (kLateX: 4 batch tiles a
    // warp, 16 bytes an element), only prefetched to L1 here and loaded after the products.
    static_assert((kBytes == 2 || kBytes == 4) && (kXg == 4 || kXg == 1), "xg rows of 4 or 1 slots of 2 or 4 bytes");
    using XgRow = typename std::conditional<kBytes == 4, typename std::conditional<kXg == 4, float4, float>::type,
                                            typename std::conditional<kXg == 4, uint2, uint16_t>::type>::type;
    constexpr bool kLateX = kBytes == 4 && kOwned > 2;
    XgRow x[kOwned][2];
    if constexpr (kLateX) {
      load_x<kGates, kOwned, kSplitK>(p, x, row_lengths, xg, true, s, ks, lane, unit, direction, rows0);
    } else {
#pragma unroll
      for (int o = 0; o < kOwned; ++o) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = 8 * (ks + kSplitK * o) + 2 * (lane & 3) + e;
          const int length = row_lengths[row];
          const bool active = unit < H && ks + kSplitK * o < p.n_tiles && s < length;
          const int64_t base =
              (static_cast<int64_t>(step_time(direction, s, length)) * B + rows0 + row) * 2 + direction;
          x[o][e] = active ? *reinterpret_cast<const XgRow*>(xg + xg_offset(p, base, unit, kGates)) : XgRow{};
        }
      }
    }
    if constexpr (kL2) {
      // The staging rewrites the other slices of the one buffer: where the partials were in them,
      // every owner must have read its partials of step s - 1 first.
      if (alias_partials && s >= 1) __syncthreads();
      if (s >= 1 && p.cluster > 1) l2_stage<kBytes>(p, *exchange, smem, rank, direction, s, failed);
      __syncthreads();  // the staged slices and our own (written by the cell math of step s - 1)
    } else {
      if (s >= 1) mbarrier_wait(&full[buffer], phase_parity(s));
    }

    float acc[kMT][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.0f;
    const uint32_t hbuf_address = smem_address(hbuf);
    auto k_tile_products = [&](const uint32_t (&a_tile)[kMT][4], int kt) {
      if constexpr (kPasses == 1) {
#pragma unroll
        for (int pair = 0; pair < kNTiles / 2; ++pair) {
          if (2 * pair < p.n_tiles) {
            int row, k, slice, column;
            ldmatrix_row(lane, pair, kt, row, k);
            if (row >= rows) row -= 8;  // the odd last tile's partner: read, never used
            if constexpr (kBytes == 4) k >>= 1;  // the same bytes of the row, in fp32 elements
            h_slice(p, k, slice, column);
            uint32_t b[4];
            ldmatrix_x4(b, hbuf_address + kBytes * hbuf_at<kBytes>(p, buffer, slice, row, column));
            if constexpr (kBytes == 4) {
#pragma unroll
              for (int reg = 0; reg < 4; ++reg) b[reg] = to_tf32(__uint_as_float(b[reg]));
            }
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              Mma<T>::run(acc[mt][2 * pair], a_tile[mt], b[0], b[1]);
              if (2 * pair + 1 < p.n_tiles) Mma<T>::run(acc[mt][2 * pair + 1], a_tile[mt], b[2], b[3]);
            }
          }
        }
      } else {
        // 3xTF32, M tile by M tile: one tile's split of A live at a time (the registers of the
        // widest variant), h's fragments loaded and split once an M tile.
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          uint32_t a_big[4], a_small[4];
#pragma unroll
          for (int reg = 0; reg < 4; ++reg) split_tf32(a_tile[mt][reg], a_big[reg], a_small[reg]);
#pragma unroll
          for (int pair = 0; pair < kNTiles / 2; ++pair) {
            if (2 * pair < p.n_tiles) {
              int row, k, slice, column;
              ldmatrix_row(lane, pair, kt, row, k);
              if (row >= rows) row -= 8;
              h_slice(p, k >> 1, slice, column);
              uint32_t b[4], b_big[4], b_small[4];
              ldmatrix_x4(b, hbuf_address + kBytes * hbuf_at<kBytes>(p, buffer, slice, row, column));
#pragma unroll
              for (int reg = 0; reg < 4; ++reg) split_tf32(b[reg], b_big[reg], b_small[reg]);
              // The small products first: they are added to the smaller partial sum.
              Mma<T>::run(acc[mt][2 * pair], a_small, b_big[0], b_big[1]);
              Mma<T>::run(acc[mt][2 * pair], a_big, b_small[0], b_small[1]);
              Mma<T>::run(acc[mt][2 * pair], a_big, b_big[0], b_big[1]);
              if (2 * pair + 1 < p.n_tiles) {
                Mma<T>::run(acc[mt][2 * pair + 1], a_small, b_big[2], b_big[3]);
                Mma<T>::run(acc[mt][2 * pair + 1], a_big, b_small[2], b_small[3]);
                Mma<T>::run(acc[mt][2 * pair + 1], a_big, b_big[2], b_big[3]);
              }
            }
          }
        }
      }
    };
#pragma unroll
    for (int i = 0; i < kRegKT; ++i) {
      const int kt = warp_k_tile(p, ks, i);
      if (i < p.warp_k_tiles && kt < p.k_tiles) k_tile_products(a[i], kt);
    }
    for (int j = 0; j < p.smem_k_tiles; ++j) {
      const int kt = warp_k_tile(p, ks, kRegKT + j);
      if (kt < p.k_tiles) {
        uint32_t a_tile[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          const uint4 v = wsm[wsm_index<kMT>(p, warp, j, mt) * 32 + lane];
          a_tile[mt][0] = v.x;
          a_tile[mt][1] = v.y;
          a_tile[mt][2] = v.z;
          a_tile[mt][3] = v.w;
        }
        k_tile_products(a_tile, kt);
      }
    }
    if constexpr (kLateX) {
      load_x<kGates, kOwned, kSplitK>(p, x, row_lengths, xg, false, s, ks, lane, unit, direction, rows0);
    }
    // The reduce-scatter: each split leaves the tiles it does not own in its partial slots (l2 with
    // the partials in hbuf's slices: once every warp's products have read them).
    if constexpr (kL2) {
      if (alias_partials) __syncthreads();
    }
    if constexpr (kSplitK > 1) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const int owner = tile_owner<kSplitK>(nt);
        if (nt < p.n_tiles && owner != ks) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            partials[partial_index<kSplitK, kMT>(p, unit_warp, nt, partial_slot(ks, owner), mt) * 32 + lane] =
                make_float4(acc[mt][nt][0], acc[mt][nt][1], acc[mt][nt][2], acc[mt][nt][3]);
          }
        }
      }
    }
    __syncthreads();  // every warp has read buffer `buffer` and left its partials
    if constexpr (!kL2) {
      if (s >= 1 && threadIdx.x == 0) {
        // Re-armed for step s + 2 only now: every thread of the CTA has seen this phase complete.
        mbarrier_arrive_expect_tx(&full[buffer], plan.expect_bytes(kBytes));
      }
    }
#pragma unroll
    for (int o = 0; o < kOwned; ++o) {
      const int nt = ks + kSplitK * o;
      if (nt >= p.n_tiles) continue;
      // acc[.][nt] with nt a compile-time index: the owned tile is picked by a predicate.
      float sum[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          float value = 0.0f;
#pragma unroll
          for (int candidate = o * kSplitK; candidate < (o + 1) * kSplitK && candidate < kNTiles; ++candidate) {
            if (candidate == nt) value = acc[mt][candidate][r];
          }
          sum[mt][r] = value;
        }
#pragma unroll
      for (int from = 0; from < kSplitK; ++from) {
        if (from == ks) continue;
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          const int block = partial_index<kSplitK, kMT>(p, unit_warp, nt, partial_slot(from, ks), mt);
          const float4 v = partials[block * 32 + lane];
          sum[mt][0] += v.x;
          sum[mt][1] += v.y;
          sum[mt][2] += v.z;
          sum[mt][3] += v.w;
        }
      }
      T published[2];  // l2: h_{s+1} of the lane's two rows, for its tagged words
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = 8 * nt + 2 * (lane & 3) + e;
        const int b = rows0 + row;
        const int length = row_lengths[row];
        int slice, column;
        h_slice(p, unit, slice, column);
        T h = hbuf[hbuf_at<kBytes>(p, buffer, slice, row, column)];
        if (unit < H && b < B) {
          const int t = s < length ? step_time(direction, s, length) : s;
          const int64_t at = (static_cast<int64_t>(t) * B + b);
          if (s < length) {
            float x_gates[kGates], hidden[kGates];
#pragma unroll
            for (int g = 0; g < kGates; ++g) {
              // Gate g of this unit and column: accumulator 2 * (g & 1) + e of M tile g / 2.
              hidden[g] = sum[g >> 1][2 * (g & 1) + e] + (g == Cell::kHiddenBiasGate ? hidden_bias : 0.0f);
              if constexpr (kBytes == 4) {
                if constexpr (kXg == 4) {
                  x_gates[g] = g == 0 ? x[o][e].x : g == 1 ? x[o][e].y : g == 2 ? x[o][e].z : x[o][e].w;
                } else {
                  x_gates[g] = x[o][e];
                }
              } else if constexpr (kXg == 4) {
                const uint32_t pair = g < 2 ? x[o][e].x : x[o][e].y;
                x_gates[g] = to_float<T>(static_cast<uint16_t>(g & 1 ? pair >> 16 : pair & 0xffff));
              } else {
                x_gates[g] = to_float<T>(x[o][e]);
              }
            }
            float saved[Cell::kSaved > 0 ? Cell::kSaved : 1];
            float h_new;
            Cell::forward(x_gates, hidden, static_cast<float>(h), h_new, c[o][e], saved, p.relu);
            h = static_cast<T>(h_new);
            output[at * 2 * H + direction * H + unit] = h;
            if (p.workspace != nullptr) {
#pragma unroll
              for (int slot = 0; slot < Cell::kSaved; ++slot) {
                p.workspace[(at * 2 + direction) * Cell::kSaved * H + slot * H + unit] = saved[slot];
              }
            }
            if (s == length - 1) {
              const int64_t state = (static_cast<int64_t>(direction) * B + b) * H + unit;
              static_cast<T*>(p.h_n)[state] = h;
              if (Cell::kHasCellState) static_cast<T*>(p.c_n)[state] = static_cast<T>(c[o][e]);
            }
          } else {
            output[at * 2 * H + direction * H + unit] = zero;
            if (p.workspace != nullptr) {
#pragma unroll
              for (int slot = 0; slot < Cell::kSaved; ++slot) {
                p.workspace[(at * 2 + direction) * Cell::kSaved * H + slot * H + unit] = 0.0f;
              }
            }
          }
        }
        hbuf[hbuf_at<kBytes>(p, next, slice, row, column)] = h;
        if constexpr (kL2) published[e] = h;
      }
      if constexpr (kL2) {
        // h_{s+1} of the lane's elements (every row and unit of the slice, padding too: the readers
        // stage them all) as tagged words, parity (s + 1) % 2: one word (16-bit: rows e = 0, 1 of
        // the unit) or two (fp32). A store each, no fence: the tag travels with the value.
        if (s + 1 < steps && p.cluster > 1) {
          const int column = unit - rank * p.units;
          const unsigned long long tag = static_cast<unsigned long long>(word_tag(s + 1)) << 32;
          if constexpr (kBytes == 4) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int word_row = 8 * nt + 2 * (lane & 3) + e;
              store_relaxed_gpu(exchange->words + exchange_word(p, exchange->word_rows, exchange->chunks, (s + 1) & 1, direction, blockIdx.z,
                                                         rank, word_row, column),
                                tag | bits_of(published[e]));
            }
          } else {
            const int word_row = 4 * nt + (lane & 3);
            store_relaxed_gpu(exchange->words + exchange_word(p, exchange->word_rows, exchange->chunks, (s + 1) & 1, direction, blockIdx.z,
                                                       rank, word_row, column),
                              tag | bits_of(published[0]) | (bits_of(published[1]) << 16));
          }
        }
      }
    }
    if (!kL2 && s + 1 < steps) {
      fence_proxy_async();  // this thread's h stores, before the bulk copies read them
      __syncthreads();
      // Lane r of warp 0 sends our slice of the next buffer to peer r.
      if (warp == 0 && lane < p.cluster && lane != rank) {
        const uint32_t source = hbuf_address + kBytes * hbuf_at<kBytes>(p, next, rank, 0, 0);
        bulk_copy_to_peer(map_to_rank(source, lane), source, plan.slice_bytes(kBytes),
                          map_to_rank(smem_address(&full[next]), lane));
      }
    }
  }

  // --- Steps past the chunk's longest row: padding of every row.
  for (int e = threadIdx.x; e < (p.T - steps) * rows * p.units; e += blockDim.x) {
    const int s = steps + e / (rows * p.units);
    const int row = e / p.units % rows;
    const int u = rank * p.units + e % p.units;
    const int b = rows0 + row;
    if (b < B && u < H) {
      const int64_t at = static_cast<int64_t>(s) * B + b;
      output[at * 2 * H + direction * H + u] = zero;
      if (p.workspace != nullptr) {
        for (int slot = 0; slot < Cell::kSaved; ++slot) {
          p.workspace[(at * 2 + direction) * Cell::kSaved * H + slot * H + u] = 0.0f;
        }
      }
    }
  }
  // No CTA leaves while a peer may still address its shared memory.
  if constexpr (!kL2) cluster_sync();
}

}  // namespace birnn_fast::cuda

// One entry per (cell family, dtype, split_k, register K tiles): the names and the list are
// cuda_schedule.kernel_name / INSTANCES (tests/test_cuda_build.py checks the cubins hold exactly
// those). One cubin per family and element size (build.py compiles this file with -DBIRNN_FAMILY=0,
// 1, 2, and with -DBIRNN_FP32 for the fp32 kernels, in parallel).
#define BIRNN_FORWARD_KERNEL(CELL, NAME, DTYPE, TYPE, S, R, PASSES)                                        \
  extern "C" __global__ void __launch_bounds__(256, 1)                                                    \
      birnn_forward_##NAME##_##DTYPE##_s##S##_r##R(const birnn_fast::cuda::ForwardParams p) {             \
    birnn_fast::cuda::forward_kernel<birnn_fast::cuda::CELL, TYPE, S, R, PASSES>(p);                      \
  }
#define BIRNN_FORWARD_INSTANCE(CELL, NAME, DTYPE, TYPE, S, R) BIRNN_FORWARD_KERNEL(CELL, NAME, DTYPE, TYPE, S, R, 1)
#define BIRNN_FORWARD_DTYPES(CELL, NAME, S, R)                         \
  BIRNN_FORWARD_INSTANCE(CELL, NAME, bf16, __nv_bfloat16, S, R)       \
  BIRNN_FORWARD_INSTANCE(CELL, NAME, fp16, __half, S, R)
// fp32 layers: tf32 (one TF32 MMA a product) and fp32 (3xTF32), the (S, R) cuda_schedule.FP32_VARIANTS.
#define BIRNN_FORWARD_FP32(CELL, NAME)                         \
  BIRNN_FORWARD_KERNEL(CELL, NAME, tf32, float, 8, 4, 1)       \
  BIRNN_FORWARD_KERNEL(CELL, NAME, tf32, float, 4, 8, 1)       \
  BIRNN_FORWARD_KERNEL(CELL, NAME, tf32, float, 2, 6, 1)       \
  BIRNN_FORWARD_KERNEL(CELL, NAME, fp32, float, 8, 4, 3)       \
  BIRNN_FORWARD_KERNEL(CELL, NAME, fp32, float, 4, 8, 3)       \
  BIRNN_FORWARD_KERNEL(CELL, NAME, fp32, float, 2, 6, 3)

// The l2 exchange's kernels (-DBIRNN_L2, their own cubins: forward_<family>_l2[_fp32]), every (S, R)
// of the cluster ones: cuda_schedule.L2_INSTANCES.
#define BIRNN_FORWARD_L2_KERNEL(CELL, NAME, DTYPE, TYPE, S, R, PASSES)                                     \
  extern "C" __global__ void __launch_bounds__(256, 1)                                                    \
      birnn_forward_##NAME##_##DTYPE##_l2_s##S##_r##R(const birnn_fast::cuda::L2Params x) {               \
    birnn_fast::cuda::forward_kernel<birnn_fast::cuda::CELL, TYPE, S, R, PASSES, true>(x.p, &x);          \
  }
#define BIRNN_FORWARD_L2_DTYPES(CELL, NAME, S, R)                                     \
  BIRNN_FORWARD_L2_KERNEL(CELL, NAME, bf16, __nv_bfloat16, S, R, 1)                   \
  BIRNN_FORWARD_L2_KERNEL(CELL, NAME, fp16, __half, S, R, 1)
#define BIRNN_FORWARD_L2_HALF(CELL, NAME)    \
  BIRNN_FORWARD_L2_DTYPES(CELL, NAME, 2, 4)  \
  BIRNN_FORWARD_L2_DTYPES(CELL, NAME, 2, 8)  \
  BIRNN_FORWARD_L2_DTYPES(CELL, NAME, 4, 4)  \
  BIRNN_FORWARD_L2_DTYPES(CELL, NAME, 4, 8)  \
  BIRNN_FORWARD_L2_DTYPES(CELL, NAME, 8, 4)  \
  BIRNN_FORWARD_L2_DTYPES(CELL, NAME, 8, 8)
#define BIRNN_FORWARD_L2_FP32(CELL, NAME)                         \
  BIRNN_FORWARD_L2_KERNEL(CELL, NAME, tf32, float, 8, 4, 1)       \
  BIRNN_FORWARD_L2_KERNEL(CELL, NAME, tf32, float, 4, 8, 1)       \
  BIRNN_FORWARD_L2_KERNEL(CELL, NAME, tf32, float, 2, 6, 1)       \
  BIRNN_FORWARD_L2_KERNEL(CELL, NAME, fp32, float, 8, 4, 3)       \
  BIRNN_FORWARD_L2_KERNEL(CELL, NAME, fp32, float, 4, 8, 3)       \
  BIRNN_FORWARD_L2_KERNEL(CELL, NAME, fp32, float, 2, 6, 3)

#if defined(BIRNN_L2)
#if defined(BIRNN_FP32)
#define BIRNN_FORWARD_L2_FAMILY BIRNN_FORWARD_L2_FP32
#else
#define BIRNN_FORWARD_L2_FAMILY BIRNN_FORWARD_L2_HALF
#endif
#if BIRNN_FAMILY == 0  // lstm
BIRNN_FORWARD_L2_FAMILY(LstmCell, lstm)
#endif
#if BIRNN_FAMILY == 1  // gru
BIRNN_FORWARD_L2_FAMILY(GruCell, gru)
#endif
#if BIRNN_FAMILY == 2  // elman
BIRNN_FORWARD_L2_FAMILY(ElmanCell, elman)
#endif
#elif defined(BIRNN_FP32)
#if BIRNN_FAMILY == 0  // lstm
BIRNN_FORWARD_FP32(LstmCell, lstm)
#endif
#if BIRNN_FAMILY == 1  // gru
BIRNN_FORWARD_FP32(GruCell, gru)
#endif
#if BIRNN_FAMILY == 2  // elman
BIRNN_FORWARD_FP32(ElmanCell, elman)
#endif
#else
#if BIRNN_FAMILY == 0  // lstm
BIRNN_FORWARD_DTYPES(LstmCell, lstm, 2, 4)
BIRNN_FORWARD_DTYPES(LstmCell, lstm, 2, 8)
BIRNN_FORWARD_DTYPES(LstmCell, lstm, 4, 4)
BIRNN_FORWARD_DTYPES(LstmCell, lstm, 4, 8)
BIRNN_FORWARD_DTYPES(LstmCell, lstm, 8, 4)
BIRNN_FORWARD_DTYPES(LstmCell, lstm, 8, 8)
#endif
#if BIRNN_FAMILY == 1  // gru
BIRNN_FORWARD_DTYPES(GruCell, gru, 2, 4)
BIRNN_FORWARD_DTYPES(GruCell, gru, 2, 8)
BIRNN_FORWARD_DTYPES(GruCell, gru, 4, 4)
BIRNN_FORWARD_DTYPES(GruCell, gru, 4, 8)
BIRNN_FORWARD_DTYPES(GruCell, gru, 8, 4)
BIRNN_FORWARD_DTYPES(GruCell, gru, 8, 8)
#endif
#if BIRNN_FAMILY == 2  // elman
BIRNN_FORWARD_DTYPES(ElmanCell, elman, 2, 4)
BIRNN_FORWARD_DTYPES(ElmanCell, elman, 2, 8)
BIRNN_FORWARD_DTYPES(ElmanCell, elman, 4, 4)
BIRNN_FORWARD_DTYPES(ElmanCell, elman, 4, 8)
BIRNN_FORWARD_DTYPES(ElmanCell, elman, 8, 4)
BIRNN_FORWARD_DTYPES(ElmanCell, elman, 8, 8)
#endif
#endif
