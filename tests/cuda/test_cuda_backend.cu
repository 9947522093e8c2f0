// The CUDA backend against the CPU one: the same optimizer, the same parameters and gradients,
// on the GPU and on Eigen (the double-precision reference), compared with per-precision
// tolerances (measured; see docs/cuda.md). Exits 77 (CTest skip) without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "muon/cuda/backend.cuh"
#include "muon/eigen.hpp"
#include "muon/master_weights.hpp"
#include "muon/optimizer.hpp"

namespace {

int failures = 0;
#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)

using muon::DeviceSpace;
using muon::index_t;
using muon::cuda::CudaBackend;
using muon::cuda::DeviceBuffer;
using muon::cuda::Precision;

template <class T>
std::vector<T> gaussian(std::size_t n, std::mt19937& rng, double scale = 1) {
  std::normal_distribution<double> d(0, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(d(rng));
  return v;
}

template <class T>
DeviceBuffer<T> upload(const CudaBackend& gpu, const std::vector<T>& host) {
  DeviceBuffer<T> buf;
  gpu.resize(buf, static_cast<index_t>(host.size()));
  gpu.synchronize();  // resize zero-fills on the backend's stream; the copy below must follow
  if (!host.empty())
    muon::cuda::check(cudaMemcpy(buf.data(), host.data(), host.size() * sizeof(T),
                                 cudaMemcpyHostToDevice),
                      "cudaMemcpy");
  // A pageable-memory cudaMemcpy may return before the data lands, and the backend's stream
  // does not wait for the legacy stream: finish the copy before any kernel reads it.
  muon::cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  return buf;
}

template <class T>
std::vector<T> download(const DeviceBuffer<T>& buf) {
  std::vector<T> host(buf.size());
  if (!host.empty())
    muon::cuda::check(cudaMemcpy(host.data(), buf.data(), host.size() * sizeof(T),
                                 cudaMemcpyDeviceToHost),
                      "cudaMemcpy");
  return host;
}

/// max |a - b| / max |b| over all entries.
template <class A, class B>
double relative_error(const std::vector<A>& a, const std::vector<B>& b) {
  double diff = 0, ref = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    ref = std::max(ref, std::abs(double(b[i])));
  }
  return ref > 0 ? diff / ref : diff;
}

// A parameter as both optimizers see it: its shape, layout and rule.
struct Spec {
  const char* name;
  index_t rows, cols;
  bool col_major, muon;
};
const Spec kSpecs[] = {
    {"square", 48, 48, false, true},   {"wide", 32, 80, false, true},
    {"tall", 96, 24, false, true},     {"tall.col_major", 40, 24, true, true},
    {"row_vector", 1, 37, false, true}, {"column_vector", 29, 1, false, true},
    {"empty", 0, 5, false, true},      {"bias", 1, 33, false, false},
    {"embedding", 50, 16, true, false},
};

template <class T, class S>
muon::MatrixView<T, S> as_view(T* data, const Spec& s) {
  return s.col_major ? muon::col_major_view<S>(data, s.rows, s.cols)
                     : muon::row_major_view<S>(data, s.rows, s.cols);
}

/// Five steps of the hybrid optimizer on the GPU and on the CPU from the same start; returns
/// the largest relative difference of any parameter.
template <class T>
double optimizer_difference(Precision precision, muon::GroupOptions options, int steps = 5) {
  std::mt19937 rng(7);
  CudaBackend gpu(muon::cuda::CudaOptions{precision});
  muon::Optimizer<muon::EigenBackend, T> cpu_opt(options);
  muon::Optimizer<CudaBackend, T> gpu_opt(options, {}, gpu);
  const std::size_t n = std::size(kSpecs);
  std::vector<std::vector<T>> cpu_w(n), cpu_g(n);
  std::vector<DeviceBuffer<T>> gpu_w(n), gpu_g(n);
  for (std::size_t i = 0; i < n; ++i) {
    const Spec& s = kSpecs[i];
    const auto size = static_cast<std::size_t>(s.rows * s.cols);
    cpu_w[i] = gaussian<T>(size, rng, 0.1);
    cpu_g[i].assign(size, T(0));
    gpu_w[i] = upload(gpu, cpu_w[i]);
    gpu_g[i] = upload(gpu, cpu_g[i]);
    auto add = [&](auto& opt, T* w, T* g, auto space) {
      using Sp = decltype(space);
      if (s.muon)
        opt.add_muon(s.name, as_view<T, Sp>(w, s), as_view<const T, Sp>(g, s));
      else
        opt.add_adamw(s.name, as_view<T, Sp>(w, s), as_view<const T, Sp>(g, s));
    };
    add(cpu_opt, cpu_w[i].data(), cpu_g[i].data(), muon::HostSpace{});
    add(gpu_opt, gpu_w[i].data(), gpu_g[i].data(), DeviceSpace{});
  }
  for (int step = 0; step < steps; ++step) {
    gpu.synchronize();  // the last step has finished reading the gradients
    for (std::size_t i = 0; i < n; ++i) {  // new gradients in the registered buffers
      const auto fresh = gaussian<T>(cpu_g[i].size(), rng);
      std::copy(fresh.begin(), fresh.end(), cpu_g[i].begin());
      if (!fresh.empty())
        muon::cuda::check(cudaMemcpy(gpu_g[i].data(), fresh.data(), fresh.size() * sizeof(T),
                                     cudaMemcpyHostToDevice),
                          "cudaMemcpy");
    }
    muon::cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cpu_opt.step();
    gpu_opt.step();
  }
  gpu.synchronize();
  double worst = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double e = relative_error(download(gpu_w[i]), cpu_w[i]);
    if (e > worst) worst = e;
  }
  return worst;
}

