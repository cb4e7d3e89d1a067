// CPU kernels of birnn_fast::forward and birnn_fast::backward (contract: birnn_fast/ops.py).
//
// One input GEMM projects every step for both directions; then the two recurrences run at once, one
// per thread, each step one GEMM over the rows still running plus the fused cell math (cells.h).
// Rows are sorted by length, longest first, so the running rows are always a prefix of the state
// buffers and padded steps cost nothing. Backward runs the recurrences in reverse time, storing the
// gate gradients of every step, and finishes with a few large GEMMs for the weight and input
// gradients.
//
// Layouts. gates_x, dgates: (T*B, 2*G*H), row t*B + b in the caller's order, direction d at column
// d*G*H. workspace: (T, B, 2, W*H), the cell's saved activations of (t, b, d). State buffers h, c,
// dh, dc: (2, B, H) in sorted order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string_view>
#include <tuple>
#include <vector>

#include "cells.h"
#include "gemm.h"

namespace birnn_fast::cpu {
namespace {

using at::Tensor;

// Rows by length, longest first: at step s the rows still running are [0, active[s]).
struct Schedule {
  int64_t batch;
  std::vector<int64_t> order;    // sorted position -> caller's row
  std::vector<int64_t> lengths;  // by sorted position
  std::vector<int64_t> active;   // by step, for steps 0 .. longest length - 1

  Schedule(const Tensor& lengths_tensor, int64_t steps) : batch(lengths_tensor.size(0)) {
    const int64_t* caller_lengths = lengths_tensor.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(caller_lengths[b] >= 1 && caller_lengths[b] <= steps, "birnn_fast: lengths[", b,
                  "] must be in [1, ", steps, "], got ", caller_lengths[b]);
    }
    order.resize(batch);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return caller_lengths[a] > caller_lengths[b]; });
    lengths.resize(batch);
    for (int64_t j = 0; j < batch; ++j) {
      lengths[j] = caller_lengths[order[j]];
    }
    const int64_t longest = batch > 0 ? lengths[0] : 0;
    active.assign(longest, 0);
    for (int64_t step = 0, rows = batch; step < longest; ++step) {
      while (lengths[rows - 1] <= step) {
        --rows;
      }
      active[step] = rows;
    }
  }

  // The time step that sorted row j reads at recurrence step `step`.
  int64_t time(int64_t step, int64_t j, int64_t direction) const {
    return direction == 0 ? step : lengths[j] - 1 - step;
  }

  Tensor order_tensor() const { return at::tensor(order, at::kLong); }
};

// The cell math of one step over all running rows is compiled once per instruction set and chosen
// at run time: the build flags are generic, and the row loops only vectorize well with the
// machine's widest registers.
#if defined(__GNUC__) && defined(__x86_64__)
#define BIRNN_HAS_ISA_DISPATCH 1
enum class Isa { kDefault, kAvx2, kAvx512 };

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
  return Isa::kDefault;
}

template <typename Kernel, typename Args>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void run_rows_avx512(const Args& args) {
  Kernel::run(args);
}

template <typename Kernel, typename Args>
__attribute__((target("avx2,fma"))) void run_rows_avx2(const Args& args) {
  Kernel::run(args);
}
#endif

template <typename Kernel, typename Args>
void run_rows(const Args& args) {
#ifdef BIRNN_HAS_ISA_DISPATCH
  static const Isa isa = detect_isa();
  if (isa == Isa::kAvx512) {
    return run_rows_avx512<Kernel>(args);
  }
  if (isa == Isa::kAvx2) {
    return run_rows_avx2<Kernel>(args);
  }
#endif
  Kernel::run(args);
}

template <typename T>
struct ForwardArgs {
  const Schedule* schedule;
  int64_t direction, step, hidden;
  const T* gates_x;  // (T*B, 2GH)
  const T* gates_h;  // (B, GH): this step's h_prev @ W_hh^T, sorted rows
  const T* bias_hh;  // (GH)
  T* h;              // (B, H) sorted
  T* c;              // (B, H) sorted, LSTM only
  T* workspace;
  T* output;
};

