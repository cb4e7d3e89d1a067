// birnn_fast::backward on the CPU: the two recurrences in reverse time, one per thread (or per team
// of threads, team.h), computing the gate gradients of every step from forward's workspace and
// output, each step one product dgates_h @ W_hh over the rows still running.
//
// The products around the recurrences -- weight, bias and input gradients -- run over the real
// tokens only: on two threads or fewer inside each direction's thread, a chunk of steps at a time
// on buffers that stay in cache (ChunkedGradients); with more threads as a few multi-threaded
// GEMMs after the recurrences, on dgates (N, 2*G*H). A projected LSTM's grad W_hr is summed inside
// the direction's thread in both cases, a chunk of rows at a time (Projection). The op's
// output_mask drops the input gradient's products (a first layer whose input needs none) or the
// weight gradients' (a frozen layer); the recurrences run in full either way.
//
// As forward, the kernel reads the layer's storage type S and computes in T = compute_t<S>: a
// bfloat16 / float16 layer's input, output, grad_output, h0 and weights are read as they are (rows
// widened where the cells read them, the products' operands in the dtype), while the gate
// gradients, dh, dc and every gradient it returns are float32 -- the caller rounds those once.
#include <ATen/Parallel.h>

#include <array>
#include <mutex>
#include <optional>

#include "convert.h"
#include "isa.h"
#include "kernels.h"
#include "products.h"
#include "schedule.h"
#include "team.h"

namespace birnn_fast::cpu {
namespace {

template <typename S>
struct BackwardArgs {
  using T = compute_t<S>;
  const Schedule* schedule;
  int64_t direction, step, hidden, state;
  int64_t first_unit, units;  // the hidden units this thread computes (all, or its team slice)
  const S* grad_output;  // (T, B, 2P)
  const S* h0;           // (B, P) this direction's, caller's order
  const T* c0;           // (B, H) this direction's, caller's order, LSTM only
  const S* output;       // (T, B, 2P)
  const T* workspace;
  T* dh;              // (B, P) sorted
  T* dc;              // (B, H) sorted, LSTM only
  T* dgates_x;        // (N, 2GH) packed, when the gradients are computed after the loop
  T* dgates_h;        // (N, 2GH) packed, written only if the cell splits its gate gradients
  T* chunk_dgates_x;  // (B, GH) this step's rows in ChunkedGradients::dgates_x, when by chunks
  T* chunk_dgates_h;  // (B, GH) same in ChunkedGradients::dgates_h
  T* step_dgates_h;   // (B, GH) sorted: this step's, the operand of the recurrent GEMM
  const T* dunprojected;  // (B, H) sorted: gradient reaching o * tanh(c_t), projected LSTM only
  const S* zeros;         // (H) zeros: the projected cell's grad_out
};

template <typename Cell, typename S>
struct BackwardRows {
  using T = compute_t<S>;
  static BIRNN_INLINE void run(const BackwardArgs<S>& a) {
    const Schedule& schedule = *a.schedule;
    const int64_t H = a.hidden, P = a.state, GH = Cell::kGates * H, WH = Cell::kSaved * H, B = schedule.batch;
    const int64_t d = a.direction;
    const int64_t rows = schedule.active[a.step];
    const bool projected = a.dunprojected != nullptr;
    const int64_t u = a.first_unit;  // every row pointer below starts at this thread's first unit
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t b = schedule.order[j];
      const int64_t t = schedule.time(a.step, j, d);
      const int64_t row = t * B + b, token = schedule.packed(t, j);
      // The previous step's state: h0/c0 at a row's first step, else what that step stored.
      const int64_t prev_t = d == 0 ? t - 1 : t + 1;
      const bool first = a.step == 0;
      const S* h_prev = first ? a.h0 + b * P : a.output + (prev_t * B + b) * 2 * P + d * P;
      const T* c_prev = nullptr;
      if constexpr (Cell::kHasCellState) {
        c_prev = first ? a.c0 + b * H
                       : a.workspace + (schedule.packed(prev_t, j) * 2 + d) * WH + Cell::kCellStateSlot * H;
      }
      T* step_dgh = a.step_dgates_h + j * GH + u;
      // The cell reads dh (and writes it if kDirectHiddenGrad, which no projected cell has).
      T* dh = (projected ? const_cast<T*>(a.dunprojected) + j * H : a.dh + j * P) + u;
      const S* grad_out = (projected ? a.zeros : a.grad_output + row * 2 * P + d * P) + u;
      T* dgx = a.chunk_dgates_x != nullptr ? a.chunk_dgates_x + j * GH : a.dgates_x + token * 2 * GH + d * GH;
      Cell::backward(H, a.units, a.workspace + (token * 2 + d) * WH + u, h_prev + u,
                     c_prev != nullptr ? c_prev + u : nullptr, a.output + row * 2 * P + d * P + u, grad_out, dh,
                     Cell::kHasCellState ? a.dc + j * H + u : nullptr, dgx + u, step_dgh);
      if constexpr (Cell::kSplitGateGrad) {
        T* dgh = a.chunk_dgates_h != nullptr ? a.chunk_dgates_h + j * GH : a.dgates_h + token * 2 * GH + d * GH;
        for (int64_t g = 0; g < Cell::kGates; ++g) {
          std::memcpy(dgh + g * H + u, step_dgh + g * H, a.units * sizeof(T));
        }
      }
    }
  }
};

// A projected LSTM's h_t = W_hr r_t with r_t = o * tanh(c_t): per step, the gradient reaching h_t
// (recurrent plus grad_output) goes back through W_hr to r_t, and grad W_hr sums
// (gradient at h_t)^T r_t, over `capacity` rows at a time.
template <typename T>
struct Projection {
  const ReusedWeight<T>* weight_hr;  // g @ W_hr: (rows, P) -> (rows, H)
  int64_t capacity;
  T* dh_total;       // (capacity, P)
  T* unprojected;    // (capacity, H)
  T* grad_weight_hr;  // (P, H), accumulated
  int64_t filled = 0;