/// GPU orthogonalization (through the optimizer's workspace, any precision) of a random m x n
/// matrix against Newton-Schulz in double on the CPU: relative error of the result.
double newton_schulz_difference(Precision precision, index_t m, index_t n) {
  std::mt19937 rng(11);
  const auto g = gaussian<double>(static_cast<std::size_t>(m * n), rng);
  std::vector<double> ref(g.size());
  muon::EigenBackend cpu;
  muon::orthogonalize(cpu, muon::row_major_view<muon::HostSpace, const double>(g.data(), m, n),
                      muon::row_major_view(ref.data(), m, n));
  CudaBackend gpu(muon::cuda::CudaOptions{precision});
  const std::vector<float> gf(g.begin(), g.end());
  DeviceBuffer<float> in = upload(gpu, gf), out = upload(gpu, std::vector<float>(gf.size()));
  muon::orthogonalize(gpu, muon::row_major_view<DeviceSpace, const float>(in.data(), m, n),
                      muon::row_major_view<DeviceSpace>(out.data(), m, n));
  gpu.synchronize();
  return relative_error(download(out), ref);
}

void test_optimizer_matches_cpu() {
  muon::GroupOptions o;
  o.muon.lr = 0.02;
  o.adamw.lr = 3e-3;
  // Measured worst relative differences (H100): double ~1e-15, float ~1e-6, tf32 ~1e-3,
  // bf16 ~1e-2; the bounds leave 10x room. bf16 stores NS operands with 8 bits of mantissa.
  const double d = optimizer_difference<double>(Precision::native, o);
  std::printf("optimizer vs CPU: double %.3g\n", d);
  CHECK(d < 1e-12, "double %.3g", d);
  for (auto [p, bound] : {std::pair{Precision::native, 2e-5}, {Precision::tf32, 2e-2},
                          {Precision::bf16, 0.1}, {Precision::fp16, 0.05}}) {
    const double e = optimizer_difference<float>(p, o);
    std::printf("optimizer vs CPU: float, NS %s %.3g\n", muon::cuda::to_string(p), e);
    CHECK(e < bound, "float NS %s: %.3g >= %.3g", muon::cuda::to_string(p), e, bound);
  }
  // Every option path: sum momentum without Nesterov, RMS matching, Gram NS.
  o.muon.momentum_form = muon::MomentumForm::sum;
  o.muon.nesterov = false;
  o.muon.scale = muon::ScaleMode::match_rms_adamw;
  o.muon.newton_schulz.method = muon::NewtonSchulzMethod::gram;
  const double g = optimizer_difference<double>(Precision::native, o);
  std::printf("optimizer vs CPU: double, sum momentum, gram NS %.3g\n", g);
  CHECK(g < 1e-12, "double gram %.3g", g);
}

void test_newton_schulz_accuracy() {
  for (auto [m, n] : {std::pair<index_t, index_t>{256, 256}, {128, 512}, {512, 128}}) {
    for (auto [p, bound] : {std::pair{Precision::native, 1e-5}, {Precision::tf32, 1e-2},
                            {Precision::bf16, 0.05}, {Precision::fp16, 0.02}}) {
      const double e = newton_schulz_difference(p, m, n);
      std::printf("NS5 %ldx%ld %s vs CPU fp64: %.3g\n", long(m), long(n),
                  muon::cuda::to_string(p), e);
      CHECK(e < bound, "%ldx%ld %s: %.3g", long(m), long(n), muon::cuda::to_string(p), e);
    }
  }
}

