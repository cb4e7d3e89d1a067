// The row schedule and the packing of per-token buffers, shared by forward and backward.
//
// Rows are sorted by length, longest first, so the rows still running at a step are a prefix of
// the state buffers and padded steps cost nothing. Per-token buffers are packed as a
// PackedSequence is: the real tokens only, by time, then by sorted row (Schedule::packed).
// State buffers (2, B, width) are kept in sorted row order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace birnn_fast::cpu {

using at::Tensor;

// The kernels' own CPU buffers (scratch, and outputs they write whole), allocated without a trip
// through the dispatcher, which a call would make 20-30 times: part of a small layer's fixed cost.
// Large ones are blocks of the buffer cache (buffers.h), mapped once and reused across calls.
// zeros_cpu zeroes in the calling thread.
Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);
Tensor zeros_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);

// a @ b (2-D) into a buffer of empty_cpu: torch's allocator maps an output that large afresh on
// every call, and its pages fault in again.
inline Tensor mm_cached(const Tensor& a, const Tensor& b) {
  Tensor out = empty_cpu({a.size(0), b.size(1)}, a.options());
  return at::mm_out(out, a, b);
}

// Zeroes elements [first, numel) of a contiguous tensor, in the calling thread.
void zero_tail(const Tensor& tensor, int64_t first);

// Rows by length, longest first: at step s the rows still running are [0, active[s]).
struct Schedule {
  int64_t batch;
  std::vector<int64_t> order;    // sorted position -> caller's row
  std::vector<int64_t> lengths;  // by sorted position
  std::vector<int64_t> active;   // by step, for steps 0 .. longest length - 1
  std::vector<int64_t> offsets;  // by time: packed row of time t's first sorted row
  int64_t tokens = 0;            // real tokens, the packed rows
  bool in_order = true;          // order is the identity (sorting moved no row)

  Schedule(const Tensor& lengths_tensor, int64_t steps);

  // The time step that sorted row j reads at recurrence step `step`.
  int64_t time(int64_t step, int64_t j, int64_t direction) const {
    return direction == 0 ? step : lengths[j] - 1 - step;
  }

  // The packed row of (time t, sorted row j), for t < lengths[j].
  int64_t packed(int64_t t, int64_t j) const { return offsets[t] + j; }

  int64_t longest() const { return static_cast<int64_t>(active.size()); }
};

// (2, B, width) states between the caller's row order and the sorted one (to_sorted: caller -> sorted).
template <typename T>
Tensor reorder_states(const Schedule& schedule, const Tensor& states, bool to_sorted) {
  const int64_t B = schedule.batch, width = states.size(2);
  Tensor result = empty_cpu({2, B, width}, states.options());
  const T* src = states.data_ptr<T>();
  T* dst = result.data_ptr<T>();
  for (int64_t d = 0; d < 2; ++d) {
    for (int64_t j = 0; j < B; ++j) {
      const int64_t sorted = d * B + j, caller = d * B + schedule.order[j];
      std::copy_n(src + (to_sorted ? caller : sorted) * width, width, dst + (to_sorted ? sorted : caller) * width);
    }
  }
  return result;
}

// (T, B, width) rows in the caller's order -> (N, width) packed, real tokens only.
template <typename T>
Tensor pack(const Schedule& schedule, const Tensor& padded) {
  const int64_t width = padded.size(2), B = schedule.batch;
  Tensor packed = empty_cpu({schedule.tokens, width}, padded.options());
  const T* src = padded.data_ptr<T>();
  T* dst = packed.data_ptr<T>();
  at::parallel_for(0, schedule.longest(), 1, [&](int64_t begin, int64_t end) {
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
  Tensor padded = empty_cpu({steps, B, width}, packed.options());
  const T* src = packed.data_ptr<T>();
  T* dst = padded.data_ptr<T>();
  at::parallel_for(0, steps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rows = t < schedule.longest() ? schedule.active[t] : 0;
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

// Zeroes the (T, B, width) rows of `rows` at padded steps t >= lengths[b].
template <typename T>
void zero_padding(const Schedule& schedule, int64_t steps, T* rows, int64_t width) {
  for (int64_t j = 0; j < schedule.batch; ++j) {
    for (int64_t t = schedule.lengths[j]; t < steps; ++t) {
      std::fill_n(rows + (t * schedule.batch + schedule.order[j]) * width, width, T(0));
    }
  }
}

// With two threads or fewer, each direction's thread also does its share of the work around the
// recurrence -- the input projection in forward, the weight, bias and input gradients in backward
// -- a few steps at a time, on small buffers that stay in cache: no (N, 2GH) buffers to allocate
// and fault in on every call, and nothing waits for the other direction. With more threads, one
// multi-threaded GEMM before (forward) or after (backward) the recurrences does that work instead,
// as it does for thread teams (team.h) at any count.
inline bool by_chunks() { return at::get_num_threads() <= 2; }

// Grain of the parallel loop over the two directions: 1 runs them on two threads; 2, for layers
// so small that waking the second thread costs more than a direction's work, in the calling thread.
inline int64_t directions_grain(const Schedule& schedule, int64_t gates_hidden, int64_t inputs, int64_t state) {
  constexpr int64_t kInlineMultiplyAdds = 1 << 16;  // per direction
  return schedule.tokens * gates_hidden * (inputs + state) <= kInlineMultiplyAdds ? 2 : 1;
}

// Steps per chunk: about kChunkRows rows, for GEMMs large enough to run near peak at little memory
// (the backward's chunk buffers are 2 x rows x (I + H + G*H) floats).
inline int64_t steps_per_chunk(const Schedule& schedule) {
  constexpr int64_t kChunkRows = 128;
  const int64_t batch = std::max<int64_t>(schedule.batch, 1);
  return std::clamp<int64_t>((kChunkRows + batch - 1) / batch, 1, std::max<int64_t>(schedule.longest(), 1));
}

// Rows of steps [first, last) in a chunk buffer: by step, then sorted row; returns where each
// step's rows start, and the total at the back.
inline std::vector<int64_t> chunk_starts(const Schedule& schedule, int64_t first, int64_t last) {
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

}  // namespace birnn_fast::cpu
