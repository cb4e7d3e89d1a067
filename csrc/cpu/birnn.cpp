// CPU kernels of birnn_fast::forward and birnn_fast::backward (contract: birnn_fast/ops.py).
//
// The two recurrences run at once, one per thread, each step one GEMM over the rows still running
// plus the fused cell math (cells.h). Rows are sorted by length, longest first, so the running rows
// are always a prefix of the state buffers and padded steps cost nothing. Backward runs the
// recurrences in reverse time, computing the gate gradients of every step. The GEMMs around the
// recurrences -- input projection, weight and input gradients -- run over the real tokens only:
// on two threads or fewer inside each direction's thread, a chunk of steps at a time
// (ChunkedProjection, ChunkedGradients); with more threads as a few large GEMMs before / after.
// The parameters are used in place; the products with a weight that every step or chunk reuses run
// on a packed copy of it (gemm.h, panel_gemm.h). Layers too small to pay for a second thread run
// both directions in the calling thread (directions_grain).
//
// Layouts. Per-token buffers are packed as a PackedSequence is: the real tokens only, by time, then
// by sorted row (Schedule::packed), both directions of a token in one row. gates_x, dgates:
// (N, 2*G*H), direction d at column d*G*H. workspace: the op's (T, B, 2, W*H) tensor, of which the
// first N*2*W*H elements hold the cell's saved activations of (token, d); the rest is never touched,
// so it costs address space but no memory. State buffers h, c, dh, dc: (2, B, H) in sorted order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <numeric>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cells.h"
#include "gemm.h"

namespace birnn_fast::cpu {
namespace {

using at::Tensor;

// The op's `weights`, nn.LSTM's order: these four of the forward direction, then of the reverse one.
enum Weight : int64_t { kWeightIh = 0, kWeightHh = 1, kBiasIh = 2, kBiasHh = 3 };
constexpr int64_t kWeightsPerDirection = 4;
constexpr const char* kWeightNames[2 * kWeightsPerDirection] = {
    "weights[0] (weight_ih)",         "weights[1] (weight_hh)",         "weights[2] (bias_ih)",
    "weights[3] (bias_hh)",           "weights[4] (weight_ih_reverse)", "weights[5] (weight_hh_reverse)",
    "weights[6] (bias_ih_reverse)",   "weights[7] (bias_hh_reverse)"};

// Direction d's parameter (or its gradient) of one kind.
template <typename T>
T* weight_of(at::TensorList weights, int64_t d, Weight kind) {
  return weights[d * kWeightsPerDirection + kind].data_ptr<T>();
}

// Both directions' parameters of one kind as one (2 * rows, ...) tensor, for the multi-threaded GEMMs.
Tensor both_directions(at::TensorList weights, Weight kind) {
  return at::cat({weights[kind], weights[kWeightsPerDirection + kind]});
}

// A buffer written once per call. glibc serves blocks up to 32 MiB from memory it keeps after they
// are freed, but maps larger ones fresh on every call, so that each of their 4 KiB pages faults on
// first touch: for the tagging batch's 84 MB workspace that cost ~38 ms per forward on the
// development VM (forward 151 ms saving it, 112 ms not). Such buffers are backed by 2 MiB pages where
// the kernel allows it (transparent huge pages in "madvise" mode): one fault per 2 MiB. Only whole
// 2 MiB pages inside the first `used` elements (all by default) are advised: the rest stays unbacked.
Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options, int64_t used = -1) {
  Tensor tensor = at::empty(sizes, options);
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto start = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t used_bytes = used < 0 ? tensor.nbytes() : used * tensor.element_size();
  const uintptr_t end = (start + used_bytes) & ~(kHugePage - 1);
  constexpr uintptr_t kAlwaysMapped = uintptr_t{32} << 20;  // glibc's largest dynamic mmap threshold
  if (used_bytes >= kAlwaysMapped && end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only: failure is harmless
  }
#endif
  return tensor;
}

// Rows by length, longest first: at step s the rows still running are [0, active[s]).
struct Schedule {
  int64_t batch;
  std::vector<int64_t> order;    // sorted position -> caller's row
  std::vector<int64_t> lengths;  // by sorted position
  std::vector<int64_t> active;   // by step, for steps 0 .. longest length - 1
  std::vector<int64_t> offsets;  // by time: packed row of time t's first sorted row
  int64_t tokens = 0;            // real tokens, the packed rows

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
    // The rows valid at time t are the rows still running at step t, in both directions.
    offsets.assign(longest, 0);
    for (int64_t t = 0; t < longest; ++t) {
      offsets[t] = tokens;
      tokens += active[t];
    }
  }

