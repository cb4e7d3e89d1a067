// The element-wise math of the four cells, one row of H units at a time: the only place where the
// cells differ. The recurrences (forward.cpp, backward.cpp) are written once and take a cell as a
// template argument.
//
// Every cell offers the same two row functions, over `units` consecutive hidden units of a row of H
// (all of them, or a thread team member's slice: every pointer then starts at its first unit, and
// gate g of a unit still lies g*H further on):
//   forward(H, units, gx, bias_ih, gh, bias_hh, h, c, saved, out)
//     gx: [G*H] x @ W_ih^T, gh: [G*H] h_prev @ W_hh^T, both without their biases (added here, where
//     they are in cache, rather than copied into every row of the products' output);
//     h, c: [H] state, read as the previous step's and overwritten with this step's (c unused
//     unless kHasCellState); saved: [kSaved*H] this row's workspace slot; out: [H] output row.
//   backward(H, units, saved, h_prev, c_prev, h_t, grad_out, dh, dc, dgx, dgh)
//     dh: [H] gradient reaching h_t through the recurrence, overwritten with the part of dh_prev
//     that does not go through W_hh (only if kDirectHiddenGrad; otherwise the caller's GEMM
//     overwrites it); dc: [H] same for c, overwritten with dc_prev; dgx, dgh: [G*H] gradients of
//     the pre-activations through W_ih and through W_hh (equal unless kSplitGateGrad).
//     h_prev, h_t and grad_out are rows of the layer's storage type S (a bfloat16 / float16 layer's
//     output and gradient, read in place and widened here); everything else is T.
// A projected LSTM (h_t = W_hr (o * tanh(c_t))) passes h = out = its (H) buffer of o * tanh(c_t) to
// forward, and to backward the gradient reaching that buffer as dh with a zero grad_out; its
// backward recomputes the buffer from the saved activations (LstmCell::unprojected).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define BIRNN_INLINE inline __attribute__((always_inline))
#else
#define BIRNN_INLINE inline
#endif

namespace birnn_fast::cpu {

template <typename T>
struct Activation;

// fp64 is the accuracy path (tests at 1e-9): libm.
template <>
struct Activation<double> {
  static BIRNN_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static BIRNN_INLINE double tanh(double x) { return std::tanh(x); }
};

// fp32: Cephes' expf and tanhf polynomials (about 1 ulp), written branch-free so that the row
// loops vectorize; scalar libm calls would cost more than the recurrent GEMM itself.
template <>
struct Activation<float> {
  static BIRNN_INLINE float exp(float x) {
    // Clamped so that the exponent bits below stay within the normal range.
    x = select(x < -87.0f, -87.0f, x);
    x = select(x > 88.0f, 88.0f, x);
    // Rounds to nearest by adding and removing 1.5 * 2^23; std::floor would not vectorize without
    // -fno-trapping-math.
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  }
  static BIRNN_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }
  static BIRNN_INLINE float tanh(float x) {
    // Near 0 the odd polynomial keeps the relative accuracy that 1 - 2/(e^2x + 1) loses.
    const float a = std::fabs(x);
    const float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const float small = p * z * x + x;
    const float large = std::copysign(1.0f - 2.0f / (exp(2.0f * a) + 1.0f), x);
    return select(a < 0.625f, small, large);
  }
  // A bitwise blend: GCC keeps a `?:` of an inlined function as a branch under the default
  // -ftrapping-math, which stops the AVX2 loops from vectorizing.
  static BIRNN_INLINE float select(bool condition, float if_true, float if_false) {
    int32_t bits_true, bits_false;
    std::memcpy(&bits_true, &if_true, sizeof(float));
    std::memcpy(&bits_false, &if_false, sizeof(float));
    const int32_t mask = -static_cast<int32_t>(condition);
    const int32_t bits = (bits_true & mask) | (bits_false & ~mask);
    float result;
    std::memcpy(&result, &bits, sizeof(float));
    return result;
  }
};