/// A momentum-like input: rank 8 plus small noise, so the singular values spread from ~1 down
/// to ~1e-3 of the largest -- where 16-bit Gram iterations lose what the standard loop keeps.
std::vector<double> low_rank_plus_noise(index_t m, index_t n, std::mt19937& rng) {
  const index_t r = 8;
  const auto u = gaussian<double>(static_cast<std::size_t>(m * r), rng);
  const auto v = gaussian<double>(static_cast<std::size_t>(r * n), rng);
  auto g = gaussian<double>(static_cast<std::size_t>(m * n), rng, 1e-2);
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j)
      for (index_t l = 0; l < r; ++l) g[i * n + j] += u[i * r + l] * v[l * n + j] / double(n);
  return g;
}

/// Blocked symmetric products (CudaOptions::symmetric_blocks) and the 16-bit Gram form, each
/// against the CPU's fp64 standard loop, on Gaussian and on low-rank-plus-noise inputs.
void test_symmetric_blocks_and_gram() {
  using muon::NewtonSchulzMethod;
  std::mt19937 rng(21);
  for (auto [m, n] : {std::pair<index_t, index_t>{256, 256}, {256, 1024}, {1024, 256}}) {
    const std::vector<std::pair<const char*, std::vector<double>>> inputs = {
        {"gaussian", gaussian<double>(static_cast<std::size_t>(m * n), rng)},
        {"low-rank", low_rank_plus_noise(m, n, rng)}};
    for (const auto& [kind, g] : inputs) {
      std::vector<double> ref(g.size());
      muon::EigenBackend cpu;
      muon::NewtonSchulzOptions standard;
      standard.method = NewtonSchulzMethod::standard;
      muon::orthogonalize(cpu, muon::row_major_view<muon::HostSpace, const double>(g.data(), m, n),
                          muon::row_major_view(ref.data(), m, n), standard);
      const std::vector<float> gf(g.begin(), g.end());
      for (auto [p, bound] : {std::pair{Precision::bf16, 0.05}, {Precision::fp16, 0.02}}) {
        for (NewtonSchulzMethod method : {NewtonSchulzMethod::standard, NewtonSchulzMethod::gram}) {
          if (method == NewtonSchulzMethod::gram && m == n) continue;  // never chosen for squares
          for (int blocks : {1, 2, 4}) {
            CudaBackend gpu(muon::cuda::CudaOptions{p, blocks});
            DeviceBuffer<float> in = upload(gpu, gf), out = upload(gpu, std::vector<float>(gf.size()));
            muon::NewtonSchulzOptions o;
            o.method = method;
            muon::orthogonalize(gpu, muon::row_major_view<DeviceSpace, const float>(in.data(), m, n),
                                muon::row_major_view<DeviceSpace>(out.data(), m, n), o);
            gpu.synchronize();
            const double e = relative_error(download(out), ref);
            const char* name = method == NewtonSchulzMethod::gram ? "gram" : "standard";
            std::printf("NS5 %ldx%ld %s %s %s, %d blocks, vs CPU fp64: %.3g\n", long(m), long(n),
                        kind, muon::cuda::to_string(p), name, blocks, e);
            CHECK(e < bound, "%ldx%ld %s %s %s %d blocks: %.3g", long(m), long(n), kind,
                  muon::cuda::to_string(p), name, blocks, e);
          }
        }
      }
    }
  }
}

