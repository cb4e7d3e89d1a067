#include "isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

#include "buffers.h"
#include "half_products.h"
#include "panel_gemm.h"

namespace birnn_fast::cpu {
namespace {

std::string upper(const char* text) {
  std::string value(text);
  std::transform(value.begin(), value.end(), value.begin(), [](unsigned char c) { return std::toupper(c); });
  return value;
}

bool starts_with(std::string_view text, std::string_view prefix) { return text.substr(0, prefix.size()) == prefix; }

// ONEDNN_MAX_CPU_ISA (or the older name oneDNN still reads, DNNL_MAX_CPU_ISA) upper-cased; empty if unset.
std::string onednn_max_isa() {
  const char* value = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (value == nullptr) {
    value = std::getenv("DNNL_MAX_CPU_ISA");
  }
  return value == nullptr ? std::string() : upper(value);
}

// ONEDNN_MAX_CPU_ISA's names; values oneDNN does not know leave it uncapped, and so do we.
Isa onednn_ceiling() {
  const std::string name = onednn_max_isa();
  if (name == "SSE41" || name == "AVX") {
    return Isa::kBaseline;
  }
  if (starts_with(name, "AVX2")) {
    return Isa::kAvx2;
  }
  return Isa::kAvx512;
}

// Whether the CPU multiplies dtype natively and ONEDNN_MAX_CPU_ISA leaves oneDNN those
// instructions: AVX512-BF16 (AVX512_CORE_BF16 and up) for bfloat16, AVX512-FP16 (AVX512_CORE_FP16,
// AVX10_1_512 and up) for float16. AMX implies both levels.
bool native_half_instructions(c10::ScalarType dtype) {
#ifdef BIRNN_HAS_ISA_DISPATCH
  __builtin_cpu_init();
  const bool bfloat16 = dtype == c10::ScalarType::BFloat16;
  if (!(bfloat16 ? __builtin_cpu_supports("avx512bf16") : __builtin_cpu_supports("avx512fp16"))) {
    return false;
  }
  const std::string name = onednn_max_isa();
  for (const char* below : {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}) {
    if (name == below) {
      return false;
    }
  }
  return bfloat16 || name != "AVX512_CORE_BF16";
#else
  (void)dtype;
  return false;
#endif
}

Isa mkl_ceiling() {
  const char* value = std::getenv("MKL_ENABLE_INSTRUCTIONS");
  if (value == nullptr) {
    return Isa::kAvx512;
  }
  const std::string name = upper(value);
  if (name == "SSE4_2" || name == "AVX") {
    return Isa::kBaseline;
  }
  if (name == "AVX2") {
    return Isa::kAvx2;
  }
  return Isa::kAvx512;
}

}  // namespace

Isa cpu_isa() {
#ifdef BIRNN_HAS_ISA_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

Isa isa_ceiling() { return std::min(onednn_ceiling(), mkl_ceiling()); }

Isa effective_isa() {
  static const Isa isa = std::min(cpu_isa(), isa_ceiling());
  return isa;
}

// benchmarks/cpu_products.py decided it: on AVX2 (Zen 2, one thread, K = 256/512, N = 4K) the panel
// kernel runs 1.0-2.5x at::mm and 1.6-2x oneDNN's brgemm at M = 1-64 rows; oneDNN's AVX-512 and
// AMX kernels are wider than the panel kernel's AVX2 registers, so above AVX2 brgemm runs them;
// below AVX2 MKL has its own SSE kernels.
Products float32_products() {
  static const Products products = [] {
    const char* forced = std::getenv("BIRNN_FAST_CPU_PRODUCTS");
    const Isa isa = effective_isa();
    if (forced != nullptr && *forced != '\0') {
      const std::string name(forced);
      if (name == "panel") {
        TORCH_CHECK(isa >= Isa::kAvx2 && panel_gemm_supported(), "birnn_fast: BIRNN_FAST_CPU_PRODUCTS=panel needs "
                    "AVX2 and FMA, and the ISA ceiling allows ", isa_name(isa));
        return Products::kPanel;
      }
      if (name == "brgemm") {
        return Products::kBrgemm;
      }
      TORCH_CHECK(name == "mm", "birnn_fast: BIRNN_FAST_CPU_PRODUCTS must be panel, brgemm or mm, got '", name, "'");
      return Products::kMm;
    }
    if (isa == Isa::kAvx512) {
      return Products::kBrgemm;
    }
    return isa == Isa::kAvx2 && panel_gemm_supported() ? Products::kPanel : Products::kMm;
  }();
  return products;
}

HalfProducts half_products(c10::ScalarType dtype) {
  // could_pack: oneDNN packs for AMX; without AMX its AVX512-BF16 / -FP16 brgemm takes our packing.
  auto packs = [](c10::ScalarType dtype) {
    return effective_isa() == Isa::kAvx512 &&
           (at::native::cpublas::could_pack(dtype) || native_half_instructions(dtype));
  };
  auto choose = [&packs](c10::ScalarType dtype) {
    const char* forced = std::getenv("BIRNN_FAST_CPU_HALF_PRODUCTS");
    if (forced != nullptr && *forced != '\0') {
      const std::string name(forced);
      if (name == "vnni") {  // each dtype the CPU multiplies natively; an error if it has neither
        TORCH_CHECK(packs(c10::ScalarType::BFloat16) || packs(c10::ScalarType::Half),
                    "birnn_fast: BIRNN_FAST_CPU_HALF_PRODUCTS=vnni needs a CPU that multiplies bfloat16 or float16 "
                    "natively (AMX, AVX512-BF16 / -FP16) and an ISA ceiling of AVX-512 or more");
        return packs(dtype) ? HalfProducts::kBrgemmVnni : HalfProducts::kFloat32;
      }
      if (name == "brgemm") {
        return HalfProducts::kBrgemm;
      }
      TORCH_CHECK(name == "float32", "birnn_fast: BIRNN_FAST_CPU_HALF_PRODUCTS must be float32, brgemm or vnni, got '",
                  name, "'");
      return HalfProducts::kFloat32;
    }
    if (!packs(dtype)) {
      return HalfProducts::kFloat32;
    }
    if (!vnni_products_work(dtype)) {
      TORCH_WARN("birnn_fast: oneDNN's packed ", dtype, " product disagreed with the plain one on this CPU; ", dtype,
                 " layers run their products in float32");
      return HalfProducts::kFloat32;
    }
    return HalfProducts::kBrgemmVnni;
  };
  static const HalfProducts bfloat16 = choose(c10::ScalarType::BFloat16);
  static const HalfProducts float16 = choose(c10::ScalarType::Half);
  TORCH_INTERNAL_ASSERT(dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half);
  return dtype == c10::ScalarType::BFloat16 ? bfloat16 : float16;
}

const char* half_products_name(HalfProducts products) {
  switch (products) {
    case HalfProducts::kBrgemmVnni: return "brgemm-vnni";
    case HalfProducts::kBrgemm: return "brgemm";
    default: return "float32";
  }
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

const char* products_name(Products products) {
  switch (products) {
    case Products::kPanel: return "panel";
    case Products::kBrgemm: return "brgemm";
    default: return "mm";
  }
}

std::string engine_info() {
  return std::string("cells=") + isa_name(effective_isa()) + " cpu=" + isa_name(cpu_isa()) +
         " ceiling=" + isa_name(isa_ceiling()) + " products.float32=" + products_name(float32_products()) +
         " products.float64=mm products.bfloat16=" + half_products_name(half_products(c10::ScalarType::BFloat16)) +
         " products.float16=" + half_products_name(half_products(c10::ScalarType::Half)) +
         " buffer_cache_mb=" + std::to_string(buffer_cache_limit() >> 20);
}

}  // namespace birnn_fast::cpu
