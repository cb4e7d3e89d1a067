// The CPU kernels of birnn_fast::forward / birnn_fast::backward (contract: birnn_fast/library.py):
// argument checks, the cases that need no kernel (B = 0), bfloat16 / float16 through the float32
// kernels, and the registration (called from the module's init, csrc/module.cpp).
//
// Every argument is checked before a kernel reads it: the Python layer already guarantees most of
// this, but a direct call of the op must get an error naming the argument, never a crash or an
// out-of-bounds read.
//
// bfloat16 and float16 keep fp32 accumulation, fp32 h and c inside and an fp32 workspace, and
// return the input's dtype. Where the CPU multiplies that dtype natively (isa.h: half_products),
// forward and backward run in it (their products read the input, output and weights as they are);
// elsewhere the float32 kernels run on float32 copies of the arguments.
#include <torch/library.h>

#include <ostream>
#include <string_view>

#include "buffers.h"
#include "half_products.h"
#include "isa.h"
#include "kernels.h"
#include "ops.h"

namespace birnn_fast::cpu {
namespace {

bool is_half(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// weights[index] by its kind ("weights[5] (weight_hh_reverse)"), formatted only into an error.
struct WeightName {
  int64_t index, per_direction;
};

std::ostream& operator<<(std::ostream& out, const WeightName& name) {
  static const char* kKinds[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"};
  return out << "weights[" << name.index << "] (" << kKinds[name.index % name.per_direction]
             << (name.index >= name.per_direction ? "_reverse)" : ")");
}

template <typename Name>
void check_placement(const Tensor& tensor, const Name& name, at::ScalarType dtype) {
  TORCH_CHECK(tensor.device().is_cpu(), "birnn_fast: expected ", name, " on the CPU (input's device), got ",
              tensor.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, "birnn_fast: expected ", name, " of dtype ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.is_contiguous(), "birnn_fast: expected ", name, " to be contiguous");
}

template <typename Name>
void check_tensor(const Tensor& tensor, const Name& name, at::IntArrayRef shape, at::ScalarType dtype) {
  check_placement(tensor, name, dtype);
  TORCH_CHECK(tensor.sizes() == shape, "birnn_fast: expected ", name, " of size ", shape, ", got ", tensor.sizes());
}

// The arguments forward and backward share; returns the layer's sizes.
Layer check_common(std::string_view cell, const Tensor& input, at::TensorList weights, const Tensor& h0,
                   const Tensor& c0, const Tensor& lengths) {
  const int64_t gates = dispatch_cell(cell, [](auto c) -> int64_t { return decltype(c)::kGates; });
  TORCH_CHECK(input.dim() == 3, "birnn_fast: expected input of shape (T, B, I), got ", input.sizes());
  TORCH_CHECK(input.size(0) >= 1, "birnn_fast: expected input with at least one time step (T >= 1), got ",
              input.sizes());
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || is_half(dtype),
              "birnn_fast: the CPU kernels take float32, float64, bfloat16 or float16 input, got ", dtype);
  check_placement(input, "input", dtype);
  const bool lstm = cell == "LSTM";
  TORCH_CHECK(weights.size() == 8 || (lstm && weights.size() == 10),
              "birnn_fast: expected the layer's 8 weights (weight_ih, weight_hh, bias_ih, bias_hh of each "
              "direction)", lstm ? ", or 10 with weight_hr for an LSTM with projections" : "", ", got ",
              weights.size(), weights.size() == 10 ? " (weight_hr is for an LSTM with projections)" : "");
  const int64_t per_direction = weights.size() / 2;
  for (size_t k = 0; k < weights.size(); ++k) {
    check_placement(weights[k], WeightName{static_cast<int64_t>(k), per_direction}, dtype);
  }
  const Tensor& weight_hh = weights[kWeightHh];
  TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(0) > 0 && weight_hh.size(0) % gates == 0 &&
                  weight_hh.size(1) > 0,
              "birnn_fast: expected ", WeightName{kWeightHh, per_direction}, " of shape (", gates,
              "*H, P) with H, P >= 1 for cell ", cell, ", got ", weight_hh.sizes());
  const Layer layer = layer_of(input, weights, gates);
  const int64_t B = layer.batch, I = layer.inputs, H = layer.hidden, P = layer.state, GH = gates * H;
  TORCH_CHECK(layer.projected || P == H, "birnn_fast: expected ", WeightName{kWeightHh, per_direction},
              " of shape (", GH, ", ", H, ") (square per gate without weight_hr), got ", weight_hh.sizes());
  for (int64_t d = 0; d < 2; ++d) {
    const int64_t k = d * per_direction;
    check_tensor(weights[k + kWeightIh], WeightName{k + kWeightIh, per_direction}, {GH, I}, dtype);
    check_tensor(weights[k + kWeightHh], WeightName{k + kWeightHh, per_direction}, {GH, P}, dtype);
    check_tensor(weights[k + kBiasIh], WeightName{k + kBiasIh, per_direction}, {GH}, dtype);
    check_tensor(weights[k + kBiasHh], WeightName{k + kBiasHh, per_direction}, {GH}, dtype);
    if (layer.projected) {
      check_tensor(weights[k + kWeightHr], WeightName{k + kWeightHr, per_direction}, {P, H}, dtype);
    }
  }
  check_tensor(h0, "h0", {2, B, P}, dtype);
  if (lstm) {
    check_tensor(c0, "c0", {2, B, H}, dtype);
  } else {
    TORCH_CHECK(c0.numel() == 0, "birnn_fast: expected an empty c0 for cell ", cell, ", got ", c0.sizes());
  }
  TORCH_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == at::kLong && lengths.dim() == 1 &&
                  lengths.size(0) == B && lengths.is_contiguous(),
              "birnn_fast: expected lengths as a contiguous int64 CPU tensor of size (", B, "), got ",
              lengths.scalar_type(), " ", lengths.sizes(), " on ", lengths.device());
  return layer;
}

int64_t saved_of(std::string_view cell) {
  return dispatch_cell(cell, [](auto c) -> int64_t { return decltype(c)::kSaved; });
}

at::ScalarType workspace_dtype(at::ScalarType dtype) { return is_half(dtype) ? at::kFloat : dtype; }

std::vector<Tensor> to_float(at::TensorList tensors) {
  std::vector<Tensor> result;
  result.reserve(tensors.size());
  for (const Tensor& tensor : tensors) {
    result.push_back(tensor.to(at::kFloat));
  }
  return result;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cpu(c10::string_view cell_view, const Tensor& input,
                                                       at::TensorList weights, const Tensor& h0, const Tensor& c0,
                                                       const Tensor& lengths, bool save_workspace) {
  const std::string_view cell(cell_view.data(), cell_view.size());
  const Layer layer = check_common(cell, input, weights, h0, c0, lengths);
  const at::ScalarType dtype = input.scalar_type();
  if (layer.batch == 0) {
    const int64_t saved = saved_of(cell) * layer.hidden;
    return {at::zeros({layer.steps, 0, 2 * layer.state}, input.options()), at::zeros_like(h0), at::zeros_like(c0),
            save_workspace ? at::zeros({layer.steps, 0, 2, saved}, input.options().dtype(workspace_dtype(dtype)))
                           : at::empty({0}, input.options().dtype(workspace_dtype(dtype)))};
  }
  if (is_half(dtype) && half_products(dtype) != HalfProducts::kFloat32) {
    return dispatch_half(dtype, [&](auto low) {
      return forward_kernel<decltype(low)>(cell, input, weights, h0, c0, lengths, save_workspace, dtype);
    });
  }
  if (is_half(dtype)) {
    auto [output, h_n, c_n, workspace] = forward_kernel<float>(cell, input.to(at::kFloat), to_float(weights),
                                                               h0.to(at::kFloat), c0.to(at::kFloat), lengths,
                                                               save_workspace, dtype);
    return {output.to(dtype), h_n.to(dtype), c_n.to(dtype), workspace};
  }
  if (dtype == at::kDouble) {
    return forward_kernel<double>(cell, input, weights, h0, c0, lengths, save_workspace, dtype);
  }
  return forward_kernel<float>(cell, input, weights, h0, c0, lengths, save_workspace, dtype);
}

std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> backward_cpu(
    c10::string_view cell_view, const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, at::TensorList weights, const Tensor& h0, const Tensor& c0, const Tensor& lengths,
    const Tensor& output, const Tensor& workspace, std::array<bool, 4> output_mask) {
  const std::string_view cell(cell_view.data(), cell_view.size());
  const Layer layer = check_common(cell, input, weights, h0, c0, lengths);
  const at::ScalarType dtype = input.scalar_type();
  const int64_t steps = layer.steps, B = layer.batch, P = layer.state;
  check_tensor(grad_output, "grad_output", {steps, B, 2 * P}, dtype);
  check_tensor(grad_h_n, "grad_h_n", h0.sizes(), dtype);
  if (cell == "LSTM") {
    check_tensor(grad_c_n, "grad_c_n", c0.sizes(), dtype);
  } else {
    TORCH_CHECK(grad_c_n.numel() == 0, "birnn_fast: expected an empty grad_c_n for cell ", cell, ", got ",
                grad_c_n.sizes());
  }
  check_tensor(output, "output", {steps, B, 2 * P}, dtype);
  check_tensor(workspace, "workspace (forward's, with save_workspace=True)",
               {steps, B, 2, saved_of(cell) * layer.hidden}, workspace_dtype(dtype));
  std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> grads;
  auto& [grad_input, grad_weights, grad_h0, grad_c0] = grads;
  if (B == 0) {
    grad_input = at::zeros_like(input);
    for (const Tensor& weight : weights) {
      grad_weights.push_back(at::zeros_like(weight));
    }
    grad_h0 = at::zeros_like(h0);
    grad_c0 = at::zeros_like(c0);
  } else if (is_half(dtype)) {
    if (half_products(dtype) != HalfProducts::kFloat32) {
      grads = dispatch_half(dtype, [&](auto low) {
        return backward_kernel<decltype(low)>(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths,
                                              output, workspace, dtype, output_mask);
      });
    } else {
      grads = backward_kernel<float>(cell, grad_output.to(at::kFloat), grad_h_n.to(at::kFloat),
                                     grad_c_n.to(at::kFloat), input.to(at::kFloat), to_float(weights),
                                     h0.to(at::kFloat), c0.to(at::kFloat), lengths, output.to(at::kFloat),
                                     workspace, dtype, output_mask);
    }
    // Both return float32 gradients: rounded once, here.
    for (Tensor& grad : grad_weights) {
      grad = grad.to(dtype);
    }
    grad_input = grad_input.to(dtype);
    grad_h0 = grad_h0.to(dtype);
    grad_c0 = grad_c0.to(dtype);
  } else if (dtype == at::kDouble) {
    grads = backward_kernel<double>(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output,
                                    workspace, dtype, output_mask);
  } else {
    grads = backward_kernel<float>(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output,
                                   workspace, dtype, output_mask);
  }
  // What output_mask does not ask for comes back empty (the kernels skip grad_input's and the
  // weight gradients' products; grad_h0 and grad_c0 cost nothing apart).
  const auto empty = [&] { return at::empty({0}, input.options()); };
  grad_input = output_mask[0] ? grad_input : empty();
  for (Tensor& grad : grad_weights) {
    grad = output_mask[1] ? grad : empty();
  }
  grad_h0 = output_mask[2] ? grad_h0 : empty();
  grad_c0 = output_mask[3] ? grad_c0 : empty();
  return grads;
}

}  // namespace

void register_cpu_kernels(torch::Library& m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

// torch.ops.birnn_fast_cpu.engine_info(): what runs on this CPU under this process's ISA ceiling;
// empty_cache(): hands the buffer cache's free blocks back to the OS (as torch.cuda.empty_cache()),
// returning their bytes; cache_bytes(): the bytes in free blocks now.
TORCH_LIBRARY(birnn_fast_cpu, m) {
  m.def("engine_info() -> str", []() -> std::string { return engine_info(); });
  m.def("empty_cache() -> int", []() -> int64_t { return release_cached_buffers(); });
  m.def("cache_bytes() -> int", []() -> int64_t { return cached_buffer_bytes(); });
}

}  // namespace birnn_fast::cpu