  // The time step that sorted row j reads at recurrence step `step`.
  int64_t time(int64_t step, int64_t j, int64_t direction) const {
    return direction == 0 ? step : lengths[j] - 1 - step;
  }

  // The packed row of (time t, sorted row j), for t < lengths[j].
  int64_t packed(int64_t t, int64_t j) const { return offsets[t] + j; }

};

// (2, B, H) states between the caller's row order and the sorted one (to_sorted: caller -> sorted).
template <typename T>
Tensor reorder_states(const Schedule& schedule, const Tensor& states, bool to_sorted) {
  const int64_t B = schedule.batch, H = states.size(2);
  Tensor result = at::empty({2, B, H}, states.options());
  const T* src = states.data_ptr<T>();
  T* dst = result.data_ptr<T>();
  for (int64_t d = 0; d < 2; ++d) {
    for (int64_t j = 0; j < B; ++j) {
      const int64_t sorted = d * B + j, caller = d * B + schedule.order[j];
      std::copy_n(src + (to_sorted ? caller : sorted) * H, H, dst + (to_sorted ? sorted : caller) * H);
    }
  }
  return result;
}

// (T, B, width) rows in the caller's order -> (N, width) packed, real tokens only.
template <typename T>
Tensor pack(const Schedule& schedule, const Tensor& padded) {
  const int64_t width = padded.size(2), B = schedule.batch;
  Tensor packed = at::empty({schedule.tokens, width}, padded.options());
  const T* src = padded.data_ptr<T>();
  T* dst = packed.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(schedule.active.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < schedule.active[t]; ++j) {
        std::copy_n(src + (t * B + schedule.order[j]) * width, width, dst + schedule.packed(t, j) * width);
      }
    }
  });
  return packed;
}

