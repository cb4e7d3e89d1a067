// The reused-weight products of a bfloat16 / float16 layer on oneDNN's brgemm ukernel
// (at::native::cpublas): operands in the layer's dtype (given so, or rounded from float32), float32
// accumulation into the kernels' float32 buffers -- how torch's own bf16 LSTM rounds its products.
// Everything else in the layer (gate math, h, c) stays float32. isa.h's half_products() chooses
// whether this runs.
//
// The weight is laid out once per call; with VNNI it is also packed kVnniColumns columns at a time,
// depth padded to even (pairs of rows interleave), each panel then one brgemm. cpublas::pack packs
// only for AMX (could_pack); oneDNN's AVX512-BF16 / -FP16 brgemm takes the same pair-interleaved
// layout, a plain reorder, which HalfWeight writes itself where cpublas::pack refuses.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "transpose.h"

namespace birnn_fast::cpu {

// cpublas::pack fails on a whole 1024-column weight (measured); torch's CPU flash attention packs
// 64 columns at a time too.
constexpr int64_t kVnniColumns = 64;

template <typename Fn>
decltype(auto) dispatch_half(c10::ScalarType dtype, Fn&& fn) {
  TORCH_INTERNAL_ASSERT(dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half);
  if (dtype == c10::ScalarType::BFloat16) {
    return fn(c10::BFloat16{});
  }
  return fn(c10::Half{});
}

// Whether a Low product reads Src operands: float32 ones (rounded) or Low ones.
template <typename Low, typename Src>
constexpr bool kReads = std::is_same_v<Src, float> || std::is_same_v<Src, Low>;

class HalfWeight {
 public:
  // op(b) (k x n; b[k, n] row-major, or with transpose_b b[n, k]) in dtype: b is float32 (rounded
  // here) or already of dtype.
  template <typename Src>
  HalfWeight(c10::ScalarType dtype, bool vnni, int64_t k, int64_t n, const Src* b, int64_t ldb, bool transpose_b)
      : dtype_(dtype), vnni_(vnni), k_(k), n_(n), depth_(vnni ? k + (k & 1) : k) {
    dispatch_half(dtype, [&](auto low) { lay_out<decltype(low)>(b, ldb, transpose_b); });
  }
  HalfWeight(const HalfWeight&) = delete;
  HalfWeight& operator=(const HalfWeight&) = delete;

  ~HalfWeight() {
    if (vnni_) {
      at::native::cpublas::brgemm_release(/*is_vnni=*/true);  // the thread's AMX tile configuration
    }
  }

  // c[m, n] = round(op(a)) @ op(b) (+ c if add_c), accumulated in float32; op(a) is a[m, k], or
  // with transpose_a the transpose of a[k, m] (the weight gradients' dgates^T); a is float32 or
  // of the weight's dtype.
  template <typename Src>
  void multiply(int64_t m, const Src* a, int64_t lda, float* c, int64_t ldc, bool add_c,
                bool transpose_a = false) const {
    dispatch_half(dtype_, [&](auto low) { multiply_as<decltype(low)>(m, a, lda, c, ldc, add_c, transpose_a); });
  }

 private:
  template <typename Low, typename Src>
  void lay_out(const Src* b, int64_t ldb, bool transpose_b) {
    if constexpr (!kReads<Low, Src>) {
      TORCH_INTERNAL_ASSERT(false, "HalfWeight: a weight of another dtype than the layer's");
    } else {
      lay_out_from<Low>(b, ldb, transpose_b);
    }
  }

