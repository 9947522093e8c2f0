// ShardedOptimizer<CudaBackend, float, NcclCommunicator> at world size 1, both strategies,
// against muon::Optimizer<CudaBackend, float> on the same GPU and gradients. The exchange is
// then copies, so the two differ only where the device Frobenius norm's reduction order
// does (atomics): within 1e-5 of the weights' scale, not bitwise. Exits 77 (CTest skip) when
// no GPU is visible; without one it still proves that the distributed GPU path compiles.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "muon/cuda/backend.cuh"
#include "muon/distributed/nccl.hpp"
#include "muon/distributed/sharded_optimizer.hpp"
#include "muon/optimizer.hpp"
#include "nccl_world1.hpp"

namespace {

using muon::DeviceSpace;
using muon::cuda::CudaBackend;
using muon::cuda::DeviceBuffer;

struct Shape {
  const char* name;
  bool muon;
  muon::index_t rows, cols;
};
const Shape kShapes[] = {{"tall", true, 96, 40}, {"wide", true, 32, 80}, {"bias", false, 1, 40}};

DeviceBuffer<float> upload(const CudaBackend& gpu, const std::vector<float>& host) {
  DeviceBuffer<float> buf;
  gpu.resize(buf, static_cast<muon::index_t>(host.size()));
  gpu.synchronize();
  muon::cuda::check(cudaMemcpy(buf.data(), host.data(), host.size() * sizeof(float),
                               cudaMemcpyHostToDevice), "cudaMemcpy");
  muon::cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  return buf;
}

/// Runs 4 steps of `opt` on fresh weights; returns the final weights, concatenated.
template <class Opt>
std::vector<float> train(Opt& opt, const CudaBackend& gpu) {
  std::vector<DeviceBuffer<float>> w, g;
  std::mt19937 rng(7);
  std::normal_distribution<float> d(0.0f, 1.0f);
  const auto random = [&](std::size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = d(rng);
    return v;
  };
  for (const Shape& s : kShapes) {
    const auto n = static_cast<std::size_t>(s.rows * s.cols);
    w.push_back(upload(gpu, random(n)));
    g.push_back(upload(gpu, std::vector<float>(n, 0.0f)));
    auto wv = muon::row_major_view<DeviceSpace>(w.back().data(), s.rows, s.cols);
    auto gv = muon::row_major_view<DeviceSpace, const float>(g.back().data(), s.rows, s.cols);
    if (s.muon) opt.add_muon(s.name, wv, gv);
    else opt.add_adamw(s.name, wv, gv);
  }
  for (int step = 0; step < 4; ++step) {
    for (std::size_t i = 0; i < g.size(); ++i) {
      const auto host = random(g[i].size());
      muon::cuda::check(cudaMemcpy(g[i].data(), host.data(), host.size() * sizeof(float),
                                   cudaMemcpyHostToDevice), "cudaMemcpy");
    }
    muon::cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    opt.step();
  }
  gpu.synchronize();
  std::vector<float> out;
  for (const DeviceBuffer<float>& b : w) {
    std::vector<float> host(b.size());
    muon::cuda::check(cudaMemcpy(host.data(), b.data(), host.size() * sizeof(float),
                                 cudaMemcpyDeviceToHost), "cudaMemcpy");
    out.insert(out.end(), host.begin(), host.end());
  }
  return out;
}

}  // namespace

int main() {
  return run_nccl_world1([](ncclComm_t comm) {
    int failures = 0;
    CudaBackend gpu;
    muon::GroupOptions options;
    options.muon.lr = 0.02;
    muon::Optimizer<CudaBackend, float> single(options, {}, gpu);
    const std::vector<float> expected = train(single, gpu);
    for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
      for (auto policy : {muon::NonFinitePolicy::error, muon::NonFinitePolicy::unchecked}) {
        muon::OptimizerOptions o;
        o.non_finite = policy;
        muon::ShardedOptimizer<CudaBackend, float, muon::NcclCommunicator> sharded(
            muon::NcclCommunicator(comm, gpu.stream()), strategy, options, o, gpu);
        const std::vector<float> got = train(sharded, gpu);
        double worst = 0;
        for (std::size_t i = 0; i < got.size(); ++i)
          worst = std::fmax(worst, std::fabs(double(got[i]) - double(expected[i])));
        const bool ok = got.size() == expected.size() && worst <= 1e-5;
        std::printf("%s, %s: max |sharded - single| = %.3g %s\n", muon::to_string(strategy),
                    policy == muon::NonFinitePolicy::error ? "checked" : "unchecked", worst,
                    ok ? "ok" : "FAILED");
        failures += ok ? 0 : 1;
      }
    }
    return failures;
  });
}
