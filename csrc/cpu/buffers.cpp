#include "buffers.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace birnn_fast::cpu {
namespace {

// Smaller buffers come from glibc's heap, which keeps them mapped between calls.
constexpr size_t kCachedFrom = size_t{256} << 10;
constexpr size_t kSmallGrain = size_t{64} << 10;
// Blocks of at least a huge page are aligned to one and advised as huge pages (the kernel's
// transparent huge pages are usually "madvise"): a fault, the first time, maps 2 MiB at once.
constexpr size_t kHugePage = size_t{2} << 20;
// A free block serves a request of at least 3/4 of its size: a padded batch's buffers change size
// with its longest row, and a block much larger than the request would hold memory for nothing.
constexpr size_t kMaxWasteDivisor = 4;

struct Block {
  void* data;
  size_t size;
};

size_t rounded(size_t bytes) {
  const size_t grain = bytes >= kHugePage ? kHugePage : kSmallGrain;
  return (bytes + grain - 1) / grain * grain;
}

int64_t default_limit() {
  if (const char* text = std::getenv("BIRNN_FAST_CPU_CACHE_MB")) {
    char* end = nullptr;
    const long long megabytes = std::strtoll(text, &end, 10);
    TORCH_CHECK(end != text && *end == '\0' && megabytes >= 0,
                "birnn_fast: BIRNN_FAST_CPU_CACHE_MB must be a whole number of megabytes >= 0, got '", text, "'");
    return static_cast<int64_t>(megabytes) << 20;
  }
  int64_t physical = int64_t{8} << 30;
#ifdef __linux__
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) {
    physical = static_cast<int64_t>(pages) * page;
  }
#endif
  return std::min<int64_t>(physical / 4, int64_t{2} << 30);
}

#ifdef __linux__
void* map_block(size_t size) {
  if (size < kHugePage) {
    void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return data == MAP_FAILED ? nullptr : data;
  }
  // Over-map by a huge page, keep the aligned part.
  const size_t mapped = size + kHugePage;
  void* raw = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    return nullptr;
  }
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(uintptr_t{kHugePage} - 1);
  if (aligned > start) {
    munmap(raw, aligned - start);
  }
  const uintptr_t end = start + mapped, aligned_end = aligned + size;
  if (end > aligned_end) {
    munmap(reinterpret_cast<void*>(aligned_end), end - aligned_end);
  }
  madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);  // advice only: failure is harmless
  return reinterpret_cast<void*>(aligned);
}

void unmap_block(const Block& block) { munmap(block.data, block.size); }
#endif

class BufferCache final : public c10::Allocator {
 public:
  BufferCache() : limit_(default_limit()) {
#ifdef __linux__
    // A fork while another thread holds the lock would leave the child's copy locked for ever.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
#endif
  }

  static BufferCache& instance();

  c10::DataPtr allocate(size_t bytes) override {
#ifdef __linux__
    if (bytes >= kCachedFrom) {
      const size_t size = rounded(bytes);
      if (Block* block = take(size)) {
        return {block->data, block, &release, c10::Device(c10::DeviceType::CPU)};
      }
      void* data = map_block(size);
      TORCH_CHECK(data != nullptr, "birnn_fast: could not allocate ", bytes, " bytes of CPU memory");
      return {data, new Block{data, size}, &release, c10::Device(c10::DeviceType::CPU)};
    }
#endif
    return c10::GetDefaultCPUAllocator()->allocate(bytes);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    instance().give_back(block);
  }

  int64_t release_all() {
    std::vector<Block*> blocks;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    int64_t bytes = 0;
    for (Block* block : blocks) {
      bytes += static_cast<int64_t>(block->size);
      destroy(block);
    }
    return bytes;
  }

  int64_t cached() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  int64_t limit() const { return limit_; }

 private:
  // The smallest free block that serves `size`, removed from the free list; null if none does.
  Block* take(size_t size) {
    const std::lock_guard<std::mutex> lock(mutex_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      const size_t candidate = (*it)->size;
      if (candidate >= size && candidate - size <= candidate / kMaxWasteDivisor &&
          (best == free_.end() || candidate < (*best)->size)) {
        best = it;
      }
    }
    if (best == free_.end()) {
      return nullptr;
    }
    Block* block = *best;
    free_.erase(best);
    cached_ -= static_cast<int64_t>(block->size);
    return block;
  }

  // Free blocks are kept oldest first; the oldest go when the newly freed one passes the limit.
  void give_back(Block* block) {
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (static_cast<int64_t>(block->size) > limit_) {
        evicted.push_back(block);
      } else {
        free_.push_back(block);
        cached_ += static_cast<int64_t>(block->size);
        size_t oldest = 0;
        while (cached_ > limit_) {
          cached_ -= static_cast<int64_t>(free_[oldest]->size);
          evicted.push_back(free_[oldest++]);
        }
        free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(oldest));
      }
    }
    for (Block* old : evicted) {
      destroy(old);
    }
  }

  static void destroy(Block* block) {
#ifdef __linux__
    unmap_block(*block);
#endif
    delete block;
  }

  std::mutex mutex_;
  std::vector<Block*> free_;
  int64_t cached_ = 0;
  const int64_t limit_;
};

BufferCache& BufferCache::instance() {
  // Never destroyed: tensors holding its blocks may be freed after this library's static destructors.
  static BufferCache* cache = new BufferCache();
  return *cache;
}

}  // namespace

c10::Allocator* buffer_allocator() { return &BufferCache::instance(); }

bool is_cached_buffer(const c10::DataPtr& data_ptr) { return data_ptr.get_deleter() == &BufferCache::release; }

int64_t release_cached_buffers() { return BufferCache::instance().release_all(); }

int64_t cached_buffer_bytes() { return BufferCache::instance().cached(); }

int64_t buffer_cache_limit() { return BufferCache::instance().limit(); }

}  // namespace birnn_fast::cpu