// (N, width) packed -> (T, B, width) in the caller's order, zeros at padded steps.
template <typename T>
Tensor unpack(const Schedule& schedule, const Tensor& packed, int64_t steps) {
  const int64_t width = packed.size(1), B = schedule.batch;
  Tensor padded = at::empty({steps, B, width}, packed.options());
  const T* src = packed.data_ptr<T>();
  T* dst = padded.data_ptr<T>();
  at::parallel_for(0, steps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rows = t < static_cast<int64_t>(schedule.active.size()) ? schedule.active[t] : 0;
      for (int64_t j = 0; j < B; ++j) {
        T* row = dst + (t * B + schedule.order[j]) * width;
        if (j < rows) {
          std::copy_n(src + schedule.packed(t, j) * width, width, row);
        } else {
          std::fill_n(row, width, T(0));
        }
      }
    }
  });
  return padded;
}

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
  const T* gates_x;       // (N, 2GH) packed, when projected up front
  const T* step_gates_x;  // (B, GH) this step's, sorted rows, when projected by chunks
  T* gates_h;             // (B, GH): this step's h_prev @ W_hh^T, sorted rows
  const T* bias_hh;       // (GH)
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
      const int64_t t = schedule.time(a.step, j, a.direction);
      const int64_t row = t * B + schedule.order[j], token = schedule.packed(t, j);
      const T* gx = a.step_gates_x != nullptr ? a.step_gates_x + j * GH : a.gates_x + token * 2 * GH + a.direction * GH;
      Cell::template forward<kSave>(H, gx, a.gates_h + j * GH,
                                    a.bias_hh, a.h + j * H, Cell::kHasCellState ? a.c + j * H : nullptr,
                                    kSave ? a.workspace + (token * 2 + a.direction) * WH : nullptr,
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
  T* dgates_x;  // (N, 2GH) packed, when the gradients are computed after the loop
  T* dgates_h;  // (N, 2GH) packed, written only if the cell splits its gate gradients
  T* chunk_dgates_x;  // (B, GH) this step's rows in ChunkedGradients::dgates_x, when by chunks
  T* chunk_dgates_h;  // (B, GH) same in ChunkedGradients::dgates_h
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
      const int64_t row = t * B + b, token = schedule.packed(t, j);
      // The previous step's state: h0/c0 at a row's first step, else what that step stored.
      const int64_t prev_t = d == 0 ? t - 1 : t + 1;
      const bool first = a.step == 0;
      const T* h_prev = first ? a.h0 + b * H : a.output + (prev_t * B + b) * 2 * H + d * H;
      const T* c_prev = nullptr;
      if constexpr (Cell::kHasCellState) {
        c_prev = first ? a.c0 + b * H
                       : a.workspace + (schedule.packed(prev_t, j) * 2 + d) * WH + Cell::kCellStateSlot * H;
      }
      T* step_dgh = a.step_dgates_h + j * GH;
      Cell::backward(H, a.workspace + (token * 2 + d) * WH, h_prev, c_prev, a.output + row * 2 * H + d * H,
                     a.grad_output + row * 2 * H + d * H, a.dh + j * H, Cell::kHasCellState ? a.dc + j * H : nullptr,
                     a.chunk_dgates_x != nullptr ? a.chunk_dgates_x + j * GH : a.dgates_x + token * 2 * GH + d * GH,
                     step_dgh);
      if constexpr (Cell::kSplitGateGrad) {
        T* dgh = a.chunk_dgates_h != nullptr ? a.chunk_dgates_h + j * GH : a.dgates_h + token * 2 * GH + d * GH;
        std::memcpy(dgh, step_dgh, GH * sizeof(T));
      }
    }
  }
};

// With two threads or fewer, each direction's thread also does its share of the work around the
// recurrence -- the input projection in forward, the weight, bias and input gradients in backward
// -- a few steps at a time, on small buffers that stay in cache: no (N, 2GH) buffers to allocate
// and fault in on every call, and nothing waits for the other direction. With more threads, one
// multi-threaded GEMM before (forward) or after (backward) the recurrences does that work instead.
bool by_chunks() { return at::get_num_threads() <= 2; }

// Grain of the parallel loop over the two directions: 1 runs them on two threads; 2, for layers
// so small that waking the second thread costs more than a direction's work, in the calling thread.
// (Tiny tagger, T=4, B=1, I=16, H=32, 2 threads: forward 28 -> 21 us, backward 54 -> 37 us.)
int64_t directions_grain(const Schedule& schedule, int64_t gates_hidden, int64_t inputs, int64_t hidden) {
  constexpr int64_t kInlineMultiplyAdds = 1 << 16;  // per direction
  return schedule.tokens * gates_hidden * (inputs + hidden) <= kInlineMultiplyAdds ? 2 : 1;
}

// Steps per chunk: about kChunkRows rows, for GEMMs large enough to run near peak. 64, 128 and 256
// rows ran at the same speed on the sentiment and tagging batches; fewer rows hold less memory (the
// backward's chunk buffers are 2 x rows x (I + H + G*H) floats, 3 MiB at 256 rows for the sentiment
// LSTM; GRU adds another G*H).
int64_t steps_per_chunk(const Schedule& schedule) {
  constexpr int64_t kChunkRows = 128;
  const int64_t longest = static_cast<int64_t>(schedule.active.size());
  return std::clamp<int64_t>((kChunkRows + schedule.batch - 1) / schedule.batch, 1, std::max<int64_t>(longest, 1));
}

