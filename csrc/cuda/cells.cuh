// The element-wise math of the cells on the GPU, one (unit, batch row) at a time: the only place
// the CUDA recurrences differ by cell. Mirrors csrc/cpu/cells.h (same gate orders, same saved
// activations, the layout of the ops' workspace), in fp32 whatever the layer's dtype.
// saved[kSaved] is what the backward reads from the workspace.
#pragma once

namespace birnn_fast::cuda {

// The hardware exp2 and a fast division (a few ulp of fp32): far below the rounding of the bf16 /
// fp16 results these kernels write. Both saturate correctly: __fdividef(a, b) is 0 for |b| > 2^126,
// so an infinite exp gives 0 and 1, not NaN.
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

__device__ __forceinline__ float tanh_(float x) {
  return copysignf(1.0f - __fdividef(2.0f, __expf(2.0f * fabsf(x)) + 1.0f), x);
}

// Every cell: forward(x, hidden, h_prev, h, c, saved, relu): x[kGates] the input projection with
// its biases, hidden[kGates] h_prev @ W_hh^T (the GRU's n gate with b_hn added), h_prev the state
// entering the step; h is set to this step's, c (the LSTM's cell state) read and overwritten.

// Gates i, f, g, o; saved: i, f, g, o (activated) and c_t.
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 5;
  static constexpr bool kHasCellState = true;
  static constexpr int kHiddenBiasGate = -1;

  static __device__ __forceinline__ void forward(const float* x, const float* hidden, float /*h_prev*/, float& h,
                                                 float& c, float* saved, int /*relu*/) {
    const float i = sigmoid(x[0] + hidden[0]);
    const float f = sigmoid(x[1] + hidden[1]);
    const float g = tanh_(x[2] + hidden[2]);
    const float o = sigmoid(x[3] + hidden[3]);
    c = f * c + i * g;
    h = o * tanh_(c);
    saved[0] = i;
    saved[1] = f;
    saved[2] = g;
    saved[3] = o;
    saved[4] = c;
  }

  // dh, dc: the gradients reaching h_t and c_t; saved: the forward's; previous: c_{t-1}. d: through
  // W_ih and W_hh alike; dc becomes dc_{t-1}; direct (what reaches h_{t-1} other than through W_hh): 0.
  static constexpr int kPrevious = 0;  // c_{t-1}: the workspace's c at the previous time index, or c0
  static __device__ __forceinline__ void backward(float dh, float& dc, const float* saved, float previous, float* d,
                                                  float* d_hh, float& direct, int /*relu*/) {
    const float i = saved[0], f = saved[1], g = saved[2], o = saved[3];
    const float tc = tanh_(saved[4]);
    const float dcell = dc + dh * o * (1.0f - tc * tc);
    d[0] = dcell * g * i * (1.0f - i);
    d[1] = dcell * previous * f * (1.0f - f);
    d[2] = dcell * i * (1.0f - g * g);
    d[3] = dh * tc * o * (1.0f - o);
#pragma unroll
    for (int k = 0; k < 4; ++k) d_hh[k] = d[k];
    dc = dcell * f;
    direct = 0.0f;
  }
};

// torch's GRU: n = tanh(x_n + r * (W_hn h + b_hn)), h' = (1 - z) n + z h. Saved: r, z, n and
// W_hn h + b_hn, which the gradient of r needs.
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;
  static constexpr bool kHasCellState = false;
  static constexpr int kHiddenBiasGate = 2;  // b_hn joins the hidden part of n, not x's

  static __device__ __forceinline__ void forward(const float* x, const float* hidden, float h_prev, float& h,
                                                 float& /*c*/, float* saved, int /*relu*/) {
    const float r = sigmoid(x[0] + hidden[0]);
    const float z = sigmoid(x[1] + hidden[1]);
    const float n = tanh_(x[2] + r * hidden[2]);
    h = (1.0f - z) * n + z * h_prev;
    saved[0] = r;
    saved[1] = z;
    saved[2] = n;
    saved[3] = hidden[2];
  }

  // previous: h_{t-1}. d_hh[2]: n's part through W_hh, scaled by r; direct: dh z.
  static constexpr int kPrevious = 1;  // h_{t-1}: the output at the previous time index, or h0
  static __device__ __forceinline__ void backward(float dh, float& /*dc*/, const float* saved, float previous,
                                                  float* d, float* d_hh, float& direct, int /*relu*/) {
    const float r = saved[0], z = saved[1], n = saved[2], hidden_n = saved[3];
    const float dn = dh * (1.0f - z) * (1.0f - n * n);
    d[0] = dn * hidden_n * r * (1.0f - r);
    d[1] = dh * (previous - n) * z * (1.0f - z);
    d[2] = dn;
    d_hh[0] = d[0];
    d_hh[1] = d[1];
    d_hh[2] = dn * r;
    direct = dh * z;
  }
};

// RNN_TANH and RNN_RELU: the backward reads the activation's derivative off h, nothing is saved.
struct ElmanCell {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 0;
  static constexpr bool kHasCellState = false;
  static constexpr int kHiddenBiasGate = -1;

  static __device__ __forceinline__ void forward(const float* x, const float* hidden, float /*h_prev*/, float& h,
                                                 float& /*c*/, float* /*saved*/, int relu) {
    const float pre = x[0] + hidden[0];
    h = relu ? fmaxf(pre, 0.0f) : tanh_(pre);
  }

  // previous: h_t itself (the activation's derivative is read off it).
  static constexpr int kPrevious = 2;  // h_t: the output at the step's own time index
  static __device__ __forceinline__ void backward(float dh, float& /*dc*/, const float* /*saved*/, float h, float* d,
                                                  float* d_hh, float& direct, int relu) {
    d[0] = relu ? (h > 0.0f ? dh : 0.0f) : dh * (1.0f - h * h);
    d_hh[0] = d[0];
    direct = 0.0f;
  }
};

}  // namespace birnn_fast::cuda
