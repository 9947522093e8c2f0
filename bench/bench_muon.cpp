// Google Benchmark suite: Newton-Schulz speed per shape, schedule and precision, a whole
// optimizer step for a GPT-2-small-like model, each with its in-run baseline.
//
//   ./build/bench/muon_bench --benchmark_filter=NewtonSchulz/.*float
//
// Counters: GFLOPS at the nominal 4k^2N + 2k^3 flops per NS step (k = min, N = max side);
// gemm_ratio = that rate / the rate of a k x N by N x k GEMM through the same backend, timed in
// the same process just before; step_over_ns = time of step() / time of its NS calls alone
// (run side by side as step() runs them); grouped_speedup = time of a step run one matrix after
// the other (OptimizerOptions::grouped = false) / time of the same step side by side.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <map>
#include <random>
#include <tuple>

#include "muon/eigen.hpp"

namespace {

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
Mat<T> gaussian(muon::index_t m, muon::index_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  return Mat<T>::NullaryExpr(m, n, [&] { return static_cast<T>(d(rng)); });
}

template <class F>
double seconds(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// The best of `repeat` timed runs after an untimed one.
template <class F>
double best_seconds(int repeat, F&& f) {
  f();
  double best = 1e30;
  for (int r = 0; r < repeat; ++r) best = std::min(best, seconds(f));
  return best;
}

/// Times `a` and `b` once each per benchmark iteration, alternately (so both see the same
/// machine), after one untimed run of each; returns the best time of each.
template <class A, class B>
std::pair<double, double> best_alternating(benchmark::State& state, A&& a, B&& b) {
  a();
  b();
  double best_a = std::numeric_limits<double>::infinity(), best_b = best_a;
  for (auto _ : state) {
    best_a = std::min(best_a, seconds(a));
    best_b = std::min(best_b, seconds(b));
  }
  return {best_a, best_b};
}

/// GFLOP/s of a k x N by N x k GEMM through the Eigen backend (cached per size and type).
template <class T>
double gemm_gflops(muon::index_t k, muon::index_t n) {
  static std::map<std::pair<muon::index_t, muon::index_t>, double> cache;
  auto it = cache.find({k, n});
  if (it != cache.end()) return it->second;
  muon::EigenBackend backend;
  const Mat<T> a = gaussian<T>(k, n, 1), b = gaussian<T>(n, k, 2);
  Mat<T> c(k, k);
  const double s = best_seconds(3, [&] {
    backend.gemm(T(1), muon::MatrixView<const T>(muon::view(a)),
                 muon::MatrixView<const T>(muon::view(b)), T(0), muon::view(c));
  });
  return cache[{k, n}] = 2.0 * double(k) * double(k) * double(n) / s * 1e-9;
}

double ns_flops(muon::index_t m, muon::index_t n, int steps) {
  const double k = double(std::min(m, n)), big = double(std::max(m, n));
  return steps * (4 * k * k * big + 2 * k * k * k);
}

const char* kSchedules[] = {"keller", "you", "polar_express", "textbook"};
const muon::NewtonSchulzMethod kMethods[] = {muon::NewtonSchulzMethod::automatic,
                                             muon::NewtonSchulzMethod::standard};

/// Args: rows, cols, schedule index, steps, batch, method (0 automatic, 1 standard).
template <class T>
void NewtonSchulz(benchmark::State& state) {
  const muon::index_t m = state.range(0), n = state.range(1);
  const int steps = int(state.range(3)), batch = int(state.range(4));
  muon::NewtonSchulzOptions o;
  o.schedule = muon::Schedule::from_name(kSchedules[state.range(2)]);
  o.steps = steps;
  o.method = kMethods[state.range(5)];
  const auto schedule = o.schedule.resolve(steps);
  muon::EigenBackend backend;
  std::vector<Mat<T>> inputs;
  for (int i = 0; i < batch; ++i) inputs.push_back(gaussian<T>(m, n, 10 + unsigned(i)));
  muon::NewtonSchulzWorkspace<muon::EigenBackend, T> ws;
  ws.reserve(backend, m, n, o.method);
  const double gemm = gemm_gflops<T>(std::min(m, n), std::max(m, n));
  double elapsed = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    for (const auto& x : inputs) {
      backend.copy(muon::MatrixView<const T>(muon::view(x)), ws.input(backend, m, n));
      auto out = ws.run(backend, m, n, schedule, o.schedule.norm_scale(), o.eps, o.method);
      benchmark::DoNotOptimize(out.data());
    }
    elapsed += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  const double gflops = ns_flops(m, n, steps) * batch * double(state.iterations()) / elapsed * 1e-9;
  state.counters["GFLOPS"] = gflops;
  state.counters["gemm_GFLOPS"] = gemm;
  state.counters["gemm_ratio"] = gflops / gemm;
}

void ShapeArgs(benchmark::internal::Benchmark* b) {
  const std::tuple<int, int, int> shapes[] = {{1024, 1024, 1}, {2048, 2048, 1}, {1024, 4096, 1},
                                              {4096, 1024, 1}, {768, 3072, 1},  {4096, 4096, 1},
                                              {256, 1024, 64}};
  for (auto [m, n, batch] : shapes)
    for (int schedule : {0, 2})
      for (int method : {0, 1}) b->Args({m, n, schedule, 5, batch, method});
  b->ArgNames({"m", "n", "schedule", "steps", "batch", "standard"});
  b->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.5);
}

/// GPT-2 small: 12 blocks of {768x2304, 768x768, 768x3072, 3072x768} on Muon; AdamW on the
/// blocks' 768/2304/3072 vectors and a 50257 x 768 embedding. Argument: the NonFinitePolicy
/// (0 error, the default, which checks gradients and Newton-Schulz results; 2 unchecked).
template <class T>
void Gpt2SmallStep(benchmark::State& state) {
  struct Tensor {
    Mat<T> value, grad;
  };
  std::vector<Tensor> muon_params, adamw_params;
  unsigned seed = 1;
  for (int block = 0; block < 12; ++block) {
    for (auto [r, c] : {std::pair{768, 2304}, {768, 768}, {768, 3072}, {3072, 768}})
      muon_params.push_back({gaussian<T>(r, c, seed++) * T(0.02), gaussian<T>(r, c, seed++)});
    for (int len : {768, 768, 2304, 768, 768, 768, 3072, 768})
      adamw_params.push_back({gaussian<T>(1, len, seed++), gaussian<T>(1, len, seed++)});
  }
  adamw_params.push_back({gaussian<T>(50257, 768, seed++), gaussian<T>(50257, 768, seed++)});
  muon::Optimizer<muon::EigenBackend, T> opt(
      {}, {static_cast<muon::NonFinitePolicy>(state.range(0))});
  for (std::size_t i = 0; i < muon_params.size(); ++i)
    opt.add_muon(std::string("w") + std::to_string(i), muon_params[i].value, muon_params[i].grad);
  for (std::size_t i = 0; i < adamw_params.size(); ++i)
    opt.add_adamw(std::string("v") + std::to_string(i), adamw_params[i].value, adamw_params[i].grad);

  // The NS calls of one step alone, through the same backend and method, spread over the
  // workers as step() spreads them (the matrices side_by_side_fits() accepts).
  muon::EigenBackend backend;
  std::vector<muon::NewtonSchulzWorkspace<muon::EigenBackend, T>> ws(std::size_t(backend.workers()));
  const muon::NewtonSchulzOptions o;
  const auto schedule = o.schedule.resolve(o.steps);
  for (auto& w : ws)
    for (auto& p : muon_params) w.reserve(backend, p.value.rows(), p.value.cols(), o.method);
  const auto orthogonalize = [&](const Tensor& p, muon::NewtonSchulzWorkspace<muon::EigenBackend, T>& w) {
    const auto r = p.value.rows(), c = p.value.cols();
    backend.copy(muon::MatrixView<const T>(muon::view(p.grad)), w.input(backend, r, c));
    (void)w.run(backend, r, c, schedule, o.schedule.norm_scale(), o.eps, o.method);
  };
  const double ns_only = best_seconds(2, [&] {
    std::vector<const Tensor*> spread;
    for (auto& p : muon_params)
      if (backend.side_by_side_fits(p.value.rows(), p.value.cols()) && ws.size() > 1)
        spread.push_back(&p);
      else
        orthogonalize(p, ws[0]);
    backend.side_by_side(spread.size(), [&](std::size_t i, int worker) {
      orthogonalize(*spread[i], ws[std::size_t(worker)]);
    });
  });
  // Best step against best NS pass, both after a first run (which touches the state).
  double best = std::numeric_limits<double>::infinity();
  for (auto _ : state) best = std::min(best, seconds([&] { opt.step(); }));
  state.counters["ns_only_ms"] = ns_only * 1e3;
  state.counters["step_ms"] = best * 1e3;
  state.counters["step_over_ns"] = best / ns_only;
}

/// Args: count, rows, cols. A Muon step over `count` matrices of rows x cols, side by side
/// against one after the other, both timed in this run (best of the iterations each).
template <class T>
void GroupedStep(benchmark::State& state) {
  const auto count = std::size_t(state.range(0));
  const muon::index_t m = state.range(1), n = state.range(2);
  std::vector<Mat<T>> w, v, g;
  for (std::size_t i = 0; i < count; ++i) {
    w.push_back(gaussian<T>(m, n, 100 + unsigned(i)) * T(0.02));
    v.push_back(w.back());
    g.push_back(gaussian<T>(m, n, 200 + unsigned(i)));
  }
  muon::OptimizerOptions one_by_one;
  one_by_one.grouped = false;
  muon::Optimizer<muon::EigenBackend, T> grouped, loop({}, one_by_one);
  for (std::size_t i = 0; i < count; ++i) {
    grouped.add_muon("w" + std::to_string(i), w[i], g[i]);
    loop.add_muon("w" + std::to_string(i), v[i], g[i]);
  }
  const auto [best_grouped, best_loop] =
      best_alternating(state, [&] { grouped.step(); }, [&] { loop.step(); });
  state.counters["grouped_ms"] = best_grouped * 1e3;
  state.counters["loop_ms"] = best_loop * 1e3;
  state.counters["grouped_speedup"] = best_loop / best_grouped;
}

/// Arg: a matrix rule's id. One step of that rule against one of Muon, alternating in this
/// run, over one GPT-2-small block's matrices (768x2304, 768x768, 768x3072, 3072x768), each
/// rule with its defaults and 5 Newton-Schulz steps (keller for both, so that only the rule
/// differs).
template <class T>
void RuleStep(benchmark::State& state) {
  const auto id = static_cast<muon::UpdateRule>(state.range(0));
  std::vector<Mat<T>> w, v, g;
  unsigned seed = 7;
  for (auto [r, c] : {std::pair{768, 2304}, {768, 768}, {768, 3072}, {3072, 768}}) {
    w.push_back(gaussian<T>(r, c, seed++) * T(0.02));
    v.push_back(w.back());
    g.push_back(gaussian<T>(r, c, seed++));
  }
  muon::GroupOptions options;
  muon::rules::All::for_each([&](auto rule) {
    using R = decltype(rule);
    if constexpr (R::orthogonalizes) R::options(options).newton_schulz = {};
  });
  muon::Optimizer<muon::EigenBackend, T> ruled(options), plain(options);
  muon::rules::All::visit(id, [&](auto rule) {
    for (std::size_t i = 0; i < w.size(); ++i) {
      ruled.add(rule, "w" + std::to_string(i), w[i], g[i]);
      plain.add_muon("w" + std::to_string(i), v[i], g[i]);
    }
  });
  const auto [best_rule, best_muon] =
      best_alternating(state, [&] { ruled.step(); }, [&] { plain.step(); });
  state.SetLabel(muon::rules::All::describe(static_cast<std::uint8_t>(id)));
  state.counters["rule_ms"] = best_rule * 1e3;
  state.counters["muon_ms"] = best_muon * 1e3;
  state.counters["over_muon"] = best_rule / best_muon;
}

/// Args: count, rows, cols. Newton-Schulz alone on `count` matrices: one after the other on
/// the BLAS's threads against side by side on the workers, one BLAS thread each (what
/// side_by_side_fits() decides between), both timed in this run, whatever the size.
template <class T>
void SideBySideNewtonSchulz(benchmark::State& state) {
  const auto count = std::size_t(state.range(0));
  const muon::index_t m = state.range(1), n = state.range(2);
  muon::EigenBackend backend;
  std::vector<Mat<T>> inputs;
  for (std::size_t i = 0; i < count; ++i) inputs.push_back(gaussian<T>(m, n, 300 + unsigned(i)));
  std::vector<muon::NewtonSchulzWorkspace<muon::EigenBackend, T>> ws(std::size_t(backend.workers()));
  for (auto& w : ws) w.reserve(backend, m, n);
  const muon::NewtonSchulzOptions o;
  const auto schedule = o.schedule.resolve(o.steps);
  const auto run = [&](std::size_t i, muon::NewtonSchulzWorkspace<muon::EigenBackend, T>& w) {
    backend.copy(muon::MatrixView<const T>(muon::view(inputs[i])), w.input(backend, m, n));
    (void)w.run(backend, m, n, schedule, o.schedule.norm_scale(), o.eps, o.method);
  };
  const auto [best_loop, best_spread] = best_alternating(
      state, [&] { for (std::size_t i = 0; i < count; ++i) run(i, ws[0]); },
      [&] { backend.side_by_side(count, [&](std::size_t i, int w) { run(i, ws[std::size_t(w)]); }); });
  state.counters["one_by_one_ms"] = best_loop * 1e3;
  state.counters["side_by_side_ms"] = best_spread * 1e3;
  state.counters["speedup"] = best_loop / best_spread;
}

}  // namespace