  void flush(int64_t P, int64_t H) {
    gemm_tn_accumulate<T>(P, H, filled, dh_total, P, unprojected, H, grad_weight_hr, H);
    filled = 0;
  }
};

template <typename S, typename T = compute_t<S>>
void project_step(const BackwardArgs<S>& a, Projection<T>& projection, T* dunprojected) {
  const Schedule& schedule = *a.schedule;
  const int64_t H = a.hidden, P = a.state, WH = LstmCell::kSaved * H, B = schedule.batch, d = a.direction;
  const int64_t rows = schedule.active[a.step];
  if (projection.filled + rows > projection.capacity) {
    projection.flush(P, H);
  }
  T* total = projection.dh_total + projection.filled * P;
  T* unprojected = projection.unprojected + projection.filled * H;
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t t = schedule.time(a.step, j, d);
    const S* grad_out = a.grad_output + (t * B + schedule.order[j]) * 2 * P + d * P;
    for (int64_t p = 0; p < P; ++p) {
      total[j * P + p] = a.dh[j * P + p] + static_cast<T>(grad_out[p]);
    }
    LstmCell::unprojected(H, a.workspace + (schedule.packed(t, j) * 2 + d) * WH, unprojected + j * H);
  }
  projection.weight_hr->multiply(rows, total, P, dunprojected, H, /*accumulate=*/false);
  projection.filled += rows;
}