// Rows of steps [first, last) in a chunk buffer: by step, then sorted row; returns where each
// step's rows start, and the total at the back.
std::vector<int64_t> chunk_starts(const Schedule& schedule, int64_t first, int64_t last) {
  std::vector<int64_t> starts(last - first + 1, 0);
  for (int64_t step = first; step < last; ++step) {
    starts[step - first + 1] = starts[step - first] + schedule.active[step];
  }
  return starts;
}

// Copies the input rows that direction d reads at steps [first, last) into chunk rows `starts`.
template <typename T>
void gather_chunk_inputs(const Schedule& schedule, int64_t d, int64_t first, int64_t last,
                         const std::vector<int64_t>& starts, const T* input, int64_t inputs, T* x) {
  for (int64_t step = first; step < last; ++step) {
    for (int64_t j = 0; j < schedule.active[step]; ++j) {
      const int64_t row = schedule.time(step, j, d) * schedule.batch + schedule.order[j];
      std::copy_n(input + row * inputs, inputs, x + (starts[step - first] + j) * inputs);
    }
  }
}

template <typename T>
struct ChunkedProjection {
  const T* input;                    // (T, B, I)
  const ReusedWeight<T>* weight_ih;  // x @ W_ih^T, this direction's
  const T* bias_ih;                  // (GH), this direction's
  int64_t inputs, steps_per_chunk;
  T* x;   // (steps_per_chunk * B, I): the chunk's input rows, by step then sorted row
  T* gx;  // (steps_per_chunk * B, GH): their projections
};

template <typename Cell, typename T, bool kSave>
void forward_direction(ForwardArgs<T> args, const ReusedWeight<T>& weight_hh, const ChunkedProjection<T>* projection) {
  const Schedule& schedule = *args.schedule;
  const int64_t H = args.hidden, GH = Cell::kGates * H, d = args.direction;
  const int64_t longest = static_cast<int64_t>(schedule.active.size());
  const int64_t chunk = projection != nullptr ? projection->steps_per_chunk : longest;
  for (int64_t first = 0; first < longest; first += chunk) {
    const int64_t last = std::min(longest, first + chunk);
    const std::vector<int64_t> starts = chunk_starts(schedule, first, last);
    if (projection != nullptr) {
      const int64_t I = projection->inputs;
      gather_chunk_inputs(schedule, d, first, last, starts, projection->input, I, projection->x);
      projection->weight_ih->multiply(starts.back(), projection->x, I, projection->gx, GH, /*accumulate=*/false,
                                      projection->bias_ih);
    }
    for (int64_t step = first; step < last; ++step) {
      args.step = step;
      if (projection != nullptr) {
        args.step_gates_x = projection->gx + starts[step - first] * GH;
      }
      weight_hh.multiply(schedule.active[step], args.h, H, args.gates_h, GH, /*accumulate=*/false);
      run_rows<ForwardRows<Cell, T, kSave>>(args);
    }
  }
}

template <typename T>
struct ChunkedGradients {
  const T* input;      // (T, B, I)
  const T* weight_ih;  // (GH, I), this direction's
  int64_t inputs, steps_per_chunk;
  T* x;               // (rows, I): the chunk's input rows, then their input gradients
  T* h_prev;          // (rows, H): the states the chunk's steps started from
  T* dgates_x;        // (rows, GH)
  T* dgates_h;        // (rows, GH), if the cell splits its gate gradients
  T* grad_input;      // (T, B, I), zeroed, accumulated by both directions under grad_input_locks
  std::mutex* grad_input_locks;  // by time step
  T* grad_weight_ih;  // (GH, I), accumulated
  T* grad_weight_hh;  // (GH, H), accumulated
  T* grad_bias_ih;    // (GH), accumulated
  T* grad_bias_hh;    // (GH), accumulated
};