// kSave: store the activations backward needs (training) or not (inference).
template <typename Cell, typename T, bool kSave>
struct ForwardRows {
  static BIRNN_INLINE void run(const ForwardArgs<T>& a) {
    const Schedule& schedule = *a.schedule;
    const int64_t H = a.hidden, GH = Cell::kGates * H, WH = Cell::kSaved * H, B = schedule.batch;
    const int64_t rows = schedule.active[a.step];
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t row = schedule.time(a.step, j, a.direction) * B + schedule.order[j];
      Cell::template forward<kSave>(H, a.gates_x + row * 2 * GH + a.direction * GH, a.gates_h + j * GH,
                                    a.bias_hh, a.h + j * H, Cell::kHasCellState ? a.c + j * H : nullptr,
                                    kSave ? a.workspace + (row * 2 + a.direction) * WH : nullptr,
                                    a.output + row * 2 * H + a.direction * H);
    }
  }
};

template <typename T>
struct BackwardArgs {
  const Schedule* schedule;
  int64_t direction, step, hidden;
  const T* grad_output;  // (T, B, 2H)
  const T* h0;           // (B, H) this direction's, caller's order
  const T* c0;           // (B, H) this direction's, caller's order, LSTM only
  const T* output;
  const T* workspace;
  T* dh;        // (B, H) sorted
  T* dc;        // (B, H) sorted, LSTM only
  T* dgates_x;  // (T*B, 2GH)
  T* dgates_h;  // (T*B, 2GH), written only if the cell splits its gate gradients
  T* step_dgates_h;  // (B, GH) sorted: this step's, the operand of the recurrent GEMM
};

template <typename Cell, typename T>
struct BackwardRows {
  static BIRNN_INLINE void run(const BackwardArgs<T>& a) {
    const Schedule& schedule = *a.schedule;
    const int64_t H = a.hidden, GH = Cell::kGates * H, WH = Cell::kSaved * H, B = schedule.batch;
    const int64_t d = a.direction;
    const int64_t rows = schedule.active[a.step];
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t b = schedule.order[j];
      const int64_t t = schedule.time(a.step, j, d);
      const int64_t row = t * B + b;
      // The previous step's state: h0/c0 at a row's first step, else what that step stored.
      const int64_t prev_row = (d == 0 ? t - 1 : t + 1) * B + b;
      const bool first = a.step == 0;
      const T* h_prev = first ? a.h0 + b * H : a.output + prev_row * 2 * H + d * H;
      const T* c_prev = nullptr;
      if constexpr (Cell::kHasCellState) {
        c_prev = first ? a.c0 + b * H : a.workspace + (prev_row * 2 + d) * WH + Cell::kCellStateSlot * H;
      }
      T* step_dgh = a.step_dgates_h + j * GH;
      Cell::backward(H, a.workspace + (row * 2 + d) * WH, h_prev, c_prev, a.output + row * 2 * H + d * H,
                     a.grad_output + row * 2 * H + d * H, a.dh + j * H, Cell::kHasCellState ? a.dc + j * H : nullptr,
                     a.dgates_x + row * 2 * GH + d * GH, step_dgh);
      if constexpr (Cell::kSplitGateGrad) {
        std::memcpy(a.dgates_h + row * 2 * GH + d * GH, step_dgh, GH * sizeof(T));
      }
    }
  }
};

template <typename Cell, typename T, bool kSave>
void forward_direction(const Schedule& schedule, int64_t direction, int64_t H, const T* gates_x,
                       const T* weight_hh_t, const T* bias_hh, T* h, T* c, T* gates_h, T* workspace, T* output) {
  const int64_t GH = Cell::kGates * H;
  for (int64_t step = 0; step < static_cast<int64_t>(schedule.active.size()); ++step) {
    gemm<T>(schedule.active[step], GH, H, h, H, weight_hh_t, GH, gates_h, GH, /*accumulate=*/false);
    run_rows<ForwardRows<Cell, T, kSave>>(
        ForwardArgs<T>{&schedule, direction, step, H, gates_x, gates_h, bias_hh, h, c, workspace, output});
  }
}

