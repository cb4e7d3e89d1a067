// Out-of-place transposes for the products' operands: a reused weight laid out as (K, N) panels
// from its (N, K) rows, dgates^T for the weight gradients (float32, and 16-bit after rounding).
// Blocks of 8 x 8 move through registers (AVX2 for 32-bit values, SSE2 for 16-bit ones); the edges
// and other element sizes go one by one. Value by value, the strided side touched a new cache line
// for every value: 6% of a float32 training step and 13% of a batch-1 inference (Zen 4).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa.h"

namespace birnn_fast::cpu {
namespace transpose_detail {

template <typename T>
void scalar(int64_t rows, int64_t columns, const T* from, int64_t ld_from, T* to, int64_t ld_to) {
  for (int64_t p = 0; p < rows; ++p) {
    for (int64_t i = 0; i < columns; ++i) {
      to[i * ld_to + p] = from[p * ld_from + i];
    }
  }
}

// The 8 x 8 blocks of [0, rows) x [0, columns) rounded down to 8, 32 x 32 values at a time (the
// best of 8-64 for the kernels' shapes, 128 x 1024 dgates to 64 x 256 weight panels, Zen 4: 2-5x
// the value-by-value tiles). A macro: the blocks' instruction sets (target attributes) differ, and
// GCC inlines no block into a shared loop of another target.
#define BIRNN_FOR_BLOCKS(rows, columns, p, i, body)                                     \
  do {                                                                                \
    constexpr int64_t kTile = 32;                                                     \
    const int64_t block_rows_ = (rows) / 8 * 8, block_columns_ = (columns) / 8 * 8;  \
    for (int64_t p0 = 0; p0 < block_rows_; p0 += kTile)                               \
      for (int64_t i0 = 0; i0 < block_columns_; i0 += kTile)                          \
        for (int64_t p = p0; p < std::min(p0 + kTile, block_rows_); p += 8)            \
          for (int64_t i = i0; i < std::min(i0 + kTile, block_columns_); i += 8) body; \
  } while (false)

#if defined(__GNUC__) && defined(__x86_64__)
// to's 8 rows = from's 8 columns, 32-bit values.
__attribute__((target("avx2"), always_inline)) inline void block8_32(const float* from, int64_t ld_from, float* to,
                                                                      int64_t ld_to) {
  __m256 r[8], s[8];
#pragma GCC unroll 8
  for (int q = 0; q < 8; ++q) {
    r[q] = _mm256_loadu_ps(from + q * ld_from);
  }
#pragma GCC unroll 2
  for (int q = 0; q < 8; q += 4) {
    // Pairs of rows interleaved, then pairs of pairs: s[q + c] holds column c (and c + 4 in its
    // upper half) of rows q .. q + 3.
    const __m256 lo01 = _mm256_unpacklo_ps(r[q], r[q + 1]), hi01 = _mm256_unpackhi_ps(r[q], r[q + 1]);
    const __m256 lo23 = _mm256_unpacklo_ps(r[q + 2], r[q + 3]), hi23 = _mm256_unpackhi_ps(r[q + 2], r[q + 3]);
    s[q] = _mm256_shuffle_ps(lo01, lo23, _MM_SHUFFLE(1, 0, 1, 0));
    s[q + 1] = _mm256_shuffle_ps(lo01, lo23, _MM_SHUFFLE(3, 2, 3, 2));
    s[q + 2] = _mm256_shuffle_ps(hi01, hi23, _MM_SHUFFLE(1, 0, 1, 0));
    s[q + 3] = _mm256_shuffle_ps(hi01, hi23, _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(to + c * ld_to, _mm256_permute2f128_ps(s[c], s[c + 4], 0x20));
    _mm256_storeu_ps(to + (c + 4) * ld_to, _mm256_permute2f128_ps(s[c], s[c + 4], 0x31));
  }
}

__attribute__((target("avx2"))) inline void blocks_32_avx2(int64_t rows, int64_t columns, const float* from,
                                                            int64_t ld_from, float* to, int64_t ld_to) {
  BIRNN_FOR_BLOCKS(rows, columns, p, i, block8_32(from + p * ld_from + i, ld_from, to + i * ld_to + p, ld_to));
}

// The same for 16-bit values, in SSE2 registers (every x86-64 CPU).
inline void block8_16(const uint16_t* from, int64_t ld_from, uint16_t* to, int64_t ld_to) {
  __m128i r[8], s[8];
  for (int q = 0; q < 8; ++q) {
    r[q] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + q * ld_from));
  }
  for (int q = 0; q < 8; q += 2) {  // rows q, q + 1 interleaved: columns 0-3, then 4-7
    s[q] = _mm_unpacklo_epi16(r[q], r[q + 1]);
    s[q + 1] = _mm_unpackhi_epi16(r[q], r[q + 1]);
  }
  // r[4h + 2g + e]: columns 2(2e + g) .. +1 of rows 4h .. 4h + 3 (h: rows 0-3 / 4-7).
  for (int h = 0; h < 2; ++h) {
    for (int e = 0; e < 2; ++e) {
      r[4 * h + e] = _mm_unpacklo_epi32(s[4 * h + e], s[4 * h + 2 + e]);
      r[4 * h + 2 + e] = _mm_unpackhi_epi32(s[4 * h + e], s[4 * h + 2 + e]);
    }
  }
  for (int q = 0; q < 4; ++q) {
    // r[q] holds, for rows 0-3, the columns c0 = 2 * (2 * (q & 1) + (q >> 1)) and c0 + 1.
    const int c0 = 2 * (2 * (q & 1) + (q >> 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to + c0 * ld_to), _mm_unpacklo_epi64(r[q], r[q + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to + (c0 + 1) * ld_to), _mm_unpackhi_epi64(r[q], r[q + 4]));
  }
}

inline void blocks_16(int64_t rows, int64_t columns, const uint16_t* from, int64_t ld_from, uint16_t* to,
                      int64_t ld_to) {
  BIRNN_FOR_BLOCKS(rows, columns, p, i, block8_16(from + p * ld_from + i, ld_from, to + i * ld_to + p, ld_to));
}
#endif

}  // namespace transpose_detail

// to[i * ld_to + p] = from[p * ld_from + i] for p < rows, i < columns; T of 2 or 4 bytes runs in
// 8 x 8 blocks where the CPU allows, any other T (and the edges) value by value.
template <typename T>
void transpose(int64_t rows, int64_t columns, const T* from, int64_t ld_from, T* to, int64_t ld_to) {
  int64_t done_rows = 0, done_columns = 0;  // the block part: [0, done_rows) x [0, done_columns)
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (sizeof(T) == 4) {
    static const bool avx2 = effective_isa() >= Isa::kAvx2;
    if (avx2) {
      transpose_detail::blocks_32_avx2(rows, columns, reinterpret_cast<const float*>(from), ld_from,
                                       reinterpret_cast<float*>(to), ld_to);
      done_rows = rows / 8 * 8;
      done_columns = columns / 8 * 8;
    }
  } else if constexpr (sizeof(T) == 2) {
    transpose_detail::blocks_16(rows, columns, reinterpret_cast<const uint16_t*>(from), ld_from,
                                reinterpret_cast<uint16_t*>(to), ld_to);
    done_rows = rows / 8 * 8;
    done_columns = columns / 8 * 8;
  }
#endif
  // The edges: columns past the blocks for the block rows, then every column of the rows below.
  transpose_detail::scalar(done_rows, columns - done_columns, from + done_columns, ld_from,
                           to + done_columns * ld_to, ld_to);
  transpose_detail::scalar(rows - done_rows, columns, from + done_rows * ld_from, ld_from, to + done_rows, ld_to);
}

#undef BIRNN_FOR_BLOCKS

}  // namespace birnn_fast::cpu
