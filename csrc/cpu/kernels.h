// What forward.cpp and backward.cpp offer ops.cpp, which checks the arguments first (the op's
// contract: birnn_fast/library.py), and what they share: the layer's sizes and weights by kind.
//
// Both run the two directions at once, one per thread or, with more threads, on a team of threads
// each (team.h); each step is one product over the rows still running (schedule.h) plus the fused
// cell math (cells.h); the products are products.h's.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <vector>

#include "cells.h"
#include "schedule.h"

namespace birnn_fast::cpu {

using at::Tensor;

// The op's `weights`, nn.LSTM's order per direction -- weight_ih, weight_hh, bias_ih, bias_hh, and
// weight_hr for an LSTM with projections -- the forward direction's first.
enum Weight : int64_t { kWeightIh = 0, kWeightHh = 1, kBiasIh = 2, kBiasHh = 3, kWeightHr = 4 };

// Sizes of one layer: T steps, B rows, I inputs, H hidden units, P state width (proj_size, or H).
struct Layer {
  int64_t steps, batch, inputs, hidden, state;
  bool projected;  // 10 weights: h_t = W_hr (o * tanh(c_t))
  int64_t per_direction() const { return projected ? 5 : 4; }
};

inline Layer layer_of(const Tensor& input, at::TensorList weights, int64_t gates) {
  const bool projected = weights.size() == 10;
  return {input.size(0), input.size(1), input.size(2), weights[kWeightHh].size(0) / gates,
          weights[kWeightHh].size(1), projected};
}

// Direction d's parameter (or its gradient) of one kind.
template <typename T>
T* weight_of(at::TensorList weights, const Layer& layer, int64_t d, Weight kind) {
  return weights[d * layer.per_direction() + kind].data_ptr<T>();
}

// Both directions' parameters of one kind as one (2 * rows, ...) tensor, for the multi-threaded GEMMs
// (in a buffer of empty_cpu: W_ih of a wide layer is tens of MiB).
inline Tensor both_directions(at::TensorList weights, const Layer& layer, Weight kind) {
  const Tensor& first = weights[kind];
  std::vector<int64_t> sizes = first.sizes().vec();
  sizes[0] *= 2;
  Tensor both = empty_cpu(sizes, first.options());
  return at::cat_out(both, {first, weights[layer.per_direction() + kind]});
}

template <typename Fn>
decltype(auto) dispatch_cell(std::string_view cell, Fn&& fn) {
  if (cell == "LSTM") {
    return fn(LstmCell{});
  }
  if (cell == "GRU") {
    return fn(GruCell{});
  }
  if (cell == "RNN_TANH") {
    return fn(RnnTanhCell{});
  }
  TORCH_CHECK(cell == "RNN_RELU", "birnn_fast: unknown cell '", cell,
              "'; expected one of 'GRU', 'LSTM', 'RNN_RELU', 'RNN_TANH'");
  return fn(RnnReluCell{});
}

// B >= 1; arguments checked. layer_dtype: the caller's dtype when the arguments are float32 copies
// of a bfloat16 / float16 layer (its products may run in that dtype), else T's. Both run float,
// double, and bfloat16 / float16 where half_products(T) is not kFloat32; backward_kernel returns
// the gradients of a bfloat16 / float16 layer in float32, and its output_mask is the op's
// (grad_input, grad_weights, grad_h0, grad_c0): a grad_input or weight gradient not asked for is
// not computed and comes back empty.
template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_kernel(std::string_view cell, const Tensor& input,
                                                          at::TensorList weights, const Tensor& h0, const Tensor& c0,
                                                          const Tensor& lengths, bool save_workspace,
                                                          at::ScalarType layer_dtype);

template <typename T>
std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> backward_kernel(
    std::string_view cell, const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, at::TensorList weights, const Tensor& h0, const Tensor& c0, const Tensor& lengths,
    const Tensor& output, const Tensor& workspace, at::ScalarType layer_dtype,
    const std::array<bool, 4>& output_mask);

}  // namespace birnn_fast::cpu