template <typename S>
struct ChunkedGradients {
  using T = compute_t<S>;
  const S* input;      // (T, B, I)
  const S* weight_ih;  // (GH, I), this direction's
  // dgates_x @ W_ih for a half layer's products (W_ih laid out once per call, with input_grad
  // only); else W_ih in place.
  const ReusedWeight<T>* half_weight_ih;
  c10::ScalarType layer_dtype;
  int64_t inputs, steps_per_chunk;
  bool input_grad, weight_grads;  // which of the two the caller wants (the op's output_mask)
  S* x;               // (rows, I): the chunk's input rows
  T* dx;              // (rows, I): their input gradients (x itself where S is T)
  S* h_prev;          // (rows, P): the states the chunk's steps started from
  T* dgates_x;        // (rows, GH)
  T* dgates_h;        // (rows, GH), if the cell splits its gate gradients
  // With half_weight_ih: (rows, GH) and (GH, rows) 16-bit buffers, a set of gate gradients rounded
  // to the layer's dtype, in row order and transposed.
  uint16_t* rounded_dgates;
  uint16_t* rounded_dgates_t;
  T* grad_input;      // (T, B, I), zeroed, accumulated by both directions under grad_input_locks
  std::mutex* grad_input_locks;  // by time step
  // Accumulated; null without weight_grads (x's input rows and h_prev then go unfilled).
  T* grad_weight_ih;  // (GH, I)
  T* grad_weight_hh;  // (GH, P)
  T* grad_bias_ih;    // (GH)
  T* grad_bias_hh;    // (GH)
};

// A bfloat16 / float16 layer's chunk products on the half backend (as gemm_tn_accumulate and
// ReusedWeight would run them, with the same rounded operands): each set of gate gradients rounded
// once, read in row order by dX = dgates_x @ W_ih and transposed once for the weight gradients,
// which an LSTM or RNN takes both from dgates_x. Writes dX into g.dx (with g.input_grad). S: float32
// copies of the layer, or the layer's own dtype (x and h_prev then go to the products as they are).
template <typename Cell, typename S>
void half_chunk_products(const ChunkedGradients<S>& g, int64_t rows, int64_t GH, int64_t P,
                         const float* dgates_h) {
  const int64_t I = g.inputs;
  const bool vnni = half_products(g.layer_dtype) == HalfProducts::kBrgemmVnni;
  dispatch_half(g.layer_dtype, [&](auto low) {
    using Low = decltype(low);
    Low* rounded = reinterpret_cast<Low*>(g.rounded_dgates);
    const auto round = [&](const float* dgates) {
      for (int64_t r = 0; r < rows; ++r) {
        convert_row(GH, dgates + r * GH, rounded + r * GH);
      }
      transpose(rows, GH, g.rounded_dgates, GH, g.rounded_dgates_t, rows);
    };
    const auto weight_gradient = [&](const S* tokens, int64_t n, float* grad) {  // grad += dgates^T tokens
      const HalfWeight operand(g.layer_dtype, vnni, rows, n, tokens, n, /*transpose_b=*/false);
      operand.multiply(GH, reinterpret_cast<const Low*>(g.rounded_dgates_t), rows, grad, n, /*add_c=*/true);
    };
    round(g.dgates_x);
    if (g.weight_grads) {
      weight_gradient(g.x, I, g.grad_weight_ih);
      if constexpr (!Cell::kSplitGateGrad) {
        weight_gradient(g.h_prev, P, g.grad_weight_hh);
      }
    }
    if (g.input_grad) {
      g.half_weight_ih->multiply(rows, static_cast<const Low*>(rounded), GH, g.dx, I, /*accumulate=*/false);
    }
    if constexpr (Cell::kSplitGateGrad) {
      if (g.weight_grads) {
        round(dgates_h);
        weight_gradient(g.h_prev, P, g.grad_weight_hh);
      }
    }
  });
}

