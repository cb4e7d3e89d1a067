#include "schedule.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <numeric>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace birnn_fast::cpu {

Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor tensor = at::detail::empty_cpu(sizes, options.dtype().toScalarType());
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

Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options, int64_t used) {
  Tensor tensor = empty_cpu(sizes, options);
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

void zero_tail(const Tensor& tensor, int64_t first) {
  const int64_t count = tensor.numel() - first;
  if (count <= 0) {
    return;
  }
  char* data = static_cast<char*>(tensor.data_ptr()) + first * tensor.element_size();
  const size_t bytes = static_cast<size_t>(count) * tensor.element_size();
#ifdef __linux__
  // MADV_DONTNEED makes private anonymous pages read as zeros (shared mappings would refill from
  // their file instead): only the default allocator's memory is known to be private.
  const bool private_memory = tensor.storage().allocator() == c10::GetDefaultCPUAllocator();
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(data), end = begin + bytes;
  const uintptr_t inner_begin = (begin + page - 1) & ~(page - 1), inner_end = end & ~(page - 1);
  constexpr uintptr_t kReleaseFrom = uintptr_t{1} << 20;
  if (private_memory && inner_end > inner_begin && inner_end - inner_begin >= kReleaseFrom &&
      madvise(reinterpret_cast<void*>(inner_begin), inner_end - inner_begin, MADV_DONTNEED) == 0) {
    std::memset(data, 0, inner_begin - begin);
    std::memset(reinterpret_cast<void*>(inner_end), 0, end - inner_end);
    return;
  }
#endif
  std::memset(data, 0, bytes);
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
