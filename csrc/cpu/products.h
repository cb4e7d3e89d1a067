// The products the recurrences run inside their per-direction parallel region (single-threaded
// there), on preallocated buffers: the per-step (running rows x K) @ (K x N) products with a weight
// every step reuses (ReusedWeight: W_hh forward and backward, W_ih in the chunked projection,
// W_hr of a projected LSTM), and the chunk-sized products whose operands both change (gemm,
// gemm_tn_accumulate: weight and input gradients).
//
// A reused float32 weight runs on the backend isa.h chose for the CPU (float32_products): the AVX2
// panel kernel (panel_gemm.h), oneDNN's brgemm ukernel (at::native::cpublas::brgemm, AVX-512 /
// AMX), or at::mm (MKL); a bfloat16 / float16 layer's weight (or its float32 copy), on the backend
// half_products chose: brgemm on operands in that dtype (half_products.h), or as float32.
// Everything else runs on at::mm, whose kernels MKL picks for the CPU; MKL
// takes a transposed operand as fast as a plain one, so weights are used in place. Products
// smaller than one trip through the dispatcher run as plain loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "half_products.h"
#include "isa.h"
#include "panel_gemm.h"
#include "transpose.h"

namespace birnn_fast::cpu {

// Products this small cost less than one trip through the dispatcher (a few microseconds): plain loops.
constexpr int64_t kSmallMultiplyAdds = 1 << 15;

// Columns per float32 brgemm call (panel of a reused weight): on AVX-512 (Zen 5, one thread, M =
// 32-64, K = 256, N = 1024) 64-column panels ran 10-18% faster than the whole N in one call
// (benchmarks/cpu_products.py, brgemm64).
constexpr int64_t kBrgemmColumns = 64;

// With a bias, c's rows start as copies of it and the product is accumulated onto them; returns
// whether the product accumulates.
template <typename T>
bool start_with_bias(int64_t m, int64_t n, const T* bias, T* c, int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(bias == nullptr || !accumulate);
  if (bias == nullptr) {
    return accumulate;
  }
  for (int64_t i = 0; i < m; ++i) {
    std::copy_n(bias, n, c + i * ldc);
  }
  return true;
}

// c[m, n] = a[m, k] @ b[k, n] (+ c if add_c) on oneDNN's brgemm, b in place, kBrgemmColumns
// columns per call; single-threaded, for the products inside a direction's thread.
inline void brgemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc, bool add_c) {
  for (int64_t first = 0; first < n; first += kBrgemmColumns) {
    const int64_t columns = std::min(kBrgemmColumns, n - first);
    at::native::cpublas::brgemm(m, columns, k, lda, ldb, ldc, add_c, a, b + first, c + first, /*is_vnni=*/false);
  }
}

// Whether the float32 products of a direction's thread run on brgemm rather than MKL, whose
// sgemm on AMD CPUs runs AVX2 kernels (mkl_blas_def_sgemm_kernel_0_zen) even with AVX-512.
inline bool brgemm_in_thread(int64_t m, int64_t n, int64_t k) {
  return float32_products() == Products::kBrgemm && m * n * k > kSmallMultiplyAdds;
}

// c[m, n] = a[m, k] @ op(b) + (c[m, n] if accumulate, else bias[n] if given); row-major with
// leading dimensions. op(b) is b[k, n], or with transpose_b the transpose of b[n, k]: a layer's
// weights are (G*H, K), used in place by x @ W^T (forward) and by dgates @ W (backward).
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, bool transpose_b, T* c,
          int64_t ldc, bool accumulate, const T* bias = nullptr) {
  if (m == 0 || n == 0) {
    return;
  }
  accumulate = start_with_bias(m, n, bias, c, ldc, accumulate);
  if (m * n * k <= kSmallMultiplyAdds) {
    for (int64_t i = 0; i < m; ++i) {
      const T* a_row = a + i * lda;
      T* c_row = c + i * ldc;
      if (!accumulate) {
        std::fill_n(c_row, n, T(0));
      }
      if (transpose_b) {
        for (int64_t j = 0; j < n; ++j) {
          const T* b_row = b + j * ldb;
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t p = 0; p < k; ++p) {
            sum += a_row[p] * b_row[p];
          }
          c_row[j] += sum;
        }
      } else {
        for (int64_t p = 0; p < k; ++p) {
          const T a_ip = a_row[p];
          const T* b_row = b + p * ldb;
          for (int64_t j = 0; j < n; ++j) {
            c_row[j] += a_ip * b_row[j];
          }
        }
      }
    }
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a_view = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, options);
  const at::Tensor b_view = transpose_b ? at::from_blob(const_cast<T*>(b), {k, n}, {1, ldb}, options)
                                        : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, options);
  at::Tensor c_view = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (accumulate) {
    c_view.addmm_(a_view, b_view);
  } else {
    at::mm_out(c_view, a_view, b_view);
  }
}