void test_batched_matches_single() {
  // Stacks in one call, each matrix against its own CPU fp64 NS: 6 experts of 64 x 160 (the
  // standard loop, then the Gram form) and 3 of 128 x 256 with symmetric products in 2 x 2 blocks.
  const auto schedule = muon::Schedule::keller().resolve(5);
  struct Stack {
    index_t batch, m, n;
    int blocks;
    muon::NewtonSchulzMethod method;
  };
  for (const Stack st : {Stack{6, 64, 160, 1, muon::NewtonSchulzMethod::standard},
                         Stack{6, 64, 160, 1, muon::NewtonSchulzMethod::gram},
                         Stack{3, 128, 256, 2, muon::NewtonSchulzMethod::standard}}) {
    const index_t batch = st.batch, m = st.m, n = st.n;
    std::mt19937 rng(5);
    const auto g = gaussian<float>(static_cast<std::size_t>(batch * m * n), rng);
    CudaBackend gpu(muon::cuda::CudaOptions{Precision::native, st.blocks});
    DeviceBuffer<float> in = upload(gpu, g), out = upload(gpu, std::vector<float>(g.size()));
    for (bool transposed : {false, true}) {  // also the n x m transposes: the short-side path
      auto vin = muon::row_major_view<DeviceSpace, const float>(in.data(), m, n);
      auto vout = muon::row_major_view<DeviceSpace>(out.data(), m, n);
      if (transposed) {
        vin = vin.transposed();
        vout = vout.transposed();
      }
      gpu.newton_schulz_batched(vin, m * n, vout, m * n, batch, schedule, 1.0, 1e-7,
                                Precision::bf16, st.method);
      gpu.synchronize();
      const auto got = download(out);
      muon::EigenBackend cpu;
      double worst = 0;
      for (index_t b = 0; b < batch; ++b) {
        std::vector<double> gin(g.begin() + b * m * n, g.begin() + (b + 1) * m * n), ref(gin.size());
        auto cin = muon::row_major_view<muon::HostSpace, const double>(gin.data(), m, n);
        auto cout = muon::row_major_view(ref.data(), m, n);
        if (transposed) {
          muon::orthogonalize(cpu, cin.transposed(), cout.transposed());
        } else {
          muon::orthogonalize(cpu, cin, cout);
        }
        std::vector<float> mine(got.begin() + b * m * n, got.begin() + (b + 1) * m * n);
        worst = std::max(worst, relative_error(mine, ref));
      }
      std::printf("batched bf16 NS5 %ldx(%ldx%ld) %s, %d blocks (%s) vs CPU fp64: %.3g\n",
                  long(batch), long(m), long(n),
                  st.method == muon::NewtonSchulzMethod::gram ? "gram" : "standard", st.blocks,
                  transposed ? "transposed" : "wide", worst);
      CHECK(worst < 0.05, "batched %.3g", worst);
    }
  }
  std::mt19937 rng(5);
  const index_t m = 64, n = 160;
  const auto g = gaussian<float>(static_cast<std::size_t>(m * n), rng);
  CudaBackend gpu;
  DeviceBuffer<float> in = upload(gpu, g), out = upload(gpu, std::vector<float>(g.size()));
  bool threw = false;
  try {
    gpu.newton_schulz_batched(muon::row_major_view<DeviceSpace, const float>(in.data(), m, n), 0,
                              muon::row_major_view<DeviceSpace>(out.data(), n, m), 0, 1,
                              schedule, 1.0, 1e-7, Precision::bf16);
  } catch (const muon::InvalidArgument& e) {
    threw = std::string(e.what()).find("output shape 160x64") != std::string::npos;
  }
  CHECK(threw, "a shape mismatch is refused naming the shapes");
}

/// With NonFinitePolicy::unchecked a step is pure stream work: capture it in a CUDA graph and
/// replay; the result equals steps run eagerly. Capture fails if step() allocates or syncs.
void test_graph_capture() {
  std::mt19937 rng(3);
  const index_t m = 64, n = 96;
  const auto w0 = gaussian<float>(m * n, rng, 0.1), g0 = gaussian<float>(m * n, rng);
  const auto b0 = gaussian<float>(n, rng, 0.1), gb = gaussian<float>(n, rng);
  muon::OptimizerOptions oo;
  oo.non_finite = muon::NonFinitePolicy::unchecked;
  for (Precision p : {Precision::native, Precision::bf16}) {
    CudaBackend eager_gpu(muon::cuda::CudaOptions{p}), graph_gpu(muon::cuda::CudaOptions{p});
    DeviceBuffer<float> we = upload(eager_gpu, w0), ge = upload(eager_gpu, g0);
    DeviceBuffer<float> be = upload(eager_gpu, b0), gbe = upload(eager_gpu, gb);
    DeviceBuffer<float> wg = upload(graph_gpu, w0), gg = upload(graph_gpu, g0);
    DeviceBuffer<float> bg = upload(graph_gpu, b0), gbg = upload(graph_gpu, gb);
    muon::Optimizer<CudaBackend, float> eager({}, oo, eager_gpu), graphed({}, oo, graph_gpu);
    eager.add_muon("w", muon::row_major_view<DeviceSpace>(we.data(), m, n),
                   muon::row_major_view<DeviceSpace, const float>(ge.data(), m, n));
    eager.add_adamw("b", muon::row_major_view<DeviceSpace>(be.data(), 1, n),
                    muon::row_major_view<DeviceSpace, const float>(gbe.data(), 1, n));
    graphed.add_muon("w", muon::row_major_view<DeviceSpace>(wg.data(), m, n),
                     muon::row_major_view<DeviceSpace, const float>(gg.data(), m, n));
    graphed.add_adamw("b", muon::row_major_view<DeviceSpace>(bg.data(), 1, n),
                      muon::row_major_view<DeviceSpace, const float>(gbg.data(), 1, n));
    eager.step();
    graphed.step();  // the first step may allocate (workspace growth); later ones must not
    graph_gpu.synchronize();
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    const cudaStream_t s = graph_gpu.stream();
    muon::cuda::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), "begin capture");
    bool captured = true;
    try {
      graphed.step();
    } catch (const std::exception& e) {
      std::printf("step() during capture: %s\n", e.what());
      captured = false;
    }
    const cudaError_t end = cudaStreamEndCapture(s, &graph);
    CHECK(captured && end == cudaSuccess, "capture of step() (%s): %s",
          muon::cuda::to_string(p), cudaGetErrorString(end));
    if (!captured || end != cudaSuccess) continue;
    muon::cuda::check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    // The adamw step count is baked into the graph (scalars by value); compare one replay
    // with one eager step, then Muon-only replays would drift from AdamW's bias correction.
    eager.step();
    muon::cuda::check(cudaGraphLaunch(exec, s), "cudaGraphLaunch");
    graph_gpu.synchronize();
    eager_gpu.synchronize();
    CHECK(download(we) == download(wg), "graph replay of the Muon step differs (%s)",
          muon::cuda::to_string(p));
    CHECK(download(be) == download(bg), "graph replay of the AdamW step differs (%s)",
          muon::cuda::to_string(p));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
}

