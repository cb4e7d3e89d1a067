// The PTX the cluster kernels use, one wrapper each: the MMA, ldmatrix, cluster ids and barriers,
// mbarriers with transaction counts, and the bulk copy into a peer CTA's shared memory (sm_90).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace birnn_fast::cuda {

__device__ __forceinline__ uint32_t smem_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

template <typename T>
struct Mma;

// d += a * b, m16n8k16, fp32 accumulators; a: 4 registers of 2 elements, b: 2 registers.
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// d += a * b, m16n8k8 of TF32 (fp32 registers whose low 13 bits the MMA ignores), fp32 accumulators:
// a: 4 registers of 1 element, b: 2 registers. The fp32 kernels round their operands first (to_tf32).
template <>
struct Mma<float> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// fp32 -> the nearest TF32 (ties away from zero), as cuBLAS and cuDNN round their TF32 operands.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t result;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(result) : "f"(x));
  return result;
}

// x = big + small, both TF32 (PTX leaves an MMA's non-TF32 operand undefined): big the TF32 of x,
// small the TF32 of x - big (exact in fp32, |x - big| <= 2^-11 |x|), off x by 2^-22 |x|. The 3xTF32
// product small*big + big*small + big*big misses about 2^-21 of the product, near an fp32 FMA's
// rounding. Volatile: the split of W_hh's register tiles is the same every step, and hoisted out of
// the step loop it would hold twice the registers (and spill); redone each step, it costs two cvt
// and a subtraction an element.
__device__ __forceinline__ void split_tf32(uint32_t x, uint32_t& big, uint32_t& small) {
  asm volatile("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(big) : "f"(__uint_as_float(x)));
  small = to_tf32(__uint_as_float(x) - __uint_as_float(big));
}

// Four 8x8 matrices of 16-bit elements; lane l points at row l % 8 of matrix l / 8. Volatile with a
// memory clobber: what it reads was written by another CTA's bulk copy, completed on an mbarrier.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

// A global line into L1 (and L2) ahead of its load, holding no register meanwhile.
__device__ __forceinline__ void prefetch_l1(const void* pointer) {
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(pointer));
}

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}

__device__ __forceinline__ uint32_t cluster_nctarank() {
  uint32_t count;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(count));
  return count;
}

// The whole cluster meets; release / acquire order each CTA's earlier shared-memory writes (and
// mbarrier inits) before the peers' later accesses. A GPU-wide fence in SASS: outside the step loop only.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// The address of the same shared-memory location in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t map_to_rank(uint32_t address, uint32_t rank) {
  uint32_t result;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(result) : "r"(address), "r"(rank));
  return result;
}

__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(barrier)), "r"(arrivals) : "memory");
}

// Makes the mbarrier inits visible to the cluster's other CTAs (their bulk copies complete on them).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Shared memory written by ordinary stores, read next by the bulk-copy engine (the async proxy).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// One arrival that also expects `bytes` more of transactions in the current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(barrier)),
               "r"(bytes)
               : "memory");
}

// Until the phase of this parity has completed (acquire: the copies it counted are visible).
__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_address(barrier)),
      "r"(parity)
      : "memory");
}

// The same wait with cluster-scope acquire: st.async's complete_tx releases at cluster scope from
// another CTA's thread, which a CTA-scope acquire does not synchronize with.
__device__ __forceinline__ void mbarrier_wait_cluster(uint64_t* barrier, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_address(barrier)),
      "r"(parity)
      : "memory");
}

// `bytes` from this CTA's shared memory at `source` to shared::cluster `destination` (another CTA's),
// completing on the destination CTA's mbarrier at shared::cluster `barrier`.
__device__ __forceinline__ void bulk_copy_to_peer(uint32_t destination, uint32_t source, uint32_t bytes,
                                                  uint32_t barrier) {
  asm volatile(
      "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          destination),
      "r"(source), "r"(bytes), "r"(barrier)
      : "memory");
}

// Two fp32 into another CTA's shared memory at shared::cluster `destination` (8-byte aligned),
// completing 8 bytes on that CTA's mbarrier at shared::cluster `barrier`: the receiver's wait on it
// makes the values visible (the backward's partial sums).
__device__ __forceinline__ void store_async_to_peer(uint32_t destination, float x, float y, uint32_t barrier) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];\n" ::"r"(
                   destination),
               "r"(__float_as_uint(x)), "r"(__float_as_uint(y)), "r"(barrier)
               : "memory");
}

// The l2 exchange's words: one 64-bit access each, single-copy atomic (naturally aligned, not a
// vector), so that a reader sees a word's tag and value from the same store. Relaxed at GPU scope:
// the store goes to L2 (the point of coherence of the GPU) and the load is served there, never by a
// stale L1 line; no other order is needed (README.md, the l2 exchange).
__device__ __forceinline__ unsigned long long load_relaxed_gpu(const unsigned long long* pointer) {
  unsigned long long value;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];\n" : "=l"(value) : "l"(pointer) : "memory");
  return value;
}

__device__ __forceinline__ void store_relaxed_gpu(unsigned long long* pointer, unsigned long long value) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;\n" ::"l"(pointer), "l"(value) : "memory");
}

}  // namespace birnn_fast::cuda
