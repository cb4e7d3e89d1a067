// Probes of what a step of the cluster kernels waits on, for the device check
// (benchmarks/gpu/cuda_check.py): the round trip of a flag through L2 between two CTAs, and the
// round trip of a bulk copy between the two CTAs of a cluster completing on an mbarrier (the exchange
// of forward.cu). Each writes the nanoseconds of `rounds` round trips to *elapsed.
#include <cstdint>

#include "ptx.cuh"

namespace birnn_fast::cuda {

__device__ __forceinline__ uint64_t global_timer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

__device__ __forceinline__ void store_release(int* flag, int value) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(flag), "r"(value) : "memory");
}

__device__ __forceinline__ int load_acquire(const int* flag) {
  int value;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(value) : "l"(flag) : "memory");
  return value;
}

}  // namespace birnn_fast::cuda

using namespace birnn_fast::cuda;

// Two CTAs of one thread; flags[0] and flags[32] (separate lines) start at 0. CTA 0 posts round r on
// flags[0], CTA 1 answers on flags[32].
extern "C" __global__ void birnn_probe_l2_round_trip(int* flags, int rounds, uint64_t* elapsed) {
  int* ping = flags;
  int* pong = flags + 32;
  const uint64_t start = global_timer();
  for (int r = 1; r <= rounds; ++r) {
    if (blockIdx.x == 0) {
      store_release(ping, r);
      while (load_acquire(pong) != r) {
      }
    } else {
      while (load_acquire(ping) != r) {
      }
      store_release(pong, r);
    }
  }
  if (blockIdx.x == 0) *elapsed = global_timer() - start;
}

// A cluster of two CTAs of 32 threads: round r sends 16 bytes from CTA 0 to CTA 1 by a bulk copy
// completing on CTA 1's mbarrier, then back.
extern "C" __global__ void birnn_probe_dsmem_round_trip(int rounds, uint64_t* elapsed) {
  __shared__ __align__(16) uint32_t box[2][4];
  __shared__ __align__(8) uint64_t arrived;
  const uint32_t rank = cluster_ctarank();
  const uint32_t peer = rank ^ 1;
  if (threadIdx.x == 0) {
    mbarrier_init(&arrived, 1);
    fence_mbarrier_init();
    for (int i = 0; i < 4; ++i) box[0][i] = box[1][i] = rank;
    fence_proxy_async();
  }
  cluster_sync();
  const uint64_t start = global_timer();
  if (threadIdx.x == 0) {
    for (int r = 0; r < rounds; ++r) {
      mbarrier_arrive_expect_tx(&arrived, 16);
      if (rank == 0) {
        bulk_copy_to_peer(map_to_rank(smem_address(box[1]), peer), smem_address(box[0]), 16,
                          map_to_rank(smem_address(&arrived), peer));
        mbarrier_wait(&arrived, r & 1);
      } else {
        mbarrier_wait(&arrived, r & 1);
        bulk_copy_to_peer(map_to_rank(smem_address(box[1]), peer), smem_address(box[0]), 16,
                          map_to_rank(smem_address(&arrived), peer));
      }
    }
  }
  cluster_sync();
  if (rank == 0 && threadIdx.x == 0) *elapsed = global_timer() - start;
}
