// birnn_fast::forward on the CPU: both directions at once, one per thread (or per team of threads,
// each member its slice of the units: team.h), each step one product h_prev @ W_hh^T over the rows
// still running plus the fused cell math.
//
// The input projection x @ W_ih^T + b_ih runs over the real tokens only: on two threads or fewer
// inside each direction's thread, a chunk of steps at a time into a small buffer that stays in
// cache (ChunkedProjection); with more threads as one multi-threaded GEMM up front into gates_x
// (N, 2*G*H), direction d at column d*G*H; either way without bias_ih, which the cell adds. A chunk
// whose rows lie in order in the input (every row running, in the caller's order, and in reverse
// also of one length: equal lengths) is projected from the input in place. The workspace
// (T, B, 2, W*H) holds the saved activations of (packed token, direction) in its first N*2*W*H
// elements and zeros after them.
//
// The kernel reads and writes the layer's storage type S and computes in C = compute_t<S>: a
// bfloat16 / float16 layer's input and weights go to the products as they are (float32
// accumulation), while h, c, the gate math and the workspace are float32 and every output row is
// rounded once as it is written.
#include <ATen/Parallel.h>

#include <array>
#include <memory>
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
struct ForwardArgs {
  using T = compute_t<S>;
  const Schedule* schedule;
  int64_t direction, step, hidden, state;
  int64_t first_unit, units;  // the hidden units this thread computes (all, or its team slice)
  const T* gates_x;       // (N, 2GH) packed x @ W_ih^T, when projected up front
  const T* step_gates_x;  // (B, GH) this step's x @ W_ih^T, sorted rows, when projected by chunks
  T* gates_h;             // (B, GH): this step's h_prev @ W_hh^T, sorted rows
  const T* bias_ih;       // (GH)
  const T* bias_hh;       // (GH)
  T* h;                   // (B, P) sorted
  T* c;                   // (B, H) sorted, LSTM only
  T* unprojected;         // (B, H) sorted: o * tanh(c_t), projected LSTM only
  T* workspace;
  S* output;              // (T, B, 2P)
};

// kSave: store the activations backward needs (training) or not (inference).
template <typename Cell, typename S, bool kSave>
struct ForwardRows {
  using T = compute_t<S>;
  static BIRNN_INLINE void run(const ForwardArgs<S>& a) {
    const Schedule& schedule = *a.schedule;
    const int64_t H = a.hidden, P = a.state, GH = Cell::kGates * H, WH = Cell::kSaved * H, B = schedule.batch;
    const int64_t rows = schedule.active[a.step];
    const int64_t u = a.first_unit;  // every row pointer below starts at this thread's first unit
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t t = schedule.time(a.step, j, a.direction);
      const int64_t row = t * B + schedule.order[j], token = schedule.packed(t, j);
      const T* gx = a.step_gates_x != nullptr ? a.step_gates_x + j * GH : a.gates_x + token * 2 * GH + a.direction * GH;
      S* output_row = a.output + row * 2 * P + a.direction * P + u;
      T* h = (a.unprojected != nullptr ? a.unprojected + j * H : a.h + j * P) + u;
      T* out = h;
      if constexpr (std::is_same_v<S, T>) {
        out = a.unprojected != nullptr ? h : output_row;
      }
      Cell::template forward<kSave>(H, a.units, gx + u, a.bias_ih + u, a.gates_h + j * GH + u, a.bias_hh + u, h,
                                    Cell::kHasCellState ? a.c + j * H + u : nullptr,
                                    kSave ? a.workspace + (token * 2 + a.direction) * WH + u : nullptr, out);
      if constexpr (!std::is_same_v<S, T>) {
        if (a.unprojected == nullptr) {
          narrow(a.units, h, output_row);
        }
      }
    }
  }
};

template <typename S>
struct ChunkedProjection {
  using T = compute_t<S>;
  const S* input;                    // (T, B, I)
  const ReusedWeight<T>* weight_ih;  // x @ W_ih^T, this direction's
  int64_t inputs, steps_per_chunk;
  S* x;   // (steps_per_chunk * B, I): the chunk's input rows, by step then sorted row
  T* gx;  // (steps_per_chunk * B, GH): their projections, without bias, in x's row order
};