// Adds the gradients of steps [first, last), whose gate gradients are in the chunk buffers.
template <typename Cell, typename S>
void chunk_gradients(const BackwardArgs<S>& args, const ChunkedGradients<S>& g, int64_t first, int64_t last,
                     const std::vector<int64_t>& starts) {
  using T = compute_t<S>;
  const Schedule& schedule = *args.schedule;
  const int64_t H = args.hidden, P = args.state, GH = Cell::kGates * H, I = g.inputs, B = schedule.batch;
  const int64_t d = args.direction, rows = starts.back();
  const T* dgates_h = Cell::kSplitGateGrad ? g.dgates_h : g.dgates_x;
  if (g.weight_grads) {
    gather_chunk_inputs(schedule, d, first, last, starts, g.input, I, g.x);
    for (int64_t step = first; step < last; ++step) {
      for (int64_t j = 0; j < schedule.active[step]; ++j) {
        const int64_t r = starts[step - first] + j, t = schedule.time(step, j, d), b = schedule.order[j];
        const S* h_prev =
            step == 0 ? args.h0 + b * P : args.output + ((d == 0 ? t - 1 : t + 1) * B + b) * 2 * P + d * P;
        std::copy_n(h_prev, P, g.h_prev + r * P);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < GH; ++k) {
        g.grad_bias_ih[k] += g.dgates_x[r * GH + k];
        g.grad_bias_hh[k] += dgates_h[r * GH + k];
      }
    }
  }
  // Products this small run in float32 (gemm_tn_accumulate's and ReusedWeight's rule) on float32
  // copies of a layer; on the layer's own dtype, always in it.
  constexpr bool kNarrowStorage = !std::is_same_v<S, T>;
  const bool half = g.rounded_dgates != nullptr && (kNarrowStorage || GH * std::min(I, P) * rows > kSmallMultiplyAdds);
  TORCH_INTERNAL_ASSERT(half || !kNarrowStorage, "a bfloat16 / float16 layer's chunk products run in its dtype");
  if constexpr (std::is_same_v<T, float>) {
    if (half) {
      half_chunk_products<Cell>(g, rows, GH, P, dgates_h);
    }
  }
  if constexpr (std::is_same_v<S, T>) {
    if (!half && g.weight_grads) {
      gemm_tn_accumulate<T>(GH, I, rows, g.dgates_x, GH, g.x, I, g.grad_weight_ih, I, g.layer_dtype);
      gemm_tn_accumulate<T>(GH, P, rows, dgates_h, GH, g.h_prev, P, g.grad_weight_hh, P, g.layer_dtype);
    }
    if (g.input_grad && !half) {
      // W_ih in place rather than a packed copy: the copy would hold as much memory as W_ih's gradient.
      if (g.half_weight_ih != nullptr) {
        g.half_weight_ih->multiply(rows, g.dgates_x, GH, g.dx, I, /*accumulate=*/false);
      } else {
        gemm_in_thread<T>(rows, I, GH, g.dgates_x, GH, g.weight_ih, I, g.dx, I);
      }
    }
  }
  if (!g.input_grad) {
    return;
  }
  for (int64_t step = first; step < last; ++step) {
    for (int64_t j = 0; j < schedule.active[step]; ++j) {
      const int64_t r = starts[step - first] + j, t = schedule.time(step, j, d);
      const T* contribution = g.dx + r * I;
      T* grad_input = g.grad_input + (t * B + schedule.order[j]) * I;
      // Each element gets exactly two additions onto zero, one per direction: the order is immaterial.
      const std::lock_guard<std::mutex> lock(g.grad_input_locks[t]);
      for (int64_t i = 0; i < I; ++i) {
        grad_input[i] += contribution[i];
      }
    }
  }
}

template <typename Cell, typename S, typename T = compute_t<S>>
void backward_direction(BackwardArgs<S> args, const ReusedWeight<T>& weight_hh, Projection<T>* projection,
                        T* dunprojected, const ChunkedGradients<S>* chunked) {
  const int64_t H = args.hidden, P = args.state, GH = Cell::kGates * H;
  const Schedule& schedule = *args.schedule;
  const int64_t longest = schedule.longest();
  const int64_t chunk = chunked != nullptr ? chunked->steps_per_chunk : longest;
  for (int64_t last = longest; last > 0; last -= chunk) {
    const int64_t first = std::max<int64_t>(0, last - chunk);
    const std::vector<int64_t> starts = chunk_starts(schedule, first, last);
    for (int64_t step = last - 1; step >= first; --step) {
      args.step = step;
      if (chunked != nullptr) {
        args.chunk_dgates_x = chunked->dgates_x + starts[step - first] * GH;
        args.chunk_dgates_h = Cell::kSplitGateGrad ? chunked->dgates_h + starts[step - first] * GH : nullptr;
      }
      if constexpr (Cell::kCanProject) {
        if (projection != nullptr) {
          project_step(args, *projection, dunprojected);
        }
      }
      run_rows<BackwardRows<Cell, S>>(args);
      weight_hh.multiply(schedule.active[step], args.step_dgates_h, GH, args.dh, P,
                         /*accumulate=*/Cell::kDirectHiddenGrad);
    }
    if (chunked != nullptr && (chunked->input_grad || chunked->weight_grads)) {
      chunk_gradients<Cell, S>(args, *chunked, first, last, starts);
    }
  }
  if (projection != nullptr) {
    projection->flush(P, H);
  }
}