// Adds the gradients of steps [first, last), whose gate gradients are in the chunk buffers.
template <typename Cell, typename T>
void chunk_gradients(const BackwardArgs<T>& args, const ChunkedGradients<T>& g, int64_t first, int64_t last,
                     const std::vector<int64_t>& starts) {
  const Schedule& schedule = *args.schedule;
  const int64_t H = args.hidden, GH = Cell::kGates * H, I = g.inputs, B = schedule.batch, d = args.direction;
  const int64_t rows = starts.back();
  const T* dgates_h = Cell::kSplitGateGrad ? g.dgates_h : g.dgates_x;
  gather_chunk_inputs(schedule, d, first, last, starts, g.input, I, g.x);
  for (int64_t step = first; step < last; ++step) {
    for (int64_t j = 0; j < schedule.active[step]; ++j) {
      const int64_t r = starts[step - first] + j, t = schedule.time(step, j, d), b = schedule.order[j];
      const T* h_prev = step == 0 ? args.h0 + b * H : args.output + ((d == 0 ? t - 1 : t + 1) * B + b) * 2 * H + d * H;
      std::copy_n(h_prev, H, g.h_prev + r * H);
    }
  }
  gemm_tn_accumulate<T>(GH, I, rows, g.dgates_x, GH, g.x, I, g.grad_weight_ih, I);
  gemm_tn_accumulate<T>(GH, H, rows, dgates_h, GH, g.h_prev, H, g.grad_weight_hh, H);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < GH; ++k) {
      g.grad_bias_ih[k] += g.dgates_x[r * GH + k];
      g.grad_bias_hh[k] += dgates_h[r * GH + k];
    }
  }
  // MKL with W_ih in place rather than a packed copy: the copy held as much memory as W_ih's
  // gradient, for no measurable speed (sentiment backward 53.3 ms with it, 53.0 without).
  gemm<T>(rows, I, GH, g.dgates_x, GH, g.weight_ih, I, /*transpose_b=*/false, g.x, I, /*accumulate=*/false);
  for (int64_t step = first; step < last; ++step) {
    for (int64_t j = 0; j < schedule.active[step]; ++j) {
      const int64_t r = starts[step - first] + j, t = schedule.time(step, j, d);
      const T* contribution = g.x + r * I;
      T* grad_input = g.grad_input + (t * B + schedule.order[j]) * I;
      const std::lock_guard<std::mutex> lock(g.grad_input_locks[t]);
      for (int64_t i = 0; i < I; ++i) {
        grad_input[i] += contribution[i];
      }
    }
  }
}