template <typename Cell, typename S, bool kSave>
void forward_direction(ForwardArgs<S> args, const ReusedWeight<compute_t<S>>& weight_hh,
                       const ReusedWeight<compute_t<S>>* weight_hr, const ChunkedProjection<S>* projection) {
  const Schedule& schedule = *args.schedule;
  const int64_t H = args.hidden, P = args.state, GH = Cell::kGates * H, d = args.direction, B = schedule.batch;
  const int64_t longest = schedule.longest();
  const int64_t chunk = projection != nullptr ? projection->steps_per_chunk : longest;
  for (int64_t first = 0; first < longest; first += chunk) {
    const int64_t last = std::min(longest, first + chunk);
    const std::vector<int64_t> starts = chunk_starts(schedule, first, last);
    // In place: x is the input's times [first, last) forward, [longest - last, longest - first) in
    // reverse, whose step s is then the chunk's row block last - 1 - s.
    const bool in_place = projection != nullptr && schedule.in_order && schedule.active[last - 1] == B &&
                          (d == 0 || schedule.lengths.back() == longest);
    if (projection != nullptr) {
      const int64_t I = projection->inputs;
      const S* x = projection->input + (d == 0 ? first : longest - last) * B * I;
      if (!in_place) {
        gather_chunk_inputs(schedule, d, first, last, starts, projection->input, I, projection->x);
        x = projection->x;
      }
      projection->weight_ih->multiply(starts.back(), x, I, projection->gx, GH, /*accumulate=*/false);
    }
    for (int64_t step = first; step < last; ++step) {
      const int64_t rows = schedule.active[step];
      args.step = step;
      if (projection != nullptr) {
        args.step_gates_x = projection->gx + (in_place && d == 1 ? (last - 1 - step) * B : starts[step - first]) * GH;
      }
      weight_hh.multiply(rows, args.h, P, args.gates_h, GH, /*accumulate=*/false);
      run_rows<ForwardRows<Cell, S, kSave>>(args);
      if (weight_hr != nullptr) {
        weight_hr->multiply(rows, args.unprojected, H, args.h, P, /*accumulate=*/false);
        for (int64_t j = 0; j < rows; ++j) {
          const int64_t row = schedule.time(step, j, d) * B + schedule.order[j];
          convert_row(P, args.h + j * P, args.output + row * 2 * P + d * P);
        }
      }
    }
  }
}

// A team member's share of direction d's recurrence (team.h): every step, the products of its
// units' columns (one per gate, into gates_h at the gate's columns) and their cell math, then the
// team's barrier. h is double-buffered: step s reads h_buffers[s % 2], writes h_buffers[(s + 1) % 2].
template <typename Cell, typename S, bool kSave>
void forward_member(ForwardArgs<S> args, const S* weight_hh, const std::array<compute_t<S>*, 2>& h_buffers,
                    TeamBarrier& barrier, at::ScalarType layer_dtype) {
  using T = compute_t<S>;
  const Schedule& schedule = *args.schedule;
  const int64_t H = args.hidden, P = args.state, GH = Cell::kGates * H, first = args.first_unit, units = args.units;
  std::vector<std::unique_ptr<ReusedWeight<T>>> gate_weights;
  for (int64_t g = 0; g < Cell::kGates && units > 0; ++g) {
    gate_weights.push_back(
        std::make_unique<ReusedWeight<T>>(P, units, weight_hh + (g * H + first) * P, P, /*transpose_b=*/true,
                                          layer_dtype));
  }
  for (int64_t step = 0; step < schedule.longest(); ++step) {
    const int64_t rows = schedule.active[step];
    T* previous = h_buffers[step % 2];
    T* next = h_buffers[(step + 1) % 2];
    if (units > 0) {
      for (int64_t g = 0; g < Cell::kGates; ++g) {
        gate_weights[g]->multiply(rows, previous, P, args.gates_h + g * H + first, GH, /*accumulate=*/false);
      }
      for (int64_t j = 0; j < rows; ++j) {  // the cells read h_prev in place (GRU)
        std::copy_n(previous + j * P + first, units, next + j * P + first);
      }
      args.step = step;
      args.h = next;
      run_rows<ForwardRows<Cell, S, kSave>>(args);
    }
    barrier.wait();
  }
}