  template <typename Low, typename Src>
  void lay_out_from(const Src* b, int64_t ldb, bool transpose_b) {
    const int64_t k = k_, n = n_, panels = (n + kVnniColumns - 1) / kVnniColumns;
    if (vnni_ && !at::native::cpublas::could_pack(dtype_)) {
      // VNNI pairs written straight from b: out[p / 2][j][p % 2] = op(b)[p][first + j], as 32-bit
      // words out32[p / 2][j], low half the even row (x86 is little-endian); padding (an odd
      // depth's last row, a narrow panel's columns) stays zero. Value by value this was 3% of a bf16
      // inference (Zen 4).
      weight_.assign(panels * depth_ * kVnniColumns, 0);
      std::vector<Low> rounded;  // transpose_b: b's rows of a panel rounded to Low, (64, depth)
      std::vector<uint16_t> even(kVnniColumns), odd(kVnniColumns);  // else: a pair of op(b)'s rows
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t first = q * kVnniColumns, columns = std::min(kVnniColumns, n - first);
        uint32_t* out = reinterpret_cast<uint32_t*>(weight_.data() + q * depth_ * kVnniColumns);
        if (transpose_b) {
          // A pair op(b)[p .. p + 1][j] = b[first + j][p .. p + 1] sits side by side in b's row: the
          // panel is the transpose of b's rows read as 32-bit words.
          const Low* source = nullptr;
          int64_t ld = ldb;
          if constexpr (std::is_same_v<Src, Low>) {
            if (k % 2 == 0 && ldb % 2 == 0 && reinterpret_cast<uintptr_t>(b) % alignof(uint32_t) == 0) {
              source = b + first * ldb;  // in place
            }
          }
          if (source == nullptr) {
            rounded.assign(kVnniColumns * depth_, Low(0.0f));
            for (int64_t j = 0; j < columns; ++j) {
              convert_row(k, b + (first + j) * ldb, rounded.data() + j * depth_);
            }
            source = rounded.data();
            ld = depth_;
          }
          transpose(columns, depth_ / 2, reinterpret_cast<const uint32_t*>(source), ld / 2, out, kVnniColumns);
        } else {
          for (int64_t p = 0; p < k; p += 2) {
            convert_row(columns, b + p * ldb + first, reinterpret_cast<Low*>(even.data()));
            if (p + 1 < k) {
              convert_row(columns, b + (p + 1) * ldb + first, reinterpret_cast<Low*>(odd.data()));
            } else {
              std::fill(odd.begin(), odd.end(), 0);
            }
            uint32_t* pairs = out + (p / 2) * kVnniColumns;
            for (int64_t j = 0; j < columns; ++j) {
              pairs[j] = static_cast<uint32_t>(even[j]) | (static_cast<uint32_t>(odd[j]) << 16);
            }
          }
        }
      }
      return;
    }
    std::vector<uint16_t> rows(depth_ * n, 0);  // op(b) rounded, (depth, n); a padding row stays zero
    Low* dst = reinterpret_cast<Low*>(rows.data());
    if (transpose_b) {
      std::vector<Low> rounded(n * k);  // b rounded in its own (n, k) layout, then transposed
      for (int64_t j = 0; j < n; ++j) {
        convert_row(k, b + j * ldb, rounded.data() + j * k);
      }
      transpose(n, k, rounded.data(), k, dst, n);
    } else {
      for (int64_t p = 0; p < k; ++p) {
        convert_row(n, b + p * ldb, dst + p * n);
      }
    }
    if (!vnni_) {
      weight_ = std::move(rows);
      return;
    }
    weight_.assign(panels * depth_ * kVnniColumns, 0);
    std::vector<uint16_t> panel(depth_ * kVnniColumns);
    for (int64_t q = 0; q < panels; ++q) {
      const int64_t first = q * kVnniColumns, columns = std::min(kVnniColumns, n - first);
      std::fill(panel.begin(), panel.end(), 0);  // a last, narrower panel is padded with zero columns
      for (int64_t p = 0; p < depth_; ++p) {
        std::copy_n(rows.data() + p * n + first, columns, panel.data() + p * kVnniColumns);
      }
      at::native::cpublas::pack(depth_, kVnniColumns, kVnniColumns, kVnniColumns, dtype_, dtype_, panel.data(),
                                weight_.data() + q * depth_ * kVnniColumns);
    }
  }

  template <typename Low, typename Src>
  void multiply_as(int64_t m, const Src* a, int64_t lda, float* c, int64_t ldc, bool add_c,
                   bool transpose_a) const {
    if constexpr (!kReads<Low, Src>) {
      TORCH_INTERNAL_ASSERT(false, "HalfWeight: an operand of another dtype than the layer's");
    } else {
      multiply_from<Low>(m, a, lda, c, ldc, add_c, transpose_a);
    }
  }