template <typename Cell, typename T>
void backward_direction(BackwardArgs<T> args, const ReusedWeight<T>& weight_hh, const ChunkedGradients<T>* chunked) {
  const int64_t H = args.hidden, GH = Cell::kGates * H;
  const Schedule& schedule = *args.schedule;
  const int64_t longest = static_cast<int64_t>(schedule.active.size());
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
      run_rows<BackwardRows<Cell, T>>(args);
      weight_hh.multiply(schedule.active[step], args.step_dgates_h, GH, args.dh, H,
                         /*accumulate=*/Cell::kDirectHiddenGrad);
    }
    if (chunked != nullptr) {
      chunk_gradients<Cell, T>(args, *chunked, first, last, starts);
    }
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
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(const Tensor& input, at::TensorList weights, const Tensor& h0,
                                                        const Tensor& c0, const Tensor& lengths, bool save_workspace) {
  const int64_t steps = input.size(0), B = input.size(1), I = input.size(2), H = weights[kWeightHh].size(1);
  const int64_t GH = Cell::kGates * H;
  const Schedule schedule(lengths, steps);

  const bool chunked = by_chunks();
  const int64_t chunk_steps = steps_per_chunk(schedule);
  Tensor gates_x, chunk_x, chunk_gx;
  if (chunked) {
    chunk_x = at::empty({2, chunk_steps * B, I}, input.options());
    chunk_gx = at::empty({2, chunk_steps * B, GH}, input.options());
  } else {
    gates_x = at::addmm(both_directions(weights, kBiasIh), pack<T>(schedule, input),
                        both_directions(weights, kWeightIh).t());
  }
  Tensor output = empty_large({steps, B, 2 * H}, input.options());
  Tensor workspace = save_workspace ? empty_large({steps, B, 2, Cell::kSaved * H}, input.options(),
                                                  /*used=*/schedule.tokens * 2 * Cell::kSaved * H)
                                    : at::empty({0}, input.options());
  Tensor h = reorder_states<T>(schedule, h0, /*to_sorted=*/true);
  Tensor c = Cell::kHasCellState ? reorder_states<T>(schedule, c0, /*to_sorted=*/true) : Tensor();
  Tensor gates_h = at::empty({2, B, GH}, input.options());

  at::parallel_for(0, 2, directions_grain(schedule, GH, I, H), [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      const ForwardArgs<T> args{&schedule,
                                d,
                                /*step=*/0,
                                H,
                                chunked ? nullptr : gates_x.data_ptr<T>(),
                                /*step_gates_x=*/nullptr,
                                gates_h.data_ptr<T>() + d * B * GH,
                                weight_of<T>(weights, d, kBiasHh),
                                h.data_ptr<T>() + d * B * H,
                                Cell::kHasCellState ? c.data_ptr<T>() + d * B * H : nullptr,
                                workspace.data_ptr<T>(),
                                output.data_ptr<T>()};
      std::optional<ReusedWeight<T>> weight_ih;
      ChunkedProjection<T> projection{};
      if (chunked) {
        weight_ih.emplace(I, GH, weight_of<T>(weights, d, kWeightIh), I, /*transpose_b=*/true);
        projection = {input.data_ptr<T>(), &*weight_ih, weight_of<T>(weights, d, kBiasIh),
                      I, chunk_steps, chunk_x.data_ptr<T>() + d * chunk_steps * B * I,
                      chunk_gx.data_ptr<T>() + d * chunk_steps * B * GH};
      }
      const ReusedWeight<T> weight_hh(H, GH, weight_of<T>(weights, d, kWeightHh), H, /*transpose_b=*/true);
      auto run = save_workspace ? forward_direction<Cell, T, true> : forward_direction<Cell, T, false>;
      run(args, weight_hh, chunked ? &projection : nullptr);
    }
  });
  zero_padding(schedule, steps, output.data_ptr<T>(), 2 * H);

  Tensor h_n = reorder_states<T>(schedule, h, /*to_sorted=*/false);
  Tensor c_n = Cell::kHasCellState ? reorder_states<T>(schedule, c, /*to_sorted=*/false) : at::empty({0}, input.options());
  return {output, h_n, c_n, workspace};
}

// (N, 2H) packed: the state each token's step started from, per direction: h0 at a row's first
// step, else the output of the step before it (time t - 1 forward, t + 1 in reverse).
template <typename T>
Tensor previous_states(const Schedule& schedule, const Tensor& output, const Tensor& h0) {
  const int64_t B = schedule.batch, H = h0.size(2);
  Tensor h_prev = at::empty({schedule.tokens, 2 * H}, output.options());
  const T* out = output.data_ptr<T>();
  const T* initial = h0.data_ptr<T>();
  T* dst = h_prev.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(schedule.active.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < schedule.active[t]; ++j) {
        const int64_t b = schedule.order[j];
        T* row = dst + schedule.packed(t, j) * 2 * H;
        std::copy_n(t == 0 ? initial + b * H : out + ((t - 1) * B + b) * 2 * H, H, row);
        std::copy_n(t == schedule.lengths[j] - 1 ? initial + (B + b) * H : out + ((t + 1) * B + b) * 2 * H + H, H,
                    row + H);
      }
    }
  });
  return h_prev;
}

