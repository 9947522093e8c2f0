// GPU micro-benchmarks of the CUDA backend, each with its in-run baseline:
//   peak  cuBLAS bf16 GEMM (8192^3, fp32 accumulation): the roof the NS products run under
//   ns    Newton-Schulz (5 quintic steps) per shape, in bf16 (and tf32 / fp32 for the squares)
//   step  a whole optimizer step (Muon + AdamW) for the GPT-2-small and a 1B-like set
// Prints one CSV line per measurement (kind,name,precision,batch,ms,gflops); compare_torch.py
// runs the PyTorch references on the same GPU and prints the ratio table.
// Usage: muon_cuda_bench [--quick]
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "muon/cuda/backend.cuh"
#include "muon/optimizer.hpp"

namespace {

using muon::DeviceSpace;
using muon::index_t;
using muon::cuda::CudaBackend;
using muon::cuda::DeviceBuffer;
using muon::cuda::Precision;

DeviceBuffer<float> random_buffer(const CudaBackend& gpu, std::size_t n, float scale, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0, scale);
  std::vector<float> host(n);
  for (auto& x : host) x = d(rng);
  DeviceBuffer<float> buf;
  gpu.resize(buf, static_cast<index_t>(n));
  muon::cuda::check(cudaMemcpy(buf.data(), host.data(), n * sizeof(float), cudaMemcpyHostToDevice),
                    "cudaMemcpy");
  return buf;
}

