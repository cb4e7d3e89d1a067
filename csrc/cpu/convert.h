// float32 -> bfloat16 / float16 rows, rounded to nearest even exactly as c10's conversions round
// (NaN stays NaN), vectorized for the widest instruction set allowed (isa.h): c10's scalar
// constructors, compiled for baseline x86-64, cost more per element than the bf16 product does.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cells.h"
#include "isa.h"

namespace birnn_fast::cpu {
namespace convert_detail {

// c10::BFloat16's rounding, branch-free so that the loop vectorizes: NaN -> 0x7FC0, else the
// upper half of bits + 0x7FFF + (bit 16).
BIRNN_INLINE void narrow_bfloat16(int64_t n, const float* from, c10::BFloat16* to) {
  uint16_t* out = reinterpret_cast<uint16_t*>(to);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, from + i, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    out[i] = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline void narrow_bfloat16_avx512(
    int64_t n, const float* from, c10::BFloat16* to) {
  narrow_bfloat16(n, from, to);
}

__attribute__((target("avx2,fma"))) inline void narrow_bfloat16_avx2(int64_t n, const float* from,
                                                                     c10::BFloat16* to) {
  narrow_bfloat16(n, from, to);
}

// IEEE round to nearest even, as c10::Half's software conversion.
__attribute__((target("avx512f,avx512vl,avx2,f16c,fma"))) inline void narrow_half_avx512(int64_t n, const float* from,
                                                                                         c10::Half* to) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    // maskz: GCC 12 warns of the plain form's undefined pass-through operand.
    const __m256i half =
        _mm512_maskz_cvtps_ph(0xFFFF, _mm512_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + i), half);
  }
  for (; i < n; ++i) {
    to[i] = c10::Half(from[i]);
  }
}

__attribute__((target("avx2,f16c,fma"))) inline void narrow_half_avx2(int64_t n, const float* from, c10::Half* to) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i half = _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to + i), half);
  }
  for (; i < n; ++i) {
    to[i] = c10::Half(from[i]);
  }
}
#endif

}  // namespace convert_detail

// to[i] = Low(from[i]) for i < n, Low bfloat16 or float16.
template <typename Low>
void narrow(int64_t n, const float* from, Low* to) {
  static_assert(std::is_same_v<Low, c10::BFloat16> || std::is_same_v<Low, c10::Half>);
#if defined(__GNUC__) && defined(__x86_64__)
  static const Isa isa = effective_isa();
  if constexpr (std::is_same_v<Low, c10::BFloat16>) {
    if (isa == Isa::kAvx512) {
      return convert_detail::narrow_bfloat16_avx512(n, from, to);
    }
    if (isa == Isa::kAvx2) {
      return convert_detail::narrow_bfloat16_avx2(n, from, to);
    }
  } else {
    if (isa == Isa::kAvx512) {
      return convert_detail::narrow_half_avx512(n, from, to);
    }
    if (isa == Isa::kAvx2) {
      return convert_detail::narrow_half_avx2(n, from, to);
    }
  }
#endif
  if constexpr (std::is_same_v<Low, c10::BFloat16>) {
    convert_detail::narrow_bfloat16(n, from, to);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      to[i] = c10::Half(from[i]);
    }
  }
}

// to[i] = from[i] for i < n between a kernel's compute type and its storage type: a copy where they
// are the same, else float32 rounded to bfloat16 / float16.
template <typename To, typename From>
void convert_row(int64_t n, const From* from, To* to) {
  if constexpr (std::is_same_v<To, From>) {
    std::copy_n(from, n, to);
  } else {
    static_assert(std::is_same_v<From, float>, "convert_row: only float32 narrows");
    narrow(n, from, to);
  }
}

// The type a kernel of storage type S computes and keeps its state in: float32 for bfloat16 /
// float16, else S.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>, float, S>;

}  // namespace birnn_fast::cpu