void test_non_finite_refused_on_device() {
  CudaBackend gpu;
  std::vector<float> w(12, 1.f), g(12, 0.5f);
  g[7] = std::nanf("");
  DeviceBuffer<float> dw = upload(gpu, w), dg = upload(gpu, g);
  muon::Optimizer<CudaBackend, float> opt({}, {}, gpu);
  opt.add_muon("w", muon::row_major_view<DeviceSpace>(dw.data(), 3, 4),
               muon::row_major_view<DeviceSpace, const float>(dg.data(), 3, 4));
  bool threw = false;
  try {
    opt.step();
  } catch (const muon::NonFiniteGradient& e) {
    threw = e.parameter() == "w";
  }
  CHECK(threw, "a NaN gradient on the device is refused naming the parameter");
  CHECK(download(dw) == w, "the refused step changed the parameter");
  CHECK(opt.step_count() == 0, "the refused step was counted");
}

void test_borrowed_stream_and_handle() {
  cudaStream_t stream = nullptr;
  cublasHandle_t handle = nullptr;
  muon::cuda::check(cudaStreamCreate(&stream), "cudaStreamCreate");
  muon::cuda::check(cublasCreate(&handle), "cublasCreate");
  {
    CudaBackend gpu(stream, handle);
    CHECK(gpu.stream() == stream && gpu.handle() == handle, "the borrowed stream and handle");
    std::vector<float> w(64 * 32, 0.f), g(64 * 32, 1.f);
    DeviceBuffer<float> dw = upload(gpu, w), dg = upload(gpu, g);
    muon::Optimizer<CudaBackend, float> opt({}, {}, gpu);
    opt.add_muon("w", muon::row_major_view<DeviceSpace>(dw.data(), 64, 32),
                 muon::row_major_view<DeviceSpace, const float>(dg.data(), 64, 32));
    opt.step();
    gpu.synchronize();
    CHECK(download(dw) != w, "the step on the borrowed stream did nothing");
  }
  // Still ours and alive after the backend is gone.
  int version = 0;
  CHECK(cublasGetVersion(handle, &version) == CUBLAS_STATUS_SUCCESS, "handle destroyed");
  CHECK(cudaStreamSynchronize(stream) == cudaSuccess, "stream destroyed");
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
}

