#include "isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

#include "panel_gemm.h"

namespace birnn_fast::cpu {
namespace {

std::string upper(const char* text) {
  std::string value(text);
  std::transform(value.begin(), value.end(), value.begin(), [](unsigned char c) { return std::toupper(c); });
  return value;
}

bool starts_with(std::string_view text, std::string_view prefix) { return text.substr(0, prefix.size()) == prefix; }

// ONEDNN_MAX_CPU_ISA's names; values oneDNN does not know leave it uncapped, and so do we.
Isa onednn_ceiling() {
  const char* value = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (value == nullptr) {
    value = std::getenv("DNNL_MAX_CPU_ISA");  // the older name oneDNN still reads
  }
  if (value == nullptr) {
    return Isa::kAvx512;
  }
  const std::string name = upper(value);
  if (name == "SSE41" || name == "AVX") {
    return Isa::kBaseline;
  }
  if (starts_with(name, "AVX2")) {
    return Isa::kAvx2;
  }
  return Isa::kAvx512;
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
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
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
         " products.float64=mm half=float32-compute";
}

}  // namespace birnn_fast::cpu