// (N, 2P) packed: the state each token's step started from, per direction: h0 at a row's first
// step, else the output of the step before it (time t - 1 forward, t + 1 in reverse).
template <typename T>
Tensor previous_states(const Schedule& schedule, const Tensor& output, const Tensor& h0) {
  const int64_t B = schedule.batch, P = h0.size(2);
  Tensor h_prev = empty_cpu({schedule.tokens, 2 * P}, output.options());
  const T* out = output.data_ptr<T>();
  const T* initial = h0.data_ptr<T>();
  T* dst = h_prev.data_ptr<T>();
  at::parallel_for(0, schedule.longest(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < schedule.active[t]; ++j) {
        const int64_t b = schedule.order[j];
        T* row = dst + schedule.packed(t, j) * 2 * P;
        std::copy_n(t == 0 ? initial + b * P : out + ((t - 1) * B + b) * 2 * P, P, row);
        std::copy_n(t == schedule.lengths[j] - 1 ? initial + (B + b) * P : out + ((t + 1) * B + b) * 2 * P + P, P,
                    row + P);
      }
    }
  });
  return h_prev;
}

// A team member's share of direction d's backward recurrence (team.h): every step, its units' cell
// math (their columns of the gate gradients, and of dh and dc), the team's barrier, then its columns
// of dh_prev = dgates_h @ W_hh, which need every member's gate gradients. Those are double-buffered:
// step s writes step_dgates_h[s % 2] while the other members may still read step s + 1's.
template <typename Cell, typename S, typename T = compute_t<S>>
void backward_member(BackwardArgs<S> args, const S* weight_hh, const std::array<T*, 2>& step_dgates_h,
                     TeamBarrier& barrier, at::ScalarType layer_dtype) {
  const Schedule& schedule = *args.schedule;
  const int64_t P = args.state, GH = Cell::kGates * args.hidden, first = args.first_unit, units = args.units;
  std::optional<ReusedWeight<T>> weight_columns;  // W_hh[:, first:first + units], (GH, units)
  if (units > 0) {
    weight_columns.emplace(GH, units, weight_hh + first, P, /*transpose_b=*/false, layer_dtype);
  }
  for (int64_t step = schedule.longest() - 1; step >= 0; --step) {
    const int64_t rows = schedule.active[step];
    args.step = step;
    args.step_dgates_h = step_dgates_h[step % 2];
    if (units > 0) {
      run_rows<BackwardRows<Cell, S>>(args);
    }
    barrier.wait();
    if (units > 0) {
      weight_columns->multiply(rows, args.step_dgates_h, GH, args.dh + first, P,
                               /*accumulate=*/Cell::kDirectHiddenGrad);
    }
  }
}