template <typename Cell, typename T>
void backward_direction(const BackwardArgs<T>& args, const T* weight_hh) {
  const int64_t H = args.hidden, GH = Cell::kGates * H;
  const Schedule& schedule = *args.schedule;
  for (int64_t step = static_cast<int64_t>(schedule.active.size()) - 1; step >= 0; --step) {
    BackwardArgs<T> step_args = args;
    step_args.step = step;
    run_rows<BackwardRows<Cell, T>>(step_args);
    gemm<T>(schedule.active[step], H, GH, args.step_dgates_h, GH, weight_hh, H, args.dh, H,
            /*accumulate=*/Cell::kDirectHiddenGrad);
  }
}

// Zeroes the (T, B, width) rows of `rows` at padded steps t >= lengths[b].
template <typename T>
void zero_padding(const Schedule& schedule, int64_t steps, T* rows, int64_t width) {
  for (int64_t j = 0; j < schedule.batch; ++j) {
    for (int64_t t = schedule.lengths[j]; t < steps; ++t) {
      std::fill_n(rows + (t * schedule.batch + schedule.order[j]) * width, width, T(0));
    }
  }
}

template <typename Cell, typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(const Tensor& input, const Tensor& weight_ih,
                                                        const Tensor& weight_hh, const Tensor& bias_ih,
                                                        const Tensor& bias_hh, const Tensor& h0, const Tensor& c0,
                                                        const Tensor& lengths, bool save_workspace) {
  const int64_t steps = input.size(0), B = input.size(1), I = input.size(2), H = weight_hh.size(2);
  const int64_t GH = Cell::kGates * H;
  const Schedule schedule(lengths, steps);
  const Tensor order = schedule.order_tensor();

  const Tensor gates_x =
      at::addmm(bias_ih.reshape({2 * GH}), input.reshape({steps * B, I}), weight_ih.reshape({2 * GH, I}).t());
  const Tensor weight_hh_t = weight_hh.transpose(1, 2).contiguous();  // (2, H, GH)
  Tensor output = at::empty({steps, B, 2 * H}, input.options());
  Tensor workspace = save_workspace ? at::empty({steps, B, 2, Cell::kSaved * H}, input.options())
                                    : at::empty({0}, input.options());
  Tensor h = h0.index_select(1, order).contiguous();
  Tensor c = Cell::kHasCellState ? c0.index_select(1, order).contiguous() : Tensor();
  Tensor gates_h = at::empty({2, B, GH}, input.options());

  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      auto run = save_workspace ? forward_direction<Cell, T, true> : forward_direction<Cell, T, false>;
      run(schedule, d, H, gates_x.data_ptr<T>(), weight_hh_t.data_ptr<T>() + d * H * GH,
          bias_hh.data_ptr<T>() + d * GH, h.data_ptr<T>() + d * B * H,
          Cell::kHasCellState ? c.data_ptr<T>() + d * B * H : nullptr, gates_h.data_ptr<T>() + d * B * GH,
          workspace.data_ptr<T>(), output.data_ptr<T>());
    }
  });
  zero_padding(schedule, steps, output.data_ptr<T>(), 2 * H);

  Tensor h_n = at::empty_like(h0).index_copy_(1, order, h);
  Tensor c_n = Cell::kHasCellState ? at::empty_like(c0).index_copy_(1, order, c) : at::empty({0}, input.options());
  return {output, h_n, c_n, workspace};
}