BENCHMARK_TEMPLATE(NewtonSchulz, float)->Apply(ShapeArgs);
BENCHMARK_TEMPLATE(NewtonSchulz, double)->Apply(ShapeArgs);
BENCHMARK_TEMPLATE(Gpt2SmallStep, float)
    ->Arg(0)
    ->Arg(2)
    ->ArgName("policy")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);
BENCHMARK_TEMPLATE(GroupedStep, float)
    ->Args({64, 128, 512})
    ->Args({64, 256, 1024})
    ->Args({16, 512, 2048})
    ->Args({12, 768, 3072})
    ->Args({4, 2048, 2048})
    ->Args({2, 64, 64})
    ->ArgNames({"count", "m", "n"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);

BENCHMARK_TEMPLATE(RuleStep, float)
    ->Arg(static_cast<int>(muon::rules::NorMuon::id))
    ->Arg(static_cast<int>(muon::rules::PolarGrad::id))
    ->Arg(static_cast<int>(muon::rules::AdaMuon::id))
    ->Arg(static_cast<int>(muon::rules::Namo::id))
    ->ArgName("rule")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);

BENCHMARK_TEMPLATE(SideBySideNewtonSchulz, float)
    ->Args({4, 512, 2048})
    ->Args({4, 768, 3072})
    ->Args({4, 1024, 4096})
    ->Args({4, 4096, 1024})
    ->Args({4, 2048, 2048})
    ->ArgNames({"count", "m", "n"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);

int main(int argc, char** argv) {
  muon::EigenBackend::link_eigen_products();  // so that MUON_PRODUCTS=eigen can compare engines
  // The header names what the products ran on, so a slow table explains itself.
  // (float Newton-Schulz: bf16 or float32 products; MUON_NS_PRECISION=float32 pins float32)
  benchmark::AddCustomContext("muon_products", muon::EigenBackend().engine());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