template <typename Cell, typename S>
std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> backward_impl(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input,
    at::TensorList weights, const Tensor& h0, const Tensor& c0, const Tensor& lengths, const Tensor& output,
    const Tensor& workspace, at::ScalarType layer_dtype, const std::array<bool, 4>& output_mask) {
  using T = compute_t<S>;
  constexpr at::ScalarType kCompute = c10::CppTypeToScalarType<T>::value;
  const at::TensorOptions compute = input.options().dtype(kCompute);
  const Layer layer = layer_of(input, weights, Cell::kGates);
  const bool input_grad = output_mask[0], weight_grads = output_mask[1];
  const int64_t steps = layer.steps, B = layer.batch, I = layer.inputs, H = layer.hidden, P = layer.state;
  const int64_t GH = Cell::kGates * H;
  const Schedule schedule(lengths, steps);

  // The states' gradients and c0 in T (copies only for a bfloat16 / float16 layer: 2 x B rows each).
  Tensor dh = reorder_states<T>(schedule, grad_h_n.to(kCompute), /*to_sorted=*/true);
  Tensor dc = Cell::kHasCellState ? reorder_states<T>(schedule, grad_c_n.to(kCompute), /*to_sorted=*/true) : Tensor();
  const Tensor c0_compute = Cell::kHasCellState ? c0.to(kCompute) : c0;
  Tensor step_dgates_h = empty_cpu({2, B, GH}, compute);
  const TeamPlan teams =
      team_plan(B, H, P, Cell::kGates, layer.projected, Cell::kGates * H * P * int64_t{sizeof(T)});
  // Teams take the products around the recurrence as whole multi-threaded GEMMs.
  const bool chunked = by_chunks() && teams.members == 1;
  const int64_t chunk_steps = steps_per_chunk(schedule), chunk_rows = chunk_steps * B;
  // The chunk products of a bfloat16 / float16 layer (S, or a float32 copy of it) in its dtype.
  const bool half_chunks = chunked && (input_grad || weight_grads) && layer_dtype != kCompute &&
                           half_products(layer_dtype) != HalfProducts::kFloat32;
  Tensor dgates_x, dgates_h, grad_input;
  std::vector<Tensor> grad_weights(weights.size());  // in the order of weights
  Tensor chunk_x, chunk_dx, chunk_h_prev, chunk_dgates_x, chunk_dgates_h, chunk_rounded;
  std::vector<std::mutex> grad_input_locks(chunked ? steps : 0);
  if (chunked) {
    chunk_x = empty_cpu({2, chunk_rows, I}, input.options());
    chunk_dx = std::is_same_v<S, T> ? chunk_x : empty_cpu({2, chunk_rows, I}, compute);
    chunk_h_prev = empty_cpu({2, chunk_rows, P}, input.options());
    chunk_dgates_x = empty_cpu({2, chunk_rows, GH}, compute);
    chunk_dgates_h = Cell::kSplitGateGrad ? empty_cpu(chunk_dgates_x.sizes(), compute) : chunk_dgates_x;
    if (half_chunks) {
      chunk_rounded = empty_cpu({2, 2, chunk_rows * GH}, input.options().dtype(layer_dtype));
    }
    if (input_grad) {
      grad_input = empty_cpu(input.sizes(), compute).zero_();
    }
    for (size_t k = 0; k < weights.size() && weight_grads; ++k) {
      grad_weights[k] = zeros_cpu(weights[k].sizes(), compute);
    }
  } else {
    dgates_x = empty_cpu({schedule.tokens, 2 * GH}, compute);
    dgates_h = Cell::kSplitGateGrad ? empty_cpu(dgates_x.sizes(), compute) : dgates_x;
  }
  Tensor proj_dh_total, proj_unprojected, dunprojected, zeros;
  if (layer.projected) {
    proj_dh_total = empty_cpu({2, chunk_rows, P}, compute);
    proj_unprojected = empty_cpu({2, chunk_rows, H}, compute);
    dunprojected = empty_cpu({2, B, H}, compute);
    zeros = zeros_cpu({H}, input.options());
    for (int64_t d = 0; d < 2; ++d) {
      const int64_t k = d * layer.per_direction() + kWeightHr;
      if (!grad_weights[k].defined()) {
        grad_weights[k] = zeros_cpu(weights[k].sizes(), compute);
      }
    }
  }

  const auto direction_args = [&](int64_t d, UnitSlice slice) {
    return BackwardArgs<S>{&schedule,
                           d,
                           /*step=*/0,
                           H,
                           P,
                           slice.first,
                           slice.count,
                           grad_output.data_ptr<S>(),
                           h0.data_ptr<S>() + d * B * P,
                           Cell::kHasCellState ? c0_compute.data_ptr<T>() + d * B * H : nullptr,
                           output.data_ptr<S>(),
                           workspace.data_ptr<T>(),
                           dh.data_ptr<T>() + d * B * P,
                           Cell::kHasCellState ? dc.data_ptr<T>() + d * B * H : nullptr,
                           chunked ? nullptr : dgates_x.data_ptr<T>(),
                           chunked ? nullptr : dgates_h.data_ptr<T>(),
                           /*chunk_dgates_x=*/nullptr,
                           /*chunk_dgates_h=*/nullptr,
                           step_dgates_h.data_ptr<T>() + d * B * GH,
                           layer.projected ? dunprojected.data_ptr<T>() + d * B * H : nullptr,
                           layer.projected ? zeros.data_ptr<S>() : nullptr};
  };
  if (teams.members > 1) {
    TORCH_INTERNAL_ASSERT(!chunked && !layer.projected);
    // Step s's gate gradients go to step_dgates_h at even steps, to odd_dgates_h at odd ones.
    Tensor odd_dgates_h = empty_cpu({2, B, GH}, compute);
    run_teams(teams, [&](int64_t d, int64_t member, int64_t count, TeamBarrier& barrier) {
      const BackwardArgs<S> args = direction_args(d, unit_slice(H, member, count));
      backward_member<Cell, S>(args, weight_of<S>(weights, layer, d, kWeightHh),
                               {args.step_dgates_h, odd_dgates_h.data_ptr<T>() + d * B * GH}, barrier, layer_dtype);
    });
  } else {
    at::parallel_for(0, 2, directions_grain(schedule, GH, I, P), [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) {
        const BackwardArgs<S> args = direction_args(d, {0, H});
        ChunkedGradients<S> gradients{};
        uint16_t* rounded = half_chunks ? static_cast<uint16_t*>(chunk_rounded.data_ptr()) : nullptr;
        std::optional<ReusedWeight<T>> half_weight_ih;
        if (half_chunks && input_grad) {
          half_weight_ih.emplace(GH, I, weight_of<S>(weights, layer, d, kWeightIh), I, /*transpose_b=*/false,
                                 layer_dtype);
        }
        if (chunked) {
          gradients = {input.data_ptr<S>(),
                       weight_of<S>(weights, layer, d, kWeightIh),
                       half_weight_ih ? &*half_weight_ih : nullptr,
                       layer_dtype,
                       I,
                       chunk_steps,
                       input_grad,
                       weight_grads,
                       chunk_x.data_ptr<S>() + d * chunk_rows * I,
                       chunk_dx.data_ptr<T>() + d * chunk_rows * I,
                       chunk_h_prev.data_ptr<S>() + d * chunk_rows * P,
                       chunk_dgates_x.data_ptr<T>() + d * chunk_rows * GH,
                       chunk_dgates_h.data_ptr<T>() + d * chunk_rows * GH,
                       half_chunks ? rounded + 2 * d * chunk_rows * GH : nullptr,
                       half_chunks ? rounded + (2 * d + 1) * chunk_rows * GH : nullptr,
                       input_grad ? grad_input.data_ptr<T>() : nullptr,
                       grad_input_locks.data(),
                       weight_grads ? weight_of<T>(grad_weights, layer, d, kWeightIh) : nullptr,
                       weight_grads ? weight_of<T>(grad_weights, layer, d, kWeightHh) : nullptr,
                       weight_grads ? weight_of<T>(grad_weights, layer, d, kBiasIh) : nullptr,
                       weight_grads ? weight_of<T>(grad_weights, layer, d, kBiasHh) : nullptr};
        }
        std::optional<ReusedWeight<T>> weight_hr;
        std::optional<Projection<T>> projection;
        if (layer.projected) {
          weight_hr.emplace(P, H, weight_of<S>(weights, layer, d, kWeightHr), H, /*transpose_b=*/false, layer_dtype);
          projection = Projection<T>{&*weight_hr, chunk_rows, proj_dh_total.data_ptr<T>() + d * chunk_rows * P,
                                     proj_unprojected.data_ptr<T>() + d * chunk_rows * H,
                                     weight_of<T>(grad_weights, layer, d, kWeightHr)};
        }
        const ReusedWeight<T> weight_hh(GH, P, weight_of<S>(weights, layer, d, kWeightHh), P, /*transpose_b=*/false,
                                        layer_dtype);
        backward_direction<Cell, S>(args, weight_hh, projection ? &*projection : nullptr,
                                    layer.projected ? dunprojected.data_ptr<T>() + d * B * H : nullptr,
                                    chunked ? &gradients : nullptr);
      }
    });
  }

  Tensor grad_h0 = reorder_states<T>(schedule, dh, /*to_sorted=*/false);
  Tensor grad_c0 =
      Cell::kHasCellState ? reorder_states<T>(schedule, dc, /*to_sorted=*/false) : empty_cpu({0}, compute);
  if (!chunked) {
    // A bfloat16 / float16 layer's operands widened here (this path runs with teams, or more than two threads).
    if (input_grad) {
      grad_input =
          unpack<T>(schedule, mm_cached(dgates_x, both_directions(weights, layer, kWeightIh).to(kCompute)), steps);
    }
    if (weight_grads) {
      const Tensor grad_weight_ih = mm_cached(dgates_x.t(), pack<S>(schedule, input).to(kCompute));  // (2GH, I)
      const Tensor grad_bias_ih = dgates_x.sum(0), grad_bias_hh = dgates_h.sum(0);
      const Tensor h_prev = previous_states<S>(schedule, output, h0).to(kCompute);
      for (int64_t d = 0; d < 2; ++d) {
        const int64_t k = d * layer.per_direction();
        grad_weights[k + kWeightIh] = grad_weight_ih.narrow(0, d * GH, GH);
        grad_weights[k + kWeightHh] = mm_cached(dgates_h.narrow(1, d * GH, GH).t(), h_prev.narrow(1, d * P, P));
        grad_weights[k + kBiasIh] = grad_bias_ih.narrow(0, d * GH, GH);
        grad_weights[k + kBiasHh] = grad_bias_hh.narrow(0, d * GH, GH);
      }
    }
  }
  if (!input_grad) {
    grad_input = empty_cpu({0}, compute);
  }
  for (Tensor& grad : grad_weights) {
    // Without weight_grads: empty (a projected layer's grad W_hr was summed, and is dropped).
    grad = weight_grads ? grad : empty_cpu({0}, compute);
  }
  return {grad_input, grad_weights, grad_h0, grad_c0};
}

}  // namespace

template <typename S>
std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> backward_kernel(
    std::string_view cell, const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, at::TensorList weights, const Tensor& h0, const Tensor& c0, const Tensor& lengths,
    const Tensor& output, const Tensor& workspace, at::ScalarType layer_dtype, const std::array<bool, 4>& output_mask) {
  return dispatch_cell(cell, [&](auto cell_type) {
    return backward_impl<decltype(cell_type), S>(grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths,
                                                 output, workspace, layer_dtype, output_mask);
  });
}

#define BIRNN_BACKWARD_KERNEL(S)                                                                                \
  template std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> backward_kernel<S>(                         \
      std::string_view, const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::TensorList,            \
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::ScalarType,               \
      const std::array<bool, 4>&);
BIRNN_BACKWARD_KERNEL(float)
BIRNN_BACKWARD_KERNEL(double)
BIRNN_BACKWARD_KERNEL(c10::BFloat16)
BIRNN_BACKWARD_KERNEL(c10::Half)
#undef BIRNN_BACKWARD_KERNEL

}  // namespace birnn_fast::cpu