// op(b) of a product that runs many times with the same weight (every step, every chunk), laid out
// once per call for the float32 backend (panels for the panel kernel, (k, n) row-major for
// brgemm); used in place through gemm() for at::mm and float64. `layer_dtype` is the dtype of the
// layer whose float32 copy b is: bfloat16 / float16 may run the product in that dtype.
template <typename T>
class ReusedWeight {
 public:
  ReusedWeight(int64_t k, int64_t n, const T* b, int64_t ldb, bool transpose_b,
               c10::ScalarType layer_dtype = c10::CppTypeToScalarType<T>::value)
      : k_(k), n_(n), b_(b), ldb_(ldb), transpose_b_(transpose_b) {
    if constexpr (std::is_same_v<T, float>) {
      if (layer_dtype == c10::ScalarType::BFloat16 || layer_dtype == c10::ScalarType::Half) {
        const HalfProducts products = half_products(layer_dtype);
        if (products != HalfProducts::kFloat32) {
          half_ = std::make_unique<HalfWeight>(layer_dtype, products == HalfProducts::kBrgemmVnni, k, n, b, ldb,
                                               transpose_b);
          return;
        }
      }
      products_ = float32_products();
      if (products_ == Products::kPanel) {
        panels_ = pack_panels(k, n, b, ldb, transpose_b);
      } else if (products_ == Products::kBrgemm) {
        // Panels of kBrgemmColumns columns, each (k, columns) row-major, one after another.
        rows_ = PanelStorage::acquire(k * n);
        for (int64_t first = 0; first < n; first += kBrgemmColumns) {
          const int64_t columns = std::min(kBrgemmColumns, n - first);
          float* panel = rows_.data() + first * k;
          if (transpose_b) {
            transpose(columns, k, b + first * ldb, ldb, panel, columns);
          } else {
            for (int64_t p = 0; p < k; ++p) {
              std::copy_n(b + p * ldb + first, columns, panel + p * columns);
            }
          }
        }
      }
    }
  }
  // A bfloat16 / float16 layer's own weight (the kernels of that storage type): always on the half
  // backend, which half_products must have chosen.
  template <typename Low, typename = std::enable_if_t<!std::is_same_v<Low, T>>>
  ReusedWeight(int64_t k, int64_t n, const Low* b, int64_t ldb, bool transpose_b, c10::ScalarType layer_dtype)
      : k_(k), n_(n), b_(nullptr), ldb_(ldb), transpose_b_(transpose_b) {
    static_assert(std::is_same_v<T, float>);
    constexpr c10::ScalarType dtype = c10::CppTypeToScalarType<Low>::value;
    const HalfProducts products = half_products(dtype);
    TORCH_INTERNAL_ASSERT(layer_dtype == dtype && products != HalfProducts::kFloat32);
    half_ = std::make_unique<HalfWeight>(dtype, products == HalfProducts::kBrgemmVnni, k, n, b, ldb, transpose_b);
  }
  ReusedWeight(const ReusedWeight&) = delete;
  ReusedWeight& operator=(const ReusedWeight&) = delete;

  ~ReusedWeight() {
    if constexpr (std::is_same_v<T, float>) {
      if (products_ == Products::kBrgemm) {
        at::native::cpublas::brgemm_release(/*is_vnni=*/false);
        PanelStorage::release(rows_);
      }
    }
  }