// Gates i, f, g, o; saved: i, f, g, o (activated) and c_t.
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 5;
  static constexpr bool kHasCellState = true;
  static constexpr int kCellStateSlot = 4;  // where c_t sits in saved, in units of H
  static constexpr int kOutputGateSlot = 3;
  static constexpr bool kSplitGateGrad = false;
  static constexpr bool kDirectHiddenGrad = false;
  static constexpr bool kCanProject = true;

  // o * tanh(c_t) of one row, as forward computed it, from its saved activations.
  template <typename T>
  static BIRNN_INLINE void unprojected(int64_t H, const T* saved, T* out) {
    using A = Activation<T>;
    const T* o = saved + kOutputGateSlot * H;
    const T* c_t = saved + kCellStateSlot * H;
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      out[k] = o[k] * A::tanh(c_t[k]);
    }
  }

  template <bool kSave, typename T>
  static BIRNN_INLINE void forward(int64_t H, int64_t units, const T* gx, const T* bias_ih, const T* gh,
                                   const T* bias_hh, T* h, T* c, T* saved, T* out) {
    using A = Activation<T>;
#pragma omp simd
    for (int64_t k = 0; k < units; ++k) {
      const T i = A::sigmoid((gx[k] + bias_ih[k]) + (gh[k] + bias_hh[k]));
      const T f = A::sigmoid((gx[H + k] + bias_ih[H + k]) + (gh[H + k] + bias_hh[H + k]));
      const T g = A::tanh((gx[2 * H + k] + bias_ih[2 * H + k]) + (gh[2 * H + k] + bias_hh[2 * H + k]));
      const T o = A::sigmoid((gx[3 * H + k] + bias_ih[3 * H + k]) + (gh[3 * H + k] + bias_hh[3 * H + k]));
      const T c_t = f * c[k] + i * g;
      const T h_t = o * A::tanh(c_t);
      c[k] = c_t;
      h[k] = h_t;
      out[k] = h_t;
      if constexpr (kSave) {
        saved[k] = i;
        saved[H + k] = f;
        saved[2 * H + k] = g;
        saved[3 * H + k] = o;
        saved[4 * H + k] = c_t;
      }
    }
  }

  template <typename T, typename S>
  static BIRNN_INLINE void backward(int64_t H, int64_t units, const T* saved, const S* /*h_prev*/, const T* c_prev,
                                    const S* /*h_t*/, const S* grad_out, T* dh, T* dc, T* dgx, T* dgh) {
    using A = Activation<T>;
#pragma omp simd
    for (int64_t k = 0; k < units; ++k) {
      const T i = saved[k], f = saved[H + k], g = saved[2 * H + k], o = saved[3 * H + k];
      const T tanh_c = A::tanh(saved[4 * H + k]);
      const T dh_t = dh[k] + static_cast<T>(grad_out[k]);
      const T dc_t = dc[k] + dh_t * o * (T(1) - tanh_c * tanh_c);
      const T di = dc_t * g * i * (T(1) - i);
      const T df = dc_t * c_prev[k] * f * (T(1) - f);
      const T dg = dc_t * i * (T(1) - g * g);
      const T d_o = dh_t * tanh_c * o * (T(1) - o);
      dc[k] = dc_t * f;
      dgx[k] = dgh[k] = di;
      dgx[H + k] = dgh[H + k] = df;
      dgx[2 * H + k] = dgh[2 * H + k] = dg;
      dgx[3 * H + k] = dgh[3 * H + k] = d_o;
    }
  }
};