template <typename Cell, typename T>
std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> backward_impl(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input,
    at::TensorList weights, const Tensor& h0, const Tensor& c0, const Tensor& lengths, const Tensor& output,
    const Tensor& workspace) {
  const int64_t steps = input.size(0), B = input.size(1), I = input.size(2), H = weights[kWeightHh].size(1);
  const int64_t GH = Cell::kGates * H;
  const Schedule schedule(lengths, steps);

  Tensor dh = reorder_states<T>(schedule, grad_h_n, /*to_sorted=*/true);
  Tensor dc = Cell::kHasCellState ? reorder_states<T>(schedule, grad_c_n, /*to_sorted=*/true) : Tensor();
  Tensor step_dgates_h = at::empty({2, B, GH}, input.options());
  const bool chunked = by_chunks();
  const int64_t chunk_steps = steps_per_chunk(schedule), chunk_rows = chunk_steps * B;
  Tensor dgates_x, dgates_h, grad_input;
  std::vector<Tensor> grad_weights(weights.size());  // in the order of weights
  Tensor chunk_x, chunk_h_prev, chunk_dgates_x, chunk_dgates_h;
  std::vector<std::mutex> grad_input_locks(chunked ? steps : 0);
  if (chunked) {
    chunk_x = at::empty({2, chunk_rows, I}, input.options());
    chunk_h_prev = at::empty({2, chunk_rows, H}, input.options());
    chunk_dgates_x = at::empty({2, chunk_rows, GH}, input.options());
    chunk_dgates_h = Cell::kSplitGateGrad ? at::empty_like(chunk_dgates_x) : chunk_dgates_x;
    grad_input = empty_large(input.sizes(), input.options()).zero_();
    for (size_t k = 0; k < weights.size(); ++k) {
      grad_weights[k] = at::zeros_like(weights[k]);
    }
  } else {
    dgates_x = at::empty({schedule.tokens, 2 * GH}, input.options());
    dgates_h = Cell::kSplitGateGrad ? at::empty_like(dgates_x) : dgates_x;
  }

  at::parallel_for(0, 2, directions_grain(schedule, GH, I, H), [&](int64_t begin, int64_t end) {
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
                                 chunked ? nullptr : dgates_x.data_ptr<T>(),
                                 chunked ? nullptr : dgates_h.data_ptr<T>(),
                                 /*chunk_dgates_x=*/nullptr,
                                 /*chunk_dgates_h=*/nullptr,
                                 step_dgates_h.data_ptr<T>() + d * B * GH};
      ChunkedGradients<T> gradients{};
      if (chunked) {
        gradients = {input.data_ptr<T>(),
                     weight_of<T>(weights, d, kWeightIh),
                     I,
                     chunk_steps,
                     chunk_x.data_ptr<T>() + d * chunk_rows * I,
                     chunk_h_prev.data_ptr<T>() + d * chunk_rows * H,
                     chunk_dgates_x.data_ptr<T>() + d * chunk_rows * GH,
                     chunk_dgates_h.data_ptr<T>() + d * chunk_rows * GH,
                     grad_input.data_ptr<T>(),
                     grad_input_locks.data(),
                     weight_of<T>(grad_weights, d, kWeightIh),
                     weight_of<T>(grad_weights, d, kWeightHh),
                     weight_of<T>(grad_weights, d, kBiasIh),
                     weight_of<T>(grad_weights, d, kBiasHh)};
      }
      const ReusedWeight<T> weight_hh(GH, H, weight_of<T>(weights, d, kWeightHh), H, /*transpose_b=*/false);
      backward_direction<Cell, T>(args, weight_hh, chunked ? &gradients : nullptr);
    }
  });

  Tensor grad_h0 = reorder_states<T>(schedule, dh, /*to_sorted=*/false);
  Tensor grad_c0 =
      Cell::kHasCellState ? reorder_states<T>(schedule, dc, /*to_sorted=*/false) : at::empty({0}, input.options());
  if (chunked) {
    return {grad_input, grad_weights, grad_h0, grad_c0};
  }

  grad_input = unpack<T>(schedule, at::mm(dgates_x, both_directions(weights, kWeightIh)), steps);
  const Tensor grad_weight_ih = at::mm(dgates_x.t(), pack<T>(schedule, input));  // (2GH, I)
  const Tensor grad_bias_ih = dgates_x.sum(0), grad_bias_hh = dgates_h.sum(0);
  const Tensor h_prev = previous_states<T>(schedule, output, h0);
  for (int64_t d = 0; d < 2; ++d) {
    const int64_t k = d * kWeightsPerDirection;
    grad_weights[k + kWeightIh] = grad_weight_ih.narrow(0, d * GH, GH);
    grad_weights[k + kWeightHh] = at::mm(dgates_h.narrow(1, d * GH, GH).t(), h_prev.narrow(1, d * H, H));
    grad_weights[k + kBiasIh] = grad_bias_ih.narrow(0, d * GH, GH);
    grad_weights[k + kBiasHh] = grad_bias_hh.narrow(0, d * GH, GH);
  }
  return {grad_input, grad_weights, grad_h0, grad_c0};
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
void check_common(std::string_view cell, const Tensor& input, at::TensorList weights, const Tensor& h0,
                  const Tensor& c0, const Tensor& lengths) {
  TORCH_CHECK(input.dim() == 3, "birnn_fast: expected input of shape (T, B, I), got ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "birnn_fast: the CPU kernels take float32 or float64 input, got ", input.scalar_type());
  TORCH_CHECK(weights.size() == 2 * kWeightsPerDirection,
              "birnn_fast: expected the layer's 8 weights (weight_ih, weight_hh, bias_ih, bias_hh of each "
              "direction), got ", weights.size());
  TORCH_CHECK(weights[kWeightHh].dim() == 2, "birnn_fast: expected ", kWeightNames[kWeightHh],
              " of shape (G*H, H), got ", weights[kWeightHh].sizes());
  const int64_t B = input.size(1), I = input.size(2), H = weights[kWeightHh].size(1), GH = gates_of(cell) * H;
  check_tensor(input, "input", input.sizes(), input);
  for (int64_t d = 0; d < 2; ++d) {
    const int64_t k = d * kWeightsPerDirection;
    check_tensor(weights[k + kWeightIh], kWeightNames[k + kWeightIh], {GH, I}, input);
    check_tensor(weights[k + kWeightHh], kWeightNames[k + kWeightHh], {GH, H}, input);
    check_tensor(weights[k + kBiasIh], kWeightNames[k + kBiasIh], {GH}, input);
    check_tensor(weights[k + kBiasHh], kWeightNames[k + kBiasHh], {GH}, input);
  }
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
                                                       at::TensorList weights, const Tensor& h0, const Tensor& c0,
                                                       const Tensor& lengths, bool save_workspace) {
  const std::string_view cell_name(cell.data(), cell.size());
  check_common(cell_name, input, weights, h0, c0, lengths);
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "birnn_fast::forward", [&] {
    return dispatch_cell(cell_name, [&](auto cell_type) {
      return forward_impl<decltype(cell_type), scalar_t>(input, weights, h0, c0, lengths, save_workspace);
    });
  });
}

