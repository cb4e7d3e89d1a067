// The AVX2/FMA panel kernel for products whose weight is the same on every step or chunk,
// c[m, n] (+)= a[m, k] @ op(b)[k, n]: op(b) is packed once per call into panels of 16 columns
// (k x 16, contiguous, zero-padded past n), and each product runs a micro-kernel over them, 6 rows x
// 16 columns at a time, streaming the weight once per product while a's rows stay in cache.
//
// It runs where the CPU's (or the ceiling's) widest vectors are AVX2 (isa.h): there it beats MKL's
// sgemm, which repacks the weight on every call, and oneDNN's brgemm, at every row count the
// recurrence uses (benchmarks/cpu_products.py; figures in benchmarks/results/cpu_*.md).
// float32 only; callers check panel_gemm_supported().
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "transpose.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define BIRNN_HAS_PANEL_GEMM 1
#endif

namespace birnn_fast::cpu {

constexpr int64_t kPanelColumns = 16;

// Storage for packed weights, recycled within a thread. A weight is 1 MiB or more per direction and
// call, and a fresh block of that size is mapped anew and faults its pages in on every call. Each
// thread keeps its two largest blocks (a layer's W_ih and W_hh; with more layers, the largest of
// them) and hands out the smallest that fits.
class PanelStorage {
 public:
  static std::vector<float> acquire(size_t size) {
    std::vector<std::vector<float>>& pool = free_blocks();
    auto best = pool.end();
    for (auto block = pool.begin(); block != pool.end(); ++block) {
      if (block->capacity() >= size && (best == pool.end() || block->capacity() < best->capacity())) {
        best = block;
      }
    }
    if (best == pool.end()) {
      return std::vector<float>(size, 0.0f);
    }
    std::vector<float> storage = std::move(*best);
    pool.erase(best);
    storage.assign(size, 0.0f);
    return storage;
  }

  static void release(std::vector<float>& storage) {
    constexpr size_t kKeptBlocks = 2, kLargestKept = size_t{4} << 20;  // floats: 16 MiB, W_hh of H=1024
    if (storage.capacity() == 0 || storage.capacity() > kLargestKept) {
      return;
    }
    std::vector<std::vector<float>>& pool = free_blocks();
    if (pool.size() < kKeptBlocks) {
      pool.push_back(std::move(storage));
      return;
    }
    auto smallest = std::min_element(pool.begin(), pool.end(), [](const auto& a, const auto& b) {
      return a.capacity() < b.capacity();
    });
    if (smallest->capacity() < storage.capacity()) {
      *smallest = std::move(storage);
    }
  }

 private:
  static std::vector<std::vector<float>>& free_blocks() {
    thread_local std::vector<std::vector<float>> pool;
    return pool;
  }
};

// op(b) as panels: op(b)[p, j] at panels[((j / 16) * k + p) * 16 + j % 16].
struct PanelMatrix {
  int64_t k = 0, n = 0;
  std::vector<float> panels;

  PanelMatrix(int64_t k_, int64_t n_, std::vector<float> storage) : k(k_), n(n_), panels(std::move(storage)) {}
  PanelMatrix() = default;
  PanelMatrix(PanelMatrix&&) = default;
  PanelMatrix& operator=(PanelMatrix&&) = default;
  ~PanelMatrix() { PanelStorage::release(panels); }
};

// Packs op(b), b[k, n] row-major (or, with transpose_b, b[n, k]): the weight of one direction.
inline PanelMatrix pack_panels(int64_t k, int64_t n, const float* b, int64_t ldb, bool transpose_b) {
  const int64_t count = (n + kPanelColumns - 1) / kPanelColumns;
  PanelMatrix packed(k, n, PanelStorage::acquire(count * k * kPanelColumns));
  for (int64_t panel = 0; panel < count; ++panel) {
    const int64_t first = panel * kPanelColumns, columns = std::min(kPanelColumns, n - first);
    float* dst = packed.panels.data() + panel * k * kPanelColumns;
    if (transpose_b) {
      transpose(columns, k, b + first * ldb, ldb, dst, kPanelColumns);
    } else {
      for (int64_t p = 0; p < k; ++p) {
        std::copy_n(b + p * ldb + first, columns, dst + p * kPanelColumns);
      }
    }
  }
  return packed;
}

#ifdef BIRNN_HAS_PANEL_GEMM
inline bool panel_gemm_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
}

// Partial sums per accumulator of a block of kRows rows, interleaved over k: a block of 1-3 rows has
// too few accumulators (2 per row) to cover the FMA's latency on its own (4 cycles on 2 pipes: 8 in
// flight). Batch 1 (a TTS model, the last rows of a varlen batch) runs 1-row blocks.
template <int kRows>
constexpr int kPartialSums = kRows == 1 ? 4 : kRows <= 3 ? 2 : 1;

