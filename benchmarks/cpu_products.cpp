// The per-step product of the CPU kernel, c[M, N] = a[M, K] @ W^T with W (N, K) the same on every
// call, timed on one thread through each candidate backend: the AVX2 panel kernel
// (csrc/cpu/panel_gemm.h), at::mm (MKL), and oneDNN's brgemm ukernel through
// at::native::cpublas::brgemm, fp32 and bf16. Built and driven by cpu_products.py.
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "../csrc/cpu/half_products.h"
#include "../csrc/cpu/panel_gemm.h"

namespace {

using birnn_fast::cpu::pack_panels;
using birnn_fast::cpu::panel_gemm;
namespace cpublas = at::native::cpublas;

template <typename Fn>
double median_seconds(Fn&& fn, double budget) {
  fn();
  const auto start = std::chrono::steady_clock::now();
  fn();
  const double once = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const int calls = std::max(1, static_cast<int>(budget / 7 / std::max(once, 1e-7)));
  std::vector<double> samples;
  for (int round = 0; round < 7; ++round) {
    const auto begin = std::chrono::steady_clock::now();
    for (int call = 0; call < calls; ++call) {
      fn();
    }
    samples.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count() / calls);
  }
  std::nth_element(samples.begin(), samples.begin() + 3, samples.end());
  return samples[3];
}

// GFLOP/s of the product through `backend` ("panel", "mm", "brgemm", "brgemm64"), or -1 where the
// backend refuses the dtype on this CPU (the reason goes to `why`).
std::tuple<double, std::string> product_gflops(const std::string& backend, const std::string& dtype, int64_t M,
                                               int64_t K, int64_t N, double budget) {
  const double flops = 2.0 * M * N * K;
  const at::Tensor weight = at::randn({N, K});  // W: (N, K), as a layer's weight_hh (G*H, H)
  const at::Tensor a32 = at::randn({M, K});
  at::Tensor c = at::zeros({M, N});
  try {
    if (backend == "panel") {
      TORCH_CHECK(dtype == "float32", "the panel kernel is fp32 only");
      TORCH_CHECK(birnn_fast::cpu::panel_gemm_supported(), "no AVX2/FMA");
      const auto panels = pack_panels(K, N, weight.data_ptr<float>(), K, /*transpose_b=*/true);
      const double s = median_seconds([&] {
        panel_gemm(M, a32.data_ptr<float>(), K, panels, c.data_ptr<float>(), N, false);
      }, budget);
      return {flops / s / 1e9, ""};
    }
    if (backend == "mm") {
      const auto type = dtype == "float32" ? at::kFloat : at::kBFloat16;
      const at::Tensor a = a32.to(type), w = weight.to(type);
      at::Tensor out = at::empty({M, N}, a.options());
      const double s = median_seconds([&] { at::mm_out(out, a, w.t()); }, budget);
      return {flops / s / 1e9, ""};
    }
    // brgemm: B is (K, N) row-major (W^T), packed once where the platform wants it; "brgemm64"
    // runs panels of 64 columns (one brgemm call each), "brgemm" the whole N at once.
    const int64_t block = backend == "brgemm64" ? 64 : N;
    if (dtype == "float32") {
      const at::Tensor b = weight.t().contiguous();
      const bool packed = cpublas::could_pack(at::kFloat);
      at::Tensor b_used = b;
      if (packed) {
        b_used = at::empty({N / block, K, block});
        for (int64_t j = 0; j < N; j += block) {
          cpublas::pack(K, block, N, block, at::kFloat, at::kFloat, b.data_ptr<float>() + j,
                        b_used.data_ptr<float>() + j * K);
        }
      }
      const double s = median_seconds([&] {
        for (int64_t j = 0; j < N; j += block) {
          const float* bp = packed ? b_used.data_ptr<float>() + j * K : b.data_ptr<float>() + j;
          cpublas::brgemm(M, block, K, K, packed ? block : N, N, false, a32.data_ptr<float>(), bp,
                          c.data_ptr<float>() + j, /*is_vnni=*/false);
        }
      }, budget);
      cpublas::brgemm_release(false);
      return {flops / s / 1e9, packed ? "packed" : "unpacked"};
    }
    if (backend == "half") {  // the kernel's own: HalfWeight, a rounded from float32 on every call
      const at::Tensor b = weight.t().contiguous();
      const birnn_fast::cpu::HalfWeight half(at::kBFloat16, /*vnni=*/true, K, N, b.data_ptr<float>(), N,
                                             /*transpose_b=*/false);
      const double s = median_seconds([&] {
        half.multiply(M, a32.data_ptr<float>(), K, c.data_ptr<float>(), N, /*add_c=*/false);
      }, budget);
      return {flops / s / 1e9, cpublas::could_pack(at::kBFloat16) ? "cpublas::pack" : "HalfWeight's own VNNI pairs"};
    }
    const at::Tensor a = a32.to(at::kBFloat16);
    const at::Tensor b = weight.t().contiguous().to(at::kBFloat16);
    TORCH_CHECK(cpublas::could_pack(at::kBFloat16), "cpublas::could_pack(bfloat16) is false (\"half\" packs itself)");
    at::Tensor b_packed = at::empty({N / block, K, block}, b.options());
    for (int64_t j = 0; j < N; j += block) {
      cpublas::pack(K, block, N, block, at::kBFloat16, at::kBFloat16, b.data_ptr<at::BFloat16>() + j,
                    b_packed.data_ptr<at::BFloat16>() + j * K);
    }
    const double s = median_seconds([&] {
      for (int64_t j = 0; j < N; j += block) {
        cpublas::brgemm(M, block, K, K, block, N, false, a.data_ptr<at::BFloat16>(),
                        b_packed.data_ptr<at::BFloat16>() + j * K, c.data_ptr<float>() + j, /*is_vnni=*/true);
      }
    }, budget);
    cpublas::brgemm_release(true);
    return {flops / s / 1e9, "cpublas::pack"};
  } catch (const c10::Error& error) {
    return {-1.0, error.msg().substr(0, 120)};
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("product_gflops", &product_gflops);
}