template <typename Cell, typename S>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(const Tensor& input, at::TensorList weights, const Tensor& h0,
                                                        const Tensor& c0, const Tensor& lengths, bool save_workspace,
                                                        at::ScalarType layer_dtype) {
  using T = compute_t<S>;
  constexpr at::ScalarType kCompute = c10::CppTypeToScalarType<T>::value;
  const Layer layer = layer_of(input, weights, Cell::kGates);
  const int64_t steps = layer.steps, B = layer.batch, I = layer.inputs, H = layer.hidden, P = layer.state;
  const int64_t GH = Cell::kGates * H, WH = Cell::kSaved * H;
  const Schedule schedule(lengths, steps);
  const at::TensorOptions compute = input.options().dtype(kCompute);
  // The biases in T (a copy only for a bfloat16 / float16 layer: G*H values each).
  std::vector<Tensor> biases(2 * layer.per_direction());
  for (int64_t d = 0; d < 2; ++d) {
    for (const Weight kind : {kBiasIh, kBiasHh}) {
      const int64_t k = d * layer.per_direction() + kind;
      biases[k] = weights[k].to(kCompute);
    }
  }

  const TeamPlan teams =
      team_plan(B, H, P, Cell::kGates, layer.projected, Cell::kGates * H * P * int64_t{sizeof(T)});
  // Teams take the products around the recurrence as whole multi-threaded GEMMs.
  const bool chunked = by_chunks() && teams.members == 1;
  const int64_t chunk_steps = steps_per_chunk(schedule);
  Tensor gates_x, chunk_x, chunk_gx;
  if (chunked) {
    chunk_x = empty_cpu({2, chunk_steps * B, I}, input.options());
    chunk_gx = empty_cpu({2, chunk_steps * B, GH}, compute);
  } else {
    gates_x =
        mm_cached(pack<S>(schedule, input).to(kCompute), both_directions(weights, layer, kWeightIh).to(kCompute).t());
  }
  Tensor output = empty_cpu({steps, B, 2 * P}, input.options());
  Tensor workspace = empty_cpu({0}, compute);
  if (save_workspace) {
    const int64_t used = schedule.tokens * 2 * WH;
    workspace = empty_cpu({steps, B, 2, WH}, compute);
    zero_tail(workspace, used);
  }
  Tensor h = reorder_states<T>(schedule, h0.to(kCompute), /*to_sorted=*/true);
  Tensor c = Cell::kHasCellState ? reorder_states<T>(schedule, c0.to(kCompute), /*to_sorted=*/true) : Tensor();
  Tensor gates_h = empty_cpu({2, B, GH}, compute);
  Tensor unprojected = layer.projected ? empty_cpu({2, B, H}, compute) : Tensor();

  const auto direction_args = [&](int64_t d, UnitSlice slice) {
    return ForwardArgs<S>{&schedule,
                          d,
                          /*step=*/0,
                          H,
                          P,
                          slice.first,
                          slice.count,
                          chunked ? nullptr : gates_x.data_ptr<T>(),
                          /*step_gates_x=*/nullptr,
                          gates_h.data_ptr<T>() + d * B * GH,
                          weight_of<T>(biases, layer, d, kBiasIh),
                          weight_of<T>(biases, layer, d, kBiasHh),
                          h.data_ptr<T>() + d * B * P,
                          Cell::kHasCellState ? c.data_ptr<T>() + d * B * H : nullptr,
                          layer.projected ? unprojected.data_ptr<T>() + d * B * H : nullptr,
                          workspace.data_ptr<T>(),
                          output.data_ptr<S>()};
  };
  if (teams.members > 1) {
    TORCH_INTERNAL_ASSERT(!chunked && !layer.projected);
    // Step s writes h_{s+1}'s buffer: a row whose length is odd ends in odd_h.
    Tensor odd_h = empty_cpu({2, B, P}, compute);
    run_teams(teams, [&](int64_t d, int64_t member, int64_t count, TeamBarrier& barrier) {
      const ForwardArgs<S> args = direction_args(d, unit_slice(H, member, count));
      auto run = save_workspace ? forward_member<Cell, S, true> : forward_member<Cell, S, false>;
      run(args, weight_of<S>(weights, layer, d, kWeightHh), {args.h, odd_h.data_ptr<T>() + d * B * P}, barrier,
          layer_dtype);
    });
    for (int64_t d = 0; d < 2; ++d) {
      for (int64_t j = 0; j < B; ++j) {
        if (schedule.lengths[j] % 2 == 1) {
          std::copy_n(odd_h.data_ptr<T>() + (d * B + j) * P, P, h.data_ptr<T>() + (d * B + j) * P);
        }
      }
    }
  } else {
    at::parallel_for(0, 2, directions_grain(schedule, GH, I, P), [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) {
        const ForwardArgs<S> args = direction_args(d, {0, H});
        std::optional<ReusedWeight<T>> weight_ih, weight_hr;
        ChunkedProjection<S> projection{};
        if (chunked) {
          weight_ih.emplace(I, GH, weight_of<S>(weights, layer, d, kWeightIh), I, /*transpose_b=*/true, layer_dtype);
          projection = {input.data_ptr<S>(), &*weight_ih, I, chunk_steps,
                        chunk_x.data_ptr<S>() + d * chunk_steps * B * I,
                        chunk_gx.data_ptr<T>() + d * chunk_steps * B * GH};
        }
        if (layer.projected) {
          weight_hr.emplace(H, P, weight_of<S>(weights, layer, d, kWeightHr), H, /*transpose_b=*/true, layer_dtype);
        }
        const ReusedWeight<T> weight_hh(P, GH, weight_of<S>(weights, layer, d, kWeightHh), P, /*transpose_b=*/true,
                                        layer_dtype);
        auto run = save_workspace ? forward_direction<Cell, S, true> : forward_direction<Cell, S, false>;
        run(args, weight_hh, layer.projected ? &*weight_hr : nullptr, chunked ? &projection : nullptr);
      }
    });
  }
  zero_padding(schedule, steps, output.data_ptr<S>(), 2 * P);

  Tensor h_n = reorder_states<T>(schedule, h, /*to_sorted=*/false).to(input.scalar_type());
  Tensor c_n = Cell::kHasCellState ? reorder_states<T>(schedule, c, /*to_sorted=*/false).to(input.scalar_type())
                                   : empty_cpu({0}, input.options());
  return {output, h_n, c_n, workspace};
}

}  // namespace

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_kernel(std::string_view cell, const Tensor& input,
                                                          at::TensorList weights, const Tensor& h0, const Tensor& c0,
                                                          const Tensor& lengths, bool save_workspace,
                                                          at::ScalarType layer_dtype) {
  return dispatch_cell(cell, [&](auto cell_type) {
    return forward_impl<decltype(cell_type), T>(input, weights, h0, c0, lengths, save_workspace, layer_dtype);
  });
}

#define BIRNN_FORWARD_KERNEL(S)                                                                                  \
  template std::tuple<Tensor, Tensor, Tensor, Tensor> forward_kernel<S>(std::string_view, const Tensor&,         \
                                                                        at::TensorList, const Tensor&,          \
                                                                        const Tensor&, const Tensor&, bool,     \
                                                                        at::ScalarType);
BIRNN_FORWARD_KERNEL(float)
BIRNN_FORWARD_KERNEL(double)
BIRNN_FORWARD_KERNEL(c10::BFloat16)
BIRNN_FORWARD_KERNEL(c10::Half)
#undef BIRNN_FORWARD_KERNEL

}  // namespace birnn_fast::cpu