void test_state_round_trip() {
  // State saved from the GPU optimizer loads into a CPU one and continues identically in
  // double (the file format is the backend's business only through copy_to/from_host).
  std::mt19937 rng(9);
  const index_t m = 20, n = 30;
  const auto w0 = gaussian<double>(m * n, rng), g0 = gaussian<double>(m * n, rng);
  CudaBackend gpu;
  DeviceBuffer<double> dw = upload(gpu, w0), dg = upload(gpu, g0);
  muon::Optimizer<CudaBackend, double> gopt;
  gopt.add_muon("w", muon::col_major_view<DeviceSpace>(dw.data(), m, n),
                muon::col_major_view<DeviceSpace, const double>(dg.data(), m, n));
  std::vector<double> cw = w0, cg = g0;
  muon::Optimizer<muon::EigenBackend, double> copt;
  copt.add_muon("w", muon::col_major_view(cw.data(), m, n),
                muon::col_major_view<muon::HostSpace, const double>(cg.data(), m, n));
  gopt.step();
  copt.step();
  std::stringstream gs, cs;
  gopt.save_state(gs);
  copt.save_state(cs);
  const std::string gbytes = gs.str(), cbytes = cs.str();
  CHECK(gbytes.size() == cbytes.size(), "state sizes differ");
  muon::Optimizer<muon::EigenBackend, double> restored;
  std::vector<double> rw = download(dw);
  restored.add_muon("w", muon::col_major_view(rw.data(), m, n),
                    muon::col_major_view<muon::HostSpace, const double>(cg.data(), m, n));
  std::stringstream in(gbytes);
  restored.load_state(in);
  CHECK(restored.step_count() == 1, "step count restored");
  std::vector<double> mg(m * n), mc(m * n);
  gpu.copy_to_host(gopt.momentum_buffer({0}), mg.data());
  muon::EigenBackend().copy_to_host(copt.momentum_buffer({0}), mc.data());
  CHECK(relative_error(mg, mc) < 1e-15, "momentum on the GPU %.3g", relative_error(mg, mc));
}