// Accumulators of rows [0, kRows) += a[:, p] * panel[p, 0:16].
template <int kRows>
__attribute__((target("avx2,fma"), always_inline)) inline void panel_multiply_add(int64_t p, const float* a,
                                                                                   int64_t lda, const float* panel,
                                                                                   __m256* low, __m256* high) {
  const __m256 b_low = _mm256_loadu_ps(panel + p * kPanelColumns);
  const __m256 b_high = _mm256_loadu_ps(panel + p * kPanelColumns + 8);
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
    const __m256 a_rp = _mm256_broadcast_ss(a + r * lda + p);
    low[r] = _mm256_fmadd_ps(a_rp, b_low, low[r]);
    high[r] = _mm256_fmadd_ps(a_rp, b_high, high[r]);
  }
}

// Rows [0, kRows) of a against one panel: c[:, 0:columns] (+)= a @ panel.
template <int kRows>
__attribute__((target("avx2,fma"), always_inline)) inline void panel_block(int64_t k, const float* a, int64_t lda,
                                                                            const float* panel, float* c, int64_t ldc,
                                                                            int64_t columns, bool accumulate) {
  constexpr int kSums = kPartialSums<kRows>;
  __m256 low[kSums][kRows], high[kSums][kRows];
#pragma GCC unroll 4
  for (int s = 0; s < kSums; ++s) {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      low[s][r] = _mm256_setzero_ps();
      high[s][r] = _mm256_setzero_ps();
    }
  }
  // k in groups of kSums, the group's s-th into partial sum s; the last k % kSums into sum 0.
  const int64_t grouped = k - k % kSums;
  for (int64_t p = 0; p < grouped; p += kSums) {
#pragma GCC unroll 4
    for (int s = 0; s < kSums; ++s) {
      panel_multiply_add<kRows>(p + s, a, lda, panel, low[s], high[s]);
    }
  }
  for (int64_t p = grouped; p < k; ++p) {
    panel_multiply_add<kRows>(p, a, lda, panel, low[0], high[0]);
  }
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int s = 1; s < kSums; ++s) {
      low[0][r] = _mm256_add_ps(low[0][r], low[s][r]);
      high[0][r] = _mm256_add_ps(high[0][r], high[s][r]);
    }
    float* c_row = c + r * ldc;
    if (columns == kPanelColumns) {
      if (accumulate) {
        low[0][r] = _mm256_add_ps(low[0][r], _mm256_loadu_ps(c_row));
        high[0][r] = _mm256_add_ps(high[0][r], _mm256_loadu_ps(c_row + 8));
      }
      _mm256_storeu_ps(c_row, low[0][r]);
      _mm256_storeu_ps(c_row + 8, high[0][r]);
    } else {
      alignas(32) float row[kPanelColumns];
      _mm256_store_ps(row, low[0][r]);
      _mm256_store_ps(row + 8, high[0][r]);
      for (int64_t j = 0; j < columns; ++j) {
        c_row[j] = accumulate ? c_row[j] + row[j] : row[j];
      }
    }
  }
}

// c[m, n] (+)= a[m, k] @ op(b), op(b) packed. Panel by panel, so the weight streams in once per call
// while a's rows (at most a batch) stay in cache.
__attribute__((target("avx2,fma"))) inline void panel_gemm(int64_t m, const float* a, int64_t lda,
                                                           const PanelMatrix& b, float* c, int64_t ldc,
                                                           bool accumulate) {
  const int64_t k = b.k, count = (b.n + kPanelColumns - 1) / kPanelColumns;
  for (int64_t panel = 0; panel < count; ++panel) {
    const float* weights = b.panels.data() + panel * k * kPanelColumns;
    const int64_t first = panel * kPanelColumns, columns = std::min(kPanelColumns, b.n - first);
    // Blocks of 6 rows; a tail of 1 or 2 is merged with the last block into two of 3-4 rows.
    const int64_t tail = m % 6, full = (tail <= 2 && m > 6) ? m / 6 - 1 : m / 6;
    for (int64_t block = 0; block < full; ++block) {
      panel_block<6>(k, a + block * 6 * lda, lda, weights, c + block * 6 * ldc + first, ldc, columns, accumulate);
    }
    int64_t i = full * 6;
    while (i < m) {
      const int64_t rows = m - i <= 6 ? m - i : (m - i + 1) / 2;
      const float* a_rows = a + i * lda;
      float* c_rows = c + i * ldc + first;
      switch (rows) {
        case 6: panel_block<6>(k, a_rows, lda, weights, c_rows, ldc, columns, accumulate); break;
        case 5: panel_block<5>(k, a_rows, lda, weights, c_rows, ldc, columns, accumulate); break;
        case 4: panel_block<4>(k, a_rows, lda, weights, c_rows, ldc, columns, accumulate); break;
        case 3: panel_block<3>(k, a_rows, lda, weights, c_rows, ldc, columns, accumulate); break;
        case 2: panel_block<2>(k, a_rows, lda, weights, c_rows, ldc, columns, accumulate); break;
        default: panel_block<1>(k, a_rows, lda, weights, c_rows, ldc, columns, accumulate); break;
      }
      i += rows;
    }
  }
}
#else
inline bool panel_gemm_supported() { return false; }
inline void panel_gemm(int64_t, const float*, int64_t, const PanelMatrix&, float*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "panel_gemm needs x86-64 with AVX2");
}
#endif

}  // namespace birnn_fast::cpu