/// Median milliseconds of `body` over `reps` timed runs after `warmup` untimed ones.
template <class F>
double time_ms(cudaStream_t stream, F body, int warmup = 3, int reps = 20) {
  for (int i = 0; i < warmup; ++i) body();
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> times;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(start, stream);
    body();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void gemm_peak(const CudaBackend& gpu) {
  const int n = 8192;
  DeviceBuffer<__nv_bfloat16> a, b, c;
  gpu.resize(a, index_t(n) * n);
  gpu.resize(b, index_t(n) * n);
  gpu.resize(c, index_t(n) * n);
  const float one = 1, zero = 0;
  cublasSetStream(gpu.handle(), gpu.stream());
  const double ms = time_ms(gpu.stream(), [&] {
    muon::cuda::check(cublasGemmEx(gpu.handle(), CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a.data(),
                                   CUDA_R_16BF, n, b.data(), CUDA_R_16BF, n, &zero, c.data(),
                                   CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                      "cublasGemmEx");
  });
  std::printf("peak,gemm 8192x8192x8192,bf16,1,%.4f,%.1f\n", ms, 2.0 * n * n * double(n) / ms / 1e6);
}

/// Nominal flops of the reference loop (what PyTorch computes): per step and matrix
/// 4 k^2 n (X X^T and B X) + 2 k^3 (A A), k = min(m, n).
double ns_flops(index_t m, index_t n, index_t batch, int steps) {
  const double k = double(std::min(m, n)), N = double(std::max(m, n));
  return double(batch) * steps * (4 * k * k * N + 2 * k * k * k);
}

/// Median ms of NS5 on an m x n stack of `batch`, printed as a CSV row of `kind` with `label`.
void newton_schulz(const CudaBackend& gpu, index_t m, index_t n, index_t batch, Precision p,
                   const char* kind = "ns", const std::string& label = "",
                   muon::NewtonSchulzMethod method = muon::NewtonSchulzMethod::automatic) {
  const auto schedule = muon::Schedule::keller().resolve(5);
  const std::size_t size = static_cast<std::size_t>(m * n * batch);
  DeviceBuffer<float> in = random_buffer(gpu, size, 1, 1), out = random_buffer(gpu, size, 0, 2);
  const auto vin = muon::row_major_view<DeviceSpace, const float>(in.data(), m, n);
  const auto vout = muon::row_major_view<DeviceSpace>(out.data(), m, n);
  double ms;
  if (p == Precision::bf16 || p == Precision::fp16) {
    ms = time_ms(gpu.stream(), [&] {
      gpu.newton_schulz_batched(vin, m * n, vout, m * n, batch, schedule, 1.0, 1e-7, p, method);
    });
  } else {  // fp32 / tf32 through the optimizer's workspace (SYRK/SYMM), one matrix
    CudaBackend g(gpu.stream(), gpu.handle(), muon::cuda::CudaOptions{p});
    muon::NewtonSchulzWorkspace<CudaBackend, float> ws;
    ws.reserve(g, m, n);
    ms = time_ms(gpu.stream(), [&] {
      g.copy(vin, ws.input(g, m, n));
      (void)ws.run(g, m, n, schedule, 1.0, 1e-7);
    });
  }
  std::printf("%s,%ldx%ld%s,%s,%ld,%.4f,%.1f\n", kind, long(m), long(n), label.c_str(),
              muon::cuda::to_string(p), long(batch), ms, ns_flops(m, n, batch, 5) / ms / 1e6);
}

struct Shape {
  index_t rows, cols;
};

/// One optimizer step for a model: Muon on `matrices`, AdamW on `vectors` and the embedding.
void whole_step(const CudaBackend& gpu, const char* name, const std::vector<Shape>& matrices,
                const std::vector<index_t>& vectors, Shape embedding, muon::NonFinitePolicy policy) {
  muon::GroupOptions o;
  o.muon.lr = 0.02;
  muon::OptimizerOptions oo;
  oo.non_finite = policy;
  muon::Optimizer<CudaBackend, float> opt(o, oo, gpu);
  std::vector<DeviceBuffer<float>> keep;
  unsigned seed = 10;
  auto add = [&](Shape s, bool muon) {
    keep.push_back(random_buffer(gpu, std::size_t(s.rows * s.cols), 0.02f, seed++));
    keep.push_back(random_buffer(gpu, std::size_t(s.rows * s.cols), 1.f, seed++));
    const auto w = muon::row_major_view<DeviceSpace>(keep[keep.size() - 2].data(), s.rows, s.cols);
    const auto g = muon::row_major_view<DeviceSpace, const float>(keep.back().data(), s.rows, s.cols);
    const std::string id = "p" + std::to_string(keep.size());
    if (muon)
      opt.add_muon(id, w, g);
    else
      opt.add_adamw(id, w, g);
  };
  for (Shape s : matrices) add(s, true);
  for (index_t v : vectors) add({1, v}, false);
  add(embedding, false);
  const double ms = time_ms(gpu.stream(), [&] { opt.step(); }, 2, 10);
  std::printf("step,%s,bf16 NS%s,1,%.4f,0\n", name,
              policy == muon::NonFinitePolicy::unchecked ? "" : " + NaN check", ms);
}

}  // namespace

int main(int argc, char** argv) {
  if (!muon::cuda::device_available()) {
    std::printf("no CUDA device visible\n");
    return 77;
  }
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("# device: %s\n", prop.name);
  std::printf("kind,name,precision,batch,ms,gflops\n");
  CudaBackend gpu(muon::cuda::CudaOptions{Precision::bf16});
  gemm_peak(gpu);
  const std::vector<std::pair<Shape, index_t>> shapes = {
      {{4096, 4096}, 1}, {{8192, 8192}, 1}, {{1024, 4096}, 1}, {{4096, 1024}, 1}, {{1024, 1024}, 64}};
  for (auto [s, batch] : shapes) {
    if (quick && s.rows * s.cols > 4096 * 4096) continue;
    newton_schulz(gpu, s.rows, s.cols, batch, Precision::bf16);
  }
  for (Precision p : {Precision::tf32, Precision::native}) newton_schulz(gpu, 4096, 4096, 1, p);
  // What the defaults are made of: symmetric-block counts, and the standard vs the Gram form
  // on wide matrices (rows "variant": the name carries the blocks and the method).
  for (Shape s : {Shape{4096, 4096}, {8192, 8192}, {2048, 8192}, {2048, 6144}, {1024, 4096}}) {
    if (quick && s.rows * s.cols > 4096 * 4096) continue;
    for (int blocks : {1, 2, 4, 8}) {
      CudaBackend g(gpu.stream(), gpu.handle(), muon::cuda::CudaOptions{Precision::bf16, blocks});
      for (auto method : {muon::NewtonSchulzMethod::standard, muon::NewtonSchulzMethod::gram}) {
        if (method == muon::NewtonSchulzMethod::gram && s.rows == s.cols) continue;
        const std::string label = " nb" + std::to_string(blocks) +
                                  (method == muon::NewtonSchulzMethod::gram ? " gram" : " standard");
        newton_schulz(g, s.rows, s.cols, 1, Precision::bf16, "variant", label, method);
      }
    }
  }

  std::vector<Shape> gpt2;
  std::vector<index_t> gpt2_vectors;
  for (int b = 0; b < 12; ++b) {
    for (Shape s : {Shape{768, 2304}, {768, 768}, {768, 3072}, {3072, 768}}) gpt2.push_back(s);
    for (index_t len : {768, 768, 2304, 768, 768, 768, 3072, 768}) gpt2_vectors.push_back(len);
  }
  whole_step(gpu, "gpt2-small", gpt2, gpt2_vectors, {50257, 768}, muon::NonFinitePolicy::unchecked);
  whole_step(gpu, "gpt2-small", gpt2, gpt2_vectors, {50257, 768}, muon::NonFinitePolicy::error);
  if (!quick) {
    std::vector<Shape> big;
    std::vector<index_t> big_vectors;
    for (int b = 0; b < 24; ++b) {
      for (Shape s : {Shape{2048, 6144}, {2048, 2048}, {2048, 8192}, {8192, 2048}}) big.push_back(s);
      for (index_t len : {2048, 2048, 6144, 2048, 2048, 2048, 8192, 2048}) big_vectors.push_back(len);
    }
    whole_step(gpu, "1b-like", big, big_vectors, {50257, 2048}, muon::NonFinitePolicy::unchecked);
  }
  return 0;
}
