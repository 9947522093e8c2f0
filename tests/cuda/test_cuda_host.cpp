// The CUDA backend from host C++: this file is compiled by the C++ compiler, not nvcc, and
// uses CudaBackend through muon/cuda/backend.hpp and muon::cuda's compiled library, as a
// LibTorch program's .cpp does. That it links shows the library holds what the optimizer,
// MasterWeights and batched Newton-Schulz instantiate; on a GPU it also checks the steps
// against the CPU backend. Exit code 77 (skipped) without a GPU.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "muon/cuda/backend.hpp"
#include "muon/eigen.hpp"
#include "muon/master_weights.hpp"

namespace {

using muon::cuda::CudaBackend;
using muon::cuda::DeviceBuffer;
int failures = 0;

template <class T>
std::vector<T> gaussian(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> d;
  std::vector<T> v(n);
  for (T& x : v) x = static_cast<T>(d(rng));
  return v;
}

/// Three Muon + AdamW steps on the GPU against the same on the CPU: the largest difference.
template <class T>
double steps_against_cpu() {
  const muon::index_t rows = 24, cols = 16;
  std::vector<T> w = gaussian<T>(rows * cols, 1), b = gaussian<T>(cols, 2);
  const std::vector<T> gw = gaussian<T>(rows * cols, 3), gb = gaussian<T>(cols, 4);
  CudaBackend gpu;
  DeviceBuffer<T> dw, db, dgw, dgb;
  for (auto [buf, n] : {std::pair{&dw, w.size()}, {&db, b.size()}, {&dgw, gw.size()}, {&dgb, gb.size()}})
    gpu.resize(*buf, static_cast<muon::index_t>(n));
  gpu.copy_from_host(w.data(), gpu.view(dw, rows, cols));
  gpu.copy_from_host(b.data(), gpu.view(db, 1, cols));
  gpu.copy_from_host(gw.data(), gpu.view(dgw, rows, cols));
  gpu.copy_from_host(gb.data(), gpu.view(dgb, 1, cols));
  muon::GroupOptions options;
  options.muon.lr = 0.02;
  muon::Optimizer<CudaBackend, T> on_gpu(options, {}, gpu);
  on_gpu.add_muon("w", gpu.view(dw, rows, cols), gpu.view(dgw, rows, cols));
  on_gpu.add_adamw("b", gpu.view(db, 1, cols), gpu.view(dgb, 1, cols));
  muon::Optimizer<muon::EigenBackend, T> on_cpu(options);
  on_cpu.add_muon("w", muon::row_major_view(w.data(), rows, cols),
                  muon::row_major_view(gw.data(), rows, cols));
  on_cpu.add_adamw("b", muon::row_major_view(b.data(), 1, cols),
                   muon::row_major_view(gb.data(), 1, cols));
  for (int s = 0; s < 3; ++s) {
    on_gpu.step();
    on_cpu.step();
  }
  std::vector<T> back(w.size());
  gpu.copy_to_host(muon::MatrixView<const T, muon::DeviceSpace>(gpu.view(dw, rows, cols)), back.data());
  double diff = 0;
  for (std::size_t i = 0; i < w.size(); ++i)
    diff = std::max(diff, std::abs(static_cast<double>(back[i]) - static_cast<double>(w[i])));
  return diff;
}

void check(bool ok, const char* what) {
  if (!ok) {
    ++failures;
    std::printf("FAILED: %s\n", what);
  }
}

}  // namespace

int main() {
  if (!muon::cuda::device_available()) {
    std::printf("no CUDA device visible: skipped\n");
    return 77;
  }
  check(steps_against_cpu<float>() < 1e-4, "float steps match the CPU backend");
  check(steps_against_cpu<double>() < 1e-10, "double steps match the CPU backend");

  // MasterWeights over bf16 parameters: the float <-> bf16 copies come from the library.
  CudaBackend gpu;
  DeviceBuffer<float> wide;
  DeviceBuffer<__nv_bfloat16> narrow, narrow_grad;
  gpu.resize(wide, 16 * 32);
  gpu.resize(narrow, 16 * 32);
  gpu.resize(narrow_grad, 16 * 32);
  const std::vector<float> g = gaussian<float>(16 * 32, 5);
  gpu.copy_from_host(g.data(), gpu.view(wide, 16, 32));
  gpu.copy(muon::MatrixView<const float, muon::DeviceSpace>(gpu.view(wide, 16, 32)), gpu.view(narrow_grad, 16, 32));
  muon::Optimizer<CudaBackend, float> opt({}, {}, gpu);
  muon::MasterWeights<CudaBackend, float, __nv_bfloat16> mixed(opt);
  mixed.add_muon("w", gpu.view(narrow, 16, 32), gpu.view(narrow_grad, 16, 32));
  check(mixed.step().updated == 1, "MasterWeights steps a bf16 parameter");

  // Batched Newton-Schulz in bf16 on a stack of two.
  DeviceBuffer<float> stack, out;
  gpu.resize(stack, 2 * 16 * 32);
  gpu.resize(out, 2 * 16 * 32);
  const std::vector<float> s = gaussian<float>(2 * 16 * 32, 6);
  gpu.copy_from_host(s.data(), gpu.view(stack, 32, 32));
  const auto schedule = muon::Schedule::keller().resolve(5);
  gpu.newton_schulz_batched(muon::MatrixView<const float, muon::DeviceSpace>(gpu.view(stack, 16, 32)),
                            16 * 32, gpu.view(out, 16, 32), 16 * 32, 2, schedule, 1.0, 1e-7,
                            muon::cuda::Precision::bf16);
  std::vector<float> result(2 * 16 * 32);
  gpu.copy_to_host(muon::MatrixView<const float, muon::DeviceSpace>(gpu.view(out, 32, 32)), result.data());
  bool finite = true;
  for (float x : result) finite = finite && std::isfinite(x);
  check(finite, "batched bf16 Newton-Schulz is finite");
  std::printf("%s\n", failures == 0 ? "ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}
