// The instruction sets our own code may use, and the backend of the products with a reused weight,
// both chosen once per process at run time: the build flags are generic (no -march=native).
//
// The ceiling is oneDNN's and MKL's own switches, read here too, so that one setting caps every
// library in the process: ONEDNN_MAX_CPU_ISA (SSE41, AVX, AVX2, AVX2_VNNI, AVX512_CORE, ...,
// AVX512_CORE_AMX, AVX10_1_512, DEFAULT) and MKL_ENABLE_INSTRUCTIONS (SSE4_2, AVX, AVX2, AVX512, ...);
// the lower of the two wins. BIRNN_FAST_CPU_PRODUCTS=panel|brgemm|mm forces the product backend
// (for tests: every backend runs on any x86 CPU that has its instructions).
//
// The reused-weight products of a bfloat16 / float16 layer (half_products.h) run on oneDNN's
// brgemm with operands in that dtype where the CPU multiplies it natively (AMX, or AVX512-BF16 /
// -FP16, as the oneDNN ceiling allows) and a self-check of the packed layout passes; elsewhere on
// float32 operands.
// BIRNN_FAST_CPU_HALF_PRODUCTS=float32|brgemm|vnni forces it (brgemm: the operands' rounding without
// packing, which torch runs on any CPU -- slowly; for tests).
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

namespace birnn_fast::cpu {

// Levels our code is compiled for, each with FMA and F16C; kBaseline is x86-64's SSE2 (or any other
// architecture).
enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// Backends of the float32 products whose weight every step reuses (products.h).
enum class Products { kPanel, kBrgemm, kMm };

// Backends of a bfloat16 / float16 layer's reused-weight products (half_products.h).
enum class HalfProducts { kFloat32, kBrgemm, kBrgemmVnni };

Isa cpu_isa();        // what the CPU has
Isa isa_ceiling();    // what the environment allows (kAvx512 if unset)
Isa effective_isa();  // the lower of the two: what the cell math runs
Products float32_products();
const char* isa_name(Isa isa);
const char* products_name(Products products);
HalfProducts half_products(c10::ScalarType dtype);  // dtype: BFloat16 or Half
const char* half_products_name(HalfProducts products);

// One line naming what runs here, for tests and benchmark records.
std::string engine_info();

#if defined(__GNUC__) && defined(__x86_64__)
#define BIRNN_HAS_ISA_DISPATCH 1

template <typename Kernel, typename Args>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void run_rows_avx512(const Args& args) {
  Kernel::run(args);
}

template <typename Kernel, typename Args>
__attribute__((target("avx2,fma"))) void run_rows_avx2(const Args& args) {
  Kernel::run(args);
}
#endif

// Kernel::run(args) compiled for the widest instruction set allowed: the cell math's row loops
// only vectorize well with the machine's widest registers.
template <typename Kernel, typename Args>
void run_rows(const Args& args) {
#ifdef BIRNN_HAS_ISA_DISPATCH
  static const Isa isa = effective_isa();
  if (isa == Isa::kAvx512) {
    return run_rows_avx512<Kernel>(args);
  }
  if (isa == Isa::kAvx2) {
    return run_rows_avx2<Kernel>(args);
  }
#endif
  Kernel::run(args);
}

}  // namespace birnn_fast::cpu
