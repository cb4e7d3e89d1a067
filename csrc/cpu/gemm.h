// The GEMMs the recurrences run inside their per-direction parallel region (single-threaded there),
// on preallocated buffers: the per-step (active rows x H) @ (H x G*H) products, and the input
// projections and weight gradients of a chunk of steps.
//
// - A product whose weight is the same on every step or chunk (ReusedWeight: the recurrent weight
//   in forward and backward, W_ih in the forward projection) runs on the panel kernel of
//   panel_gemm.h, the weight packed once per call: 94-100 GFLOP/s on one core of the development
//   VM (2-core AMD EPYC exposing AVX2 but not AVX-512) at 4-256 rows, where MKL's sgemm ran 29-92.
// - The rest (the weight gradients, whose operands both change per chunk; the input gradient;
//   float64; CPUs without AVX2) goes to at::mm (MKL). Measured alternatives for 64x256 @ 256x1024
//   on one thread: at::mm ~80 GFLOP/s, mkldnn::_linear_pointwise with a plain or prepacked weight
//   ~78, cpublas::brgemm (oneDNN ukernel) ~54; MKL takes a transposed operand as fast as a plain
//   one, so weights are never transposed. Re-measure on a machine whose oneDNN can use AVX-512.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "panel_gemm.h"

namespace birnn_fast::cpu {

// Products this small cost less than one trip through the dispatcher (a few microseconds): plain loops.
constexpr int64_t kSmallMultiplyAdds = 1 << 15;

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

// op(b) of a product that runs many times with the same weight (every step, every chunk): packed
// into panels once for float32 on AVX2 (panel_gemm.h), else used in place through gemm().
template <typename T>
class ReusedWeight {
 public:
  ReusedWeight(int64_t k, int64_t n, const T* b, int64_t ldb, bool transpose_b)
      : k_(k), n_(n), b_(b), ldb_(ldb), transpose_b_(transpose_b) {
    if constexpr (std::is_same_v<T, float>) {
      if (panel_gemm_supported()) {
        panels_ = pack_panels(k, n, b, ldb, transpose_b);
        packed_ = true;
      }
    }
  }

  // c[m, n] = a[m, k] @ op(b) + (c if accumulate, else bias[n] if given).
  void multiply(int64_t m, const T* a, int64_t lda, T* c, int64_t ldc, bool accumulate,
                const T* bias = nullptr) const {
    if constexpr (std::is_same_v<T, float>) {
      if (packed_) {
        panel_gemm(m, a, lda, panels_, c, ldc, start_with_bias(m, n_, bias, c, ldc, accumulate));
        return;
      }
    }
    gemm<T>(m, n_, k_, a, lda, b_, ldb_, transpose_b_, c, ldc, accumulate, bias);
  }

 private:
  int64_t k_, n_;
  const T* b_;
  int64_t ldb_;
  bool transpose_b_;
  bool packed_ = false;
  PanelMatrix panels_;
};

// c[m, n] += a[k, m]^T @ b[k, n]: the weight gradients, summed over k tokens.
template <typename T>
void gemm_tn_accumulate(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                        int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) {
    return;
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