  // c[m, n] = a[m, k] @ op(b) + (c if accumulate, else bias[n] if given); a is of T, or of the
  // half backend's dtype.
  template <typename Src = T>
  void multiply(int64_t m, const Src* a, int64_t lda, T* c, int64_t ldc, bool accumulate,
                const T* bias = nullptr) const {
    if (m == 0) {
      return;
    }
    if constexpr (!std::is_same_v<Src, T>) {
      half_->multiply(m, a, lda, c, ldc, start_with_bias(m, n_, bias, c, ldc, accumulate));
      return;
    } else if constexpr (std::is_same_v<T, float>) {
      // b_ is null for a weight given in the half dtype: then every product runs on the half backend.
      if (half_ && (b_ == nullptr || m * n_ * k_ > kSmallMultiplyAdds)) {
        half_->multiply(m, a, lda, c, ldc, start_with_bias(m, n_, bias, c, ldc, accumulate));
        return;
      }
      if (products_ == Products::kPanel) {
        panel_gemm(m, a, lda, panels_, c, ldc, start_with_bias(m, n_, bias, c, ldc, accumulate));
        return;
      }
      if (products_ == Products::kBrgemm) {
        const bool add_c = start_with_bias(m, n_, bias, c, ldc, accumulate);
        const bool small = m * n_ * k_ <= kSmallMultiplyAdds;
        for (int64_t first = 0; first < n_; first += kBrgemmColumns) {
          const int64_t columns = std::min(kBrgemmColumns, n_ - first);
          const float* panel = rows_.data() + first * k_;
          if (small) {
            // gemm()'s plain loop on the row-major panel runs along its columns; on the weight in
            // place (transpose_b) it would take a dot product and a horizontal sum per column.
            gemm<float>(m, columns, k_, a, lda, panel, columns, /*transpose_b=*/false, c + first, ldc, add_c);
          } else {
            at::native::cpublas::brgemm(m, columns, k_, lda, columns, ldc, add_c, a, panel, c + first,
                                        /*is_vnni=*/false);
          }
        }
        return;
      }
    }
    if constexpr (std::is_same_v<Src, T>) {
      gemm<T>(m, n_, k_, a, lda, b_, ldb_, transpose_b_, c, ldc, accumulate, bias);
    }
  }

 private:
  int64_t k_, n_;
  const T* b_;
  int64_t ldb_;
  bool transpose_b_;
  Products products_ = Products::kMm;
  PanelMatrix panels_;
  std::vector<float> rows_;
  // A pointer rather than std::optional, whose inlined destructor GCC 12 takes for a read of
  // uninitialized memory in the float64 kernels (-Wmaybe-uninitialized), which never make one.
  std::unique_ptr<HalfWeight> half_;
};

// c[m, n] = a[m, k] @ b[k, n] inside a direction's thread (the backward's dX by chunks): on brgemm
// where the float32 products run on it, else gemm.
template <typename T>
void gemm_in_thread(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                    int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (brgemm_in_thread(m, n, k)) {
      brgemm_nn(m, n, k, a, lda, b, ldb, c, ldc, /*add_c=*/false);
      return;
    }
  }
  gemm<T>(m, n, k, a, lda, b, ldb, /*transpose_b=*/false, c, ldc, /*accumulate=*/false);
}

// c[m, n] += a[k, m]^T @ b[k, n]: the weight gradients, summed over k tokens; for the float32
// copies of a bfloat16 / float16 layer (layer_dtype), on the half backend where it runs natively.
template <typename T>
void gemm_tn_accumulate(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                        int64_t ldc, c10::ScalarType layer_dtype = c10::CppTypeToScalarType<T>::value) {
  if (m == 0 || n == 0 || k == 0) {
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if ((layer_dtype == c10::ScalarType::BFloat16 || layer_dtype == c10::ScalarType::Half) &&
        half_products(layer_dtype) != HalfProducts::kFloat32 && m * n * k > kSmallMultiplyAdds) {
      const HalfWeight tokens(layer_dtype, half_products(layer_dtype) == HalfProducts::kBrgemmVnni, k, n, b, ldb,
                              /*transpose_b=*/false);
      tokens.multiply(m, a, lda, c, ldc, /*add_c=*/true, /*transpose_a=*/true);
      return;
    }
    if (brgemm_in_thread(m, n, k)) {
      // brgemm reads a row-major (m, k) left operand: a^T, written once per call into a buffer the
      // thread keeps (m * k floats: 2 MiB at H = 1024 and 128-row chunks).
      static thread_local std::vector<float> transposed;
      transposed.resize(m * k);
      transpose(k, m, a, lda, transposed.data(), k);
      brgemm_nn(m, n, k, transposed.data(), k, b, ldb, c, ldc, /*add_c=*/true);
      return;
    }
  }
  if (m * n * k <= kSmallMultiplyAdds) {
    for (int64_t p = 0; p < k; ++p) {
      const T* b_row = b + p * ldb;
      for (int64_t i = 0; i < m; ++i) {
        const T a_pi = a[p * lda + i];
        T* c_row = c + i * ldc;
        for (int64_t j = 0; j < n; ++j) {
          c_row[j] += a_pi * b_row[j];
        }
      }
    }
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a_view = at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, options);
  const at::Tensor b_view = at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, options);
  at::Tensor c_view = at::from_blob(c, {m, n}, {ldc, 1}, options);
  c_view.addmm_(a_view.t(), b_view);
}

}  // namespace birnn_fast::cpu