template <typename Cell, typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input,
    const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& h0, const Tensor& c0, const Tensor& lengths,
    const Tensor& output, const Tensor& workspace) {
  const int64_t steps = input.size(0), B = input.size(1), I = input.size(2), H = weight_hh.size(2);
  const int64_t GH = Cell::kGates * H;
  const Schedule schedule(lengths, steps);
  const Tensor order = schedule.order_tensor();

  Tensor dh = grad_h_n.index_select(1, order).contiguous();
  Tensor dc = Cell::kHasCellState ? grad_c_n.index_select(1, order).contiguous() : Tensor();
  Tensor dgates_x = at::empty({steps * B, 2 * GH}, input.options());
  Tensor dgates_h = Cell::kSplitGateGrad ? at::empty_like(dgates_x) : dgates_x;
  // The large GEMMs below run over every (t, b), so padded steps must hold zero gradients.
  zero_padding(schedule, steps, dgates_x.data_ptr<T>(), 2 * GH);
  if (Cell::kSplitGateGrad) {
    zero_padding(schedule, steps, dgates_h.data_ptr<T>(), 2 * GH);
  }
  Tensor step_dgates_h = at::empty({2, B, GH}, input.options());

  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      const BackwardArgs<T> args{&schedule,
                                 d,
                                 /*step=*/0,
                                 H,
                                 grad_output.data_ptr<T>(),
                                 h0.data_ptr<T>() + d * B * H,
                                 Cell::kHasCellState ? c0.data_ptr<T>() + d * B * H : nullptr,
                                 output.data_ptr<T>(),
                                 workspace.data_ptr<T>(),
                                 dh.data_ptr<T>() + d * B * H,
                                 Cell::kHasCellState ? dc.data_ptr<T>() + d * B * H : nullptr,
                                 dgates_x.data_ptr<T>(),
                                 dgates_h.data_ptr<T>(),
                                 step_dgates_h.data_ptr<T>() + d * B * GH};
      backward_direction<Cell, T>(args, weight_hh.data_ptr<T>() + d * GH * H);
    }
  });

  Tensor grad_h0 = at::empty_like(h0).index_copy_(1, order, dh);
  Tensor grad_c0 = Cell::kHasCellState ? at::empty_like(c0).index_copy_(1, order, dc) : at::empty({0}, input.options());

  const Tensor weight_ih_2d = weight_ih.reshape({2 * GH, I});
  Tensor grad_input = at::mm(dgates_x, weight_ih_2d).view({steps, B, I});
  Tensor grad_weight_ih = at::mm(dgates_x.t(), input.reshape({steps * B, I})).view({2, GH, I});
  Tensor grad_bias_ih = dgates_x.sum(0).view({2, GH});
  Tensor grad_bias_hh = dgates_h.sum(0).view({2, GH});

  // h_prev of (t, b, d) is the output of the previous step, which for the reverse direction at a
  // row's first step (t = lengths[b] - 1) is a padded zero; every row's first step is then added
  // with h0, from the gate gradients the backward loop left in step_dgates_h after its step 0.
  Tensor grad_weight_hh = at::empty({2, GH, H}, input.options());
  const Tensor dgates_h_4d = dgates_h.view({steps, B, 2, GH});
  const Tensor output_4d = output.view({steps, B, 2, H});
  const Tensor h0_sorted = h0.index_select(1, order);
  for (int64_t d = 0; d < 2; ++d) {
    const int64_t gate_from = d == 0 ? 1 : 0, output_from = d == 0 ? 0 : 1;
    const Tensor dgates = dgates_h_4d.slice(0, gate_from, gate_from + steps - 1).select(2, d).flatten(0, 1);
    const Tensor h_prev = output_4d.slice(0, output_from, output_from + steps - 1).select(2, d).flatten(0, 1);
    Tensor grad = grad_weight_hh.select(0, d);
    at::mm_out(grad, dgates.t(), h_prev);
    grad.addmm_(step_dgates_h.select(0, d).t(), h0_sorted.select(0, d));
  }
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0, grad_c0};
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

int64_t gates_of(std::string_view cell) {
  return dispatch_cell(cell, [](auto c) -> int64_t { return decltype(c)::kGates; });
}

void check_tensor(const Tensor& tensor, const char* name, at::IntArrayRef shape, const Tensor& input) {
  TORCH_CHECK(tensor.sizes() == shape, "birnn_fast: expected ", name, " of size ", shape, ", got ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == input.scalar_type(), "birnn_fast: expected ", name, " of dtype ",
              input.scalar_type(), " (input's), got ", tensor.scalar_type());
  TORCH_CHECK(tensor.device().is_cpu(), "birnn_fast: expected ", name, " on the CPU, got ", tensor.device());
  TORCH_CHECK(tensor.is_contiguous(), "birnn_fast: expected ", name, " to be contiguous");
}

