#include "schedule.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>

#include <cstring>
#include <numeric>

#include "buffers.h"

namespace birnn_fast::cpu {

Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor tensor = at::detail::empty_generic(sizes, buffer_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                            options.dtype().toScalarType(), std::nullopt);
  // What at::empty does under torch.utils.deterministic.fill_uninitialized_memory (NaN for floating
  // types): the tests run with it, so that an element a kernel reads before writing fails them.
  const at::Context& context = at::globalContext();
  if (C10_UNLIKELY(context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory())) {
    at::native::fill_empty_deterministic_(tensor);
  }
  return tensor;
}

Tensor zeros_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor tensor = empty_cpu(sizes, options);
  zero_tail(tensor, 0);
  return tensor;
}

void zero_tail(const Tensor& tensor, int64_t first) {
  const int64_t count = tensor.numel() - first;
  if (count > 0) {
    std::memset(static_cast<char*>(tensor.data_ptr()) + first * tensor.element_size(), 0,
                static_cast<size_t>(count) * tensor.element_size());
  }
}

Schedule::Schedule(const Tensor& lengths_tensor, int64_t steps) : batch(lengths_tensor.size(0)) {
  const int64_t* caller_lengths = lengths_tensor.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(caller_lengths[b] >= 1 && caller_lengths[b] <= steps, "birnn_fast: lengths[", b,
                "] must be in [1, ", steps, "] (the input's T), got ", caller_lengths[b]);
  }
  order.resize(batch);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return caller_lengths[a] > caller_lengths[b]; });
  lengths.resize(batch);
  for (int64_t j = 0; j < batch; ++j) {
    lengths[j] = caller_lengths[order[j]];
    in_order = in_order && order[j] == j;
  }
  const int64_t steps_run = batch > 0 ? lengths[0] : 0;
  active.assign(steps_run, 0);
  for (int64_t step = 0, rows = batch; step < steps_run; ++step) {
    while (lengths[rows - 1] <= step) {
      --rows;
    }
    active[step] = rows;
  }
  // The rows valid at time t are the rows still running at step t, in both directions.
  offsets.assign(steps_run, 0);
  for (int64_t t = 0; t < steps_run; ++t) {
    offsets[t] = tokens;
    tokens += active[t];
  }
}

}  // namespace birnn_fast::cpu
