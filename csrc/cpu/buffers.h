// Where the kernels' large CPU buffers come from: a cache of mappings reused across calls.
//
// A training step allocates and frees the same large buffers every call (output, workspace, the
// gradients, the chunk buffers). glibc maps buffers that large fresh on every call and unmaps them
// when they are freed, so every call faults in every page again, and a product accumulating into
// a zeroed gradient first maps the zero page, then copies it on the first store (two faults a
// page, the second flushing the other cores' TLBs: costly in a VM). Buffers from this cache are
// pages already mapped and written: after the first call, none of our buffers faults.
//
// Bounded: free blocks held at once never exceed the limit (BIRNN_FAST_CPU_CACHE_MB, default a
// quarter of physical memory, at most 2 GiB; 0 turns the cache off); a freed block that would pass
// it is unmapped. Small buffers come from the default CPU allocator as before.
#pragma once

#include <c10/core/Allocator.h>

#include <cstdint>

namespace birnn_fast::cpu {

// The allocator of empty_cpu (schedule.h): thread-safe, and safe across fork (a child inherits the
// free blocks, private copies of the parent's).
c10::Allocator* buffer_allocator();

// Whether memory of `data_ptr` is one of the cache's blocks (private anonymous pages).
bool is_cached_buffer(const c10::DataPtr& data_ptr);

// Unmaps every free block; returns the bytes handed back (torch.ops.birnn_fast_cpu.empty_cache()).
int64_t release_cached_buffers();

// Bytes in free blocks now, and the limit on them.
int64_t cached_buffer_bytes();
int64_t buffer_cache_limit();

}  // namespace birnn_fast::cpu