// The arguments shared by forward and backward. The Python layer already guarantees them; these
// checks keep a direct call of the op from reading out of bounds, and name the argument at fault.
void check_common(std::string_view cell, const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh,
                  const Tensor& bias_hh, const Tensor& h0, const Tensor& c0, const Tensor& lengths) {
  TORCH_CHECK(input.dim() == 3, "birnn_fast: expected input of shape (T, B, I), got ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "birnn_fast: the CPU kernels take float32 or float64 input, got ", input.scalar_type());
  TORCH_CHECK(weight_hh.dim() == 3, "birnn_fast: expected weight_hh of shape (2, G*H, H), got ", weight_hh.sizes());
  const int64_t B = input.size(1), I = input.size(2), H = weight_hh.size(2), GH = gates_of(cell) * H;
  check_tensor(input, "input", input.sizes(), input);
  check_tensor(weight_ih, "weight_ih", {2, GH, I}, input);
  check_tensor(weight_hh, "weight_hh", {2, GH, H}, input);
  check_tensor(bias_hh, "bias_hh", {2, GH}, input);
  check_tensor(h0, "h0", {2, B, H}, input);
  if (cell == "LSTM") {
    check_tensor(c0, "c0", {2, B, H}, input);
  } else {
    TORCH_CHECK(c0.numel() == 0, "birnn_fast: expected an empty c0 for cell ", cell, ", got ", c0.sizes());
  }
  TORCH_CHECK(lengths.sizes() == at::IntArrayRef{B} && lengths.scalar_type() == at::kLong &&
                  lengths.device().is_cpu() && lengths.is_contiguous(),
              "birnn_fast: expected lengths as a contiguous int64 CPU tensor of size (", B, "), got ",
              lengths.scalar_type(), " ", lengths.sizes(), " on ", lengths.device());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cpu(c10::string_view cell, const Tensor& input,
                                                       const Tensor& weight_ih, const Tensor& weight_hh,
                                                       const Tensor& bias_ih, const Tensor& bias_hh,
                                                       const Tensor& h0, const Tensor& c0, const Tensor& lengths,
                                                       bool save_workspace) {
  const std::string_view cell_name(cell.data(), cell.size());
  check_common(cell_name, input, weight_ih, weight_hh, bias_hh, h0, c0, lengths);
  check_tensor(bias_ih, "bias_ih", bias_hh.sizes(), input);
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "birnn_fast::forward", [&] {
    return dispatch_cell(cell_name, [&](auto cell_type) {
      return forward_impl<decltype(cell_type), scalar_t>(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0,
                                                         lengths, save_workspace);
    });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_cpu(
    c10::string_view cell, const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& bias_hh, const Tensor& h0,
    const Tensor& c0, const Tensor& lengths, const Tensor& output, const Tensor& workspace) {
  const std::string_view cell_name(cell.data(), cell.size());
  check_common(cell_name, input, weight_ih, weight_hh, bias_hh, h0, c0, lengths);
  const int64_t steps = input.size(0), B = input.size(1), H = weight_hh.size(2);
  const int64_t saved = dispatch_cell(cell_name, [](auto c) -> int64_t { return decltype(c)::kSaved; });
  check_tensor(grad_output, "grad_output", {steps, B, 2 * H}, input);
  check_tensor(grad_h_n, "grad_h_n", h0.sizes(), input);
  check_tensor(grad_c_n, "grad_c_n", c0.sizes(), input);
  check_tensor(output, "output", {steps, B, 2 * H}, input);
  check_tensor(workspace, "workspace", {steps, B, 2, saved * H}, input);
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "birnn_fast::backward", [&] {
    return dispatch_cell(cell_name, [&](auto cell_type) {
      return backward_impl<decltype(cell_type), scalar_t>(grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                                          weight_hh, h0, c0, lengths, output, workspace);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_fast, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace birnn_fast::cpu