/// MasterWeights on the GPU: bf16 parameters and gradients, fp32 masters. The masters follow
/// a plain fp32 optimizer on the widened values bit for bit; the parameters are their rounding.
void test_master_weights_bf16() {
  using bf16 = __nv_bfloat16;
  const index_t m = 48, n = 80;
  std::mt19937 rng(31);
  const auto narrow = [](const std::vector<float>& v) {
    std::vector<bf16> out(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = __float2bfloat16(v[i]);
    return out;
  };
  const auto widen = [](const std::vector<bf16>& v) {
    std::vector<float> out(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = __bfloat162float(v[i]);
    return out;
  };
  const auto w16h = narrow(gaussian<float>(m * n, rng, 0.1));
  CudaBackend gpu;
  DeviceBuffer<bf16> w16 = upload(gpu, w16h), g16 = upload(gpu, std::vector<bf16>(w16h.size()));
  DeviceBuffer<float> w32 = upload(gpu, widen(w16h)), g32 = upload(gpu, std::vector<float>(w16h.size()));
  muon::GroupOptions o;
  o.muon.lr = 0.02;
  muon::Optimizer<CudaBackend, float> inner(o, {}, gpu), plain(o, {}, gpu);
  muon::MasterWeights<CudaBackend, float, bf16> mixed(inner);
  const auto id = mixed.add_muon("w", muon::row_major_view<DeviceSpace>(w16.data(), m, n),
                                 muon::row_major_view<DeviceSpace, const bf16>(g16.data(), m, n));
  plain.add_muon("w", muon::row_major_view<DeviceSpace>(w32.data(), m, n),
                 muon::row_major_view<DeviceSpace, const float>(g32.data(), m, n));
  for (int step = 0; step < 3; ++step) {
    const auto g = narrow(gaussian<float>(m * n, rng));
    muon::cuda::check(cudaMemcpy(g16.data(), g.data(), g.size() * sizeof(bf16), cudaMemcpyHostToDevice), "cudaMemcpy");
    const auto gw = widen(g);
    muon::cuda::check(cudaMemcpy(g32.data(), gw.data(), gw.size() * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
    muon::cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    mixed.step();
    plain.step();
    gpu.synchronize();
  }
  const auto ref = download(w32);
  const auto got = download(w16);
  std::vector<float> master(ref.size());
  gpu.copy_to_host(mixed.master(id), master.data());
  std::size_t master_diff = 0, param_diff = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    master_diff += std::memcmp(&master[i], &ref[i], sizeof(float)) != 0;
    const bf16 r = __float2bfloat16(ref[i]);
    param_diff += std::memcmp(&got[i], &r, sizeof(bf16)) != 0;
  }
  std::printf("MasterWeights bf16: %zu master and %zu parameter entries differ from fp32\n",
              master_diff, param_diff);
  CHECK(master_diff == 0, "masters vs the fp32 run: %zu entries differ", master_diff);
  CHECK(param_diff == 0, "parameters vs the rounded fp32 run: %zu entries differ", param_diff);
  CHECK(relative_error(widen(w16h), ref) > 1e-3, "the parameters moved");
}

void test_bad_layout_refused() {
  CudaBackend gpu;
  DeviceBuffer<float> a = upload(gpu, std::vector<float>(64, 1.f)), c = upload(gpu, std::vector<float>(16, 0.f));
  // Every other row and column of an 8 x 8: neither row- nor column-major.
  const muon::MatrixView<const float, DeviceSpace> strided(a.data(), 4, 4, 16, 2);
  bool threw = false;
  try {
    gpu.gemm(1.f, strided, strided, 0.f, muon::row_major_view<DeviceSpace>(c.data(), 4, 4));
  } catch (const muon::InvalidArgument& e) {
    threw = std::string(e.what()).find("is neither row- nor column-major") != std::string::npos;
  }
  CHECK(threw, "a view cuBLAS cannot read is refused, naming its strides");
  bool refused = false;
  try {
    CudaBackend bad(muon::cuda::CudaOptions{Precision::bf16, -1});
  } catch (const muon::InvalidArgument& e) {
    refused = std::string(e.what()).find("symmetric_blocks must be >= 0") != std::string::npos;
  }
  CHECK(refused, "a negative block count is refused, naming the option");
}

}  // namespace

/// Rank-deficient inputs (rank 1, a zero row, all zeros) through every precision and method at
/// many steps: the result is finite and within the schedule's singular-value bound (plus the
/// storage's rounding), as on the CPU (docs/newton_schulz.md).
void test_low_rank_stays_bounded() {
  using muon::NewtonSchulzMethod;
  std::mt19937 rng(31);
  for (auto [m, n] : {std::pair<index_t, index_t>{32, 128}, {128, 32}, {48, 48}}) {
    const auto u = gaussian<double>(static_cast<std::size_t>(m), rng);
    const auto v = gaussian<double>(static_cast<std::size_t>(n), rng);
    std::vector<float> rank1(static_cast<std::size_t>(m * n)), zero_row;
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) rank1[i * n + j] = static_cast<float>(u[i] * v[j]);
    zero_row = gaussian<float>(rank1.size(), rng);
    std::fill_n(zero_row.begin() + (m / 2) * n, n, 0.0f);
    for (const auto& [kind, g] : {std::pair{"rank 1", rank1}, {"zero row", zero_row}}) {
      for (auto [p, slack] : {std::pair{Precision::native, 1e-3}, {Precision::tf32, 2e-2},
                              {Precision::bf16, 0.1}, {Precision::fp16, 5e-2}}) {
        for (auto method : {NewtonSchulzMethod::standard, NewtonSchulzMethod::gram}) {
          for (auto [schedule, steps] : {std::pair{muon::Schedule::keller(), 10},
                                         {muon::Schedule::keller(), 72},
                                         {muon::Schedule::textbook(), 20}}) {
            CudaBackend gpu(muon::cuda::CudaOptions{p});
            DeviceBuffer<float> in = upload(gpu, g), out = upload(gpu, std::vector<float>(g.size()));
            muon::NewtonSchulzOptions o;
            o.schedule = schedule;
            o.steps = steps;
            o.method = method;
            muon::orthogonalize(gpu, muon::row_major_view<DeviceSpace, const float>(in.data(), m, n),
                                muon::row_major_view<DeviceSpace>(out.data(), m, n), o);
            gpu.synchronize();
            const auto result = download(out);
            const bool finite = std::all_of(result.begin(), result.end(),
                                            [](float x) { return std::isfinite(x); });
            const double bound = muon::singular_value_bound(schedule.resolve(steps)).output;
            double s_max = 0;
            if (finite) {
              Eigen::MatrixXd r(m, n);
              for (index_t i = 0; i < m; ++i)
                for (index_t j = 0; j < n; ++j) r(i, j) = result[i * n + j];
              s_max = muon::reference::singular_values(r).maxCoeff();
            }
            CHECK(finite && s_max <= bound + slack, "%ldx%ld %s %s %s %s %d steps: %s, s_max %.4g",
                  long(m), long(n), kind, muon::cuda::to_string(p),
                  method == NewtonSchulzMethod::gram ? "gram" : "standard",
                  schedule.name().c_str(), steps, finite ? "finite" : "NOT finite", s_max);
          }
        }
      }
    }
  }
}

/// The same input gives the same bits twice: the Frobenius norm adds its partial sums in a
/// fixed order (no atomics), and cuBLAS is deterministic for a fixed size and stream.
void test_deterministic_run_to_run() {
  const index_t m = 1024, n = 2048;  // 2M entries: thousands of blocks' partial sums
  std::mt19937 rng(5);
  const auto g = gaussian<float>(static_cast<std::size_t>(m * n), rng);
  for (Precision p : {Precision::native, Precision::tf32, Precision::bf16}) {
    CudaBackend gpu(muon::cuda::CudaOptions{p});
    DeviceBuffer<float> in = upload(gpu, g);
    std::vector<std::vector<float>> results;
    for (int run = 0; run < 2; ++run) {
      DeviceBuffer<float> out = upload(gpu, std::vector<float>(g.size()));
      muon::orthogonalize(gpu, muon::row_major_view<DeviceSpace, const float>(in.data(), m, n),
                          muon::row_major_view<DeviceSpace>(out.data(), m, n));
      gpu.synchronize();
      results.push_back(download(out));
    }
    CHECK(std::memcmp(results[0].data(), results[1].data(), g.size() * sizeof(float)) == 0,
          "%s: two runs on the same input differ", muon::cuda::to_string(p));
  }
}

void test_grouped_step_matches_one_by_one() {
  // Six 64 x 160 matrices (one stack: strided-batched products) and a 48 x 48 one, in fp32 and
  // TF32, grouped (the default) against grouped = false (SYRK/SYMM one matrix at a time):
  // other kernels, so within float rounding, not bit for bit.
  for (Precision precision : {Precision::native, Precision::tf32}) {
    std::mt19937 rng(11);
    CudaBackend gpu(muon::cuda::CudaOptions{precision});
    std::vector<DeviceBuffer<float>> a, b, g;
    std::vector<std::pair<index_t, index_t>> shapes(6, {64, 160});
    shapes.push_back({48, 48});
    muon::OptimizerOptions one_by_one;
    one_by_one.grouped = false;
    muon::GroupOptions options;
    options.muon.lr = 0.02;
    muon::Optimizer<CudaBackend, float> grouped(options, {}, gpu), loop(options, one_by_one, gpu);
    for (const auto& [m, n] : shapes) {
      const auto w = gaussian<float>(static_cast<std::size_t>(m * n), rng);
      a.push_back(upload(gpu, w));
      b.push_back(upload(gpu, w));
      g.push_back(upload(gpu, gaussian<float>(w.size(), rng)));
      const auto name = "w" + std::to_string(a.size());
      const auto grad = muon::row_major_view<DeviceSpace, const float>(g.back().data(), m, n);
      grouped.add_muon(name, muon::row_major_view<DeviceSpace>(a.back().data(), m, n), grad);
      loop.add_muon(name, muon::row_major_view<DeviceSpace>(b.back().data(), m, n), grad);
    }
    for (int s = 0; s < 3; ++s) {
      grouped.step();
      loop.step();
    }
    gpu.synchronize();
    double worst = 0;
    for (std::size_t i = 0; i < a.size(); ++i)
      worst = std::max(worst, relative_error(download(a[i]), download(b[i])));
    CHECK(worst < (precision == Precision::tf32 ? 2e-3 : 1e-4),
          "%s: grouped against one by one differ by %.3g", muon::cuda::to_string(precision), worst);
  }
}

/// Runs every test, or those named on the command line (scripts/gpu_check.sh runs a few
/// under compute-sanitizer).
int main(int argc, char** argv) {
  if (!muon::cuda::device_available()) {
    std::printf("no CUDA device visible: skipped\n");
    return 77;
  }
  const std::pair<const char*, std::function<void()>> tests[] = {
      {"optimizer_matches_cpu", test_optimizer_matches_cpu},
      {"newton_schulz_accuracy", test_newton_schulz_accuracy},
      {"symmetric_blocks_and_gram", test_symmetric_blocks_and_gram},
      {"low_rank_stays_bounded", test_low_rank_stays_bounded},
      {"batched_matches_single", test_batched_matches_single},
      {"grouped_step_matches_one_by_one", test_grouped_step_matches_one_by_one},
      {"graph_capture", test_graph_capture},
      {"non_finite_refused_on_device", test_non_finite_refused_on_device},
      {"borrowed_stream_and_handle", test_borrowed_stream_and_handle},
      {"state_round_trip", test_state_round_trip},
      {"master_weights_bf16", test_master_weights_bf16},
      {"bad_layout_refused", test_bad_layout_refused},
      {"deterministic_run_to_run", test_deterministic_run_to_run},
  };
  const std::vector<std::string> only(argv + 1, argv + argc);
  for (const auto& [name, run] : tests) {
    if (!only.empty() && std::find(only.begin(), only.end(), name) == only.end()) continue;
    const int before = failures;
    try {
      run();
    } catch (const std::exception& e) {
      ++failures;
      std::printf("FAILED %s: threw %s\n", name, e.what());
    }
    std::printf("%s %s\n", failures == before ? "ok    " : "FAILED", name);
  }
  return failures == 0 ? 0 : 1;
}