  template <typename Low, typename Src>
  void multiply_from(int64_t m, const Src* a, int64_t lda, float* c, int64_t ldc, bool add_c,
                     bool transpose_a) const {
    const Low* operand = nullptr;  // round(op(a)), (m, depth) with leading dimension ld
    int64_t ld = depth_;
    if constexpr (std::is_same_v<Src, Low>) {
      if (!transpose_a && depth_ == k_) {
        operand = a;  // already in the layer's dtype: used in place
        ld = lda;
      }
    }
    if (operand == nullptr) {
      rows_.resize(m * depth_);
      Low* rounded = reinterpret_cast<Low*>(rows_.data());
      if (depth_ != k_) {
        for (int64_t i = 0; i < m; ++i) {
          rounded[i * depth_ + k_] = Low(0.0f);  // the padding column
        }
      }
      if (transpose_a) {
        // Rounded in a's row order first, then transposed as 16-bit values: a rounding per strided
        // element ran 7x slower.
        transposed_.resize(k_ * m);
        Low* narrow_rows = reinterpret_cast<Low*>(transposed_.data());
        for (int64_t p = 0; p < k_; ++p) {
          convert_row(m, a + p * lda, narrow_rows + p * m);
        }
        transpose(k_, m, transposed_.data(), m, rows_.data(), depth_);
      } else {
        for (int64_t i = 0; i < m; ++i) {
          convert_row(k_, a + i * lda, rounded + i * depth_);
        }
      }
      operand = rounded;
    }
    const Low* weight = reinterpret_cast<const Low*>(weight_.data());
    if (!vnni_) {
      at::native::cpublas::brgemm(m, n_, k_, ld, n_, ldc, add_c, operand, weight, c, /*is_vnni=*/false);
      return;
    }
    for (int64_t first = 0; first < n_; first += kVnniColumns) {
      const Low* panel = weight + first * depth_;  // panel q = first / 64 starts at q * depth * 64
      const int64_t columns = std::min(kVnniColumns, n_ - first);
      if (columns == kVnniColumns) {
        at::native::cpublas::brgemm(m, kVnniColumns, depth_, ld, kVnniColumns, ldc, add_c, operand, panel, c + first,
                                    /*is_vnni=*/true);
        continue;
      }
      // The padded last panel runs whole into a scratch tile: c's row may end at column n.
      scratch_.resize(m * kVnniColumns);
      at::native::cpublas::brgemm(m, kVnniColumns, depth_, ld, kVnniColumns, kVnniColumns, /*add_C=*/false, operand,
                                  panel, scratch_.data(), /*is_vnni=*/true);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < columns; ++j) {
          float& out = c[i * ldc + first + j];
          out = (add_c ? out : 0.0f) + scratch_[i * kVnniColumns + j];
        }
      }
    }
  }

  c10::ScalarType dtype_;
  bool vnni_;
  int64_t k_, n_, depth_;  // depth: k, rounded up to even with VNNI
  std::vector<uint16_t> weight_;  // (depth, n) row-major; with VNNI, panels of (depth, 64) packed
  // Per-call scratch: a ReusedWeight is used by one thread (its direction's).
  mutable std::vector<uint16_t> rows_;  // a rounded, (m, depth)
  mutable std::vector<uint16_t> transposed_;  // with transpose_a, a rounded in its own layout (k, m)
  mutable std::vector<float> scratch_;
};

// Whether the VNNI path computes what the plain product does on this CPU (exactly: the values are
// small multiples of 1/4), so that a library or CPU the packed layout was never run on falls back
// instead of returning wrong numbers.
inline bool vnni_products_work(c10::ScalarType dtype) {
  try {
    constexpr int64_t m = 5, k = 35, n = kVnniColumns + 17;  // odd depth, a narrow last panel
    std::vector<float> a(m * k), b(k * n), c(m * n), expected(m * n, 0.0f);
    for (int64_t i = 0; i < m * k; ++i) {
      a[i] = static_cast<float>(i * 7 % 9 - 4) * 0.25f;
    }
    for (int64_t i = 0; i < k * n; ++i) {
      b[i] = static_cast<float>(i * 5 % 7 - 3) * 0.25f;
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t p = 0; p < k; ++p) {
        for (int64_t j = 0; j < n; ++j) {
          expected[i * n + j] += a[i * k + p] * b[p * n + j];
        }
      }
    }
    {
      const HalfWeight weight(dtype, /*vnni=*/true, k, n, b.data(), n, /*transpose_b=*/false);
      weight.multiply(m, a.data(), k, c.data(), n, /*add_c=*/false);
    }
    return c == expected;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace birnn_fast::cpu