// torch's GRU: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h.
// Saved: r, z, n and W_hn h + b_hn, which the gradient of r needs.
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;
  static constexpr bool kHasCellState = false;
  // r scales only the hidden half of n's pre-activation, so the two weight gradients differ there.
  static constexpr bool kSplitGateGrad = true;
  static constexpr bool kDirectHiddenGrad = true;
  static constexpr bool kCanProject = false;

  template <bool kSave, typename T>
  static BIRNN_INLINE void forward(int64_t H, int64_t units, const T* gx, const T* bias_ih, const T* gh,
                                   const T* bias_hh, T* h, T* /*c*/, T* saved, T* out) {
    using A = Activation<T>;
#pragma omp simd
    for (int64_t k = 0; k < units; ++k) {
      const T r = A::sigmoid((gx[k] + bias_ih[k]) + (gh[k] + bias_hh[k]));
      const T z = A::sigmoid((gx[H + k] + bias_ih[H + k]) + (gh[H + k] + bias_hh[H + k]));
      const T hidden_n = gh[2 * H + k] + bias_hh[2 * H + k];
      const T n = A::tanh((gx[2 * H + k] + bias_ih[2 * H + k]) + r * hidden_n);
      const T h_t = (T(1) - z) * n + z * h[k];
      h[k] = h_t;
      out[k] = h_t;
      if constexpr (kSave) {
        saved[k] = r;
        saved[H + k] = z;
        saved[2 * H + k] = n;
        saved[3 * H + k] = hidden_n;
      }
    }
  }

  template <typename T, typename S>
  static BIRNN_INLINE void backward(int64_t H, int64_t units, const T* saved, const S* h_prev,
                                    const T* /*c_prev*/, const S* /*h_t*/, const S* grad_out, T* dh, T* /*dc*/, T* dgx,
                                    T* dgh) {
#pragma omp simd
    for (int64_t k = 0; k < units; ++k) {
      const T r = saved[k], z = saved[H + k], n = saved[2 * H + k], hidden_n = saved[3 * H + k];
      const T dh_t = dh[k] + static_cast<T>(grad_out[k]);
      const T dn = dh_t * (T(1) - z) * (T(1) - n * n);
      const T dr = dn * hidden_n * r * (T(1) - r);
      const T dz = dh_t * (static_cast<T>(h_prev[k]) - n) * z * (T(1) - z);
      dh[k] = dh_t * z;
      dgx[k] = dgh[k] = dr;
      dgx[H + k] = dgh[H + k] = dz;
      dgx[2 * H + k] = dn;
      dgh[2 * H + k] = dn * r;
    }
  }
};

template <bool kRelu>
struct ElmanCell {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 0;
  static constexpr bool kHasCellState = false;
  static constexpr bool kSplitGateGrad = false;
  static constexpr bool kDirectHiddenGrad = false;
  static constexpr bool kCanProject = false;

  template <bool kSave, typename T>
  static BIRNN_INLINE void forward(int64_t /*H*/, int64_t units, const T* gx, const T* bias_ih, const T* gh,
                                   const T* bias_hh, T* h, T* /*c*/, T* /*saved*/, T* out) {
#pragma omp simd
    for (int64_t k = 0; k < units; ++k) {
      const T pre = (gx[k] + bias_ih[k]) + (gh[k] + bias_hh[k]);
      const T h_t = kRelu ? (pre < T(0) ? T(0) : pre) : Activation<T>::tanh(pre);
      h[k] = h_t;
      out[k] = h_t;
    }
  }

  // The activation's derivative is read off its output h_t, so nothing needs saving.
  template <typename T, typename S>
  static BIRNN_INLINE void backward(int64_t /*H*/, int64_t units, const T* /*saved*/, const S* /*h_prev*/,
                                    const T* /*c_prev*/, const S* h_t, const S* grad_out, T* dh, T* /*dc*/, T* dgx,
                                    T* dgh) {
#pragma omp simd
    for (int64_t k = 0; k < units; ++k) {
      const T dh_t = dh[k] + static_cast<T>(grad_out[k]);
      const T out = static_cast<T>(h_t[k]);
      const T d_pre = kRelu ? (out > T(0) ? dh_t : T(0)) : dh_t * (T(1) - out * out);
      dgx[k] = dgh[k] = d_pre;
    }
  }
};

using RnnTanhCell = ElmanCell<false>;
using RnnReluCell = ElmanCell<true>;

}  // namespace birnn_fast::cpu