std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> backward_cpu(
    c10::string_view cell, const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, at::TensorList weights, const Tensor& h0, const Tensor& c0, const Tensor& lengths,
    const Tensor& output, const Tensor& workspace) {
  const std::string_view cell_name(cell.data(), cell.size());
  check_common(cell_name, input, weights, h0, c0, lengths);
  const int64_t steps = input.size(0), B = input.size(1), H = weights[kWeightHh].size(1);
  const int64_t saved = dispatch_cell(cell_name, [](auto c) -> int64_t { return decltype(c)::kSaved; });
  check_tensor(grad_output, "grad_output", {steps, B, 2 * H}, input);
  check_tensor(grad_h_n, "grad_h_n", h0.sizes(), input);
  check_tensor(grad_c_n, "grad_c_n", c0.sizes(), input);
  check_tensor(output, "output", {steps, B, 2 * H}, input);
  check_tensor(workspace, "workspace", {steps, B, 2, saved * H}, input);
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "birnn_fast::backward", [&] {
    return dispatch_cell(cell_name, [&](auto cell_type) {
      return backward_impl<decltype(cell_type), scalar_t>(grad_output, grad_h_n, grad_c_n, input, weights, h0, c0,
                                                          lengths, output, workspace);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_fast, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace birnn_fast::cpu
