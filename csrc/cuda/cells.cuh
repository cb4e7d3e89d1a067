// The element-wise math of the cells on the GPU, one (unit, batch row) at a time: the only place
// the CUDA recurrences differ by cell. Mirrors csrc/cpu/cells.h (same gate orders, same saved
// activations, the layout of the ops' workspace), in fp32 whatever the layer's dtype.
//   forward(pre, h, c, saved): pre[kGates] the gate pre-activations (x @ W_ih^T + b_ih + b_hh +
//   h_prev @ W_hh^T); h: set to this step's; c: the cell state, read as the previous step's,
//   overwritten with this step's;
//   saved[kSaved]: what the backward reads from the workspace.
#pragma once

namespace birnn_fast::cuda {

// The hardware exp2 and a fast division (a few ulp of fp32): far below the rounding of the bf16 /
// fp16 results these kernels write. Both saturate correctly: __fdividef(a, b) is 0 for |b| > 2^126,
// so an infinite exp gives 0 and 1, not NaN.
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

__device__ __forceinline__ float tanh_(float x) {
  return copysignf(1.0f - __fdividef(2.0f, __expf(2.0f * fabsf(x)) + 1.0f), x);
}

// Gates i, f, g, o; saved: i, f, g, o (activated) and c_t.
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 5;
  static constexpr const char* kName = "lstm";

  static __device__ __forceinline__ void forward(const float* pre, float& h, float& c, float* saved) {
    const float i = sigmoid(pre[0]);
    const float f = sigmoid(pre[1]);
    const float g = tanh_(pre[2]);
    const float o = sigmoid(pre[3]);
    c = f * c + i * g;
    h = o * tanh_(c);
    saved[0] = i;
    saved[1] = f;
    saved[2] = g;
    saved[3] = o;
    saved[4] = c;
  }
};

}  // namespace birnn_fast::cuda
