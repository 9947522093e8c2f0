// muon-cli: Muon on your own matrices, from .npy files.
//
//   muon-cli orthogonalize IN.npy OUT.npy [--schedule S] [--steps N] [--dtype D] [--tolerance X]
//   muon-cli accuracy [--shape MxN]... [--schedule S]... [--steps N]... [--dtype D]...
//                     [--tolerance X]
//   muon-cli bench [--shape MxN]... [--steps N] [--schedule S] [--dtype D] [--repeat R]
//   muon-cli step --param P.npy --grad G1.npy [--grad G2.npy ...] --out OUT.npy [options]
//
// Any bad input ends with one line on stderr ("muon-cli: error: ...") and exit status 1.
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "muon/eigen.hpp"
#include "muon/io/npy.hpp"

namespace {

constexpr const char* kUsage = R"(usage:
  muon-cli orthogonalize IN.npy OUT.npy [--schedule keller|you|polar_express|textbook]
                                        [--steps N] [--dtype float32|float64] [--tolerance X]
  muon-cli accuracy [--shape MxN]... [--schedule S]... [--steps N]... [--dtype D]...
                    [--tolerance X]
  muon-cli bench [--shape MxN]... [--steps N] [--schedule S] [--dtype D] [--repeat R]
  muon-cli step --param P.npy --grad G1.npy [--grad G2.npy ...] --out OUT.npy [--lr X]
                [--momentum X] [--nesterov on|off] [--weight-decay X]
                [--scale original|match_rms_adamw|spectral|none] [--momentum-form ema|sum]
                [--schedule S] [--steps N] [--dtype D]
An N-D array (N > 2) is treated as the (shape[0], product of the rest) matrix.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Positional arguments and repeated --key value options, checked against an allowed list.
struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::vector<std::string>> options;

  Args(int argc, char** argv, int first, const std::vector<std::string>& allowed) {
    for (int i = first; i < argc; ++i) {
      const std::string a = argv[i];
      if (a.rfind("--", 0) != 0) {
        positional.push_back(a);
        continue;
      }
      if (std::find(allowed.begin(), allowed.end(), a) == allowed.end())
        throw UsageError("unknown option '" + a + "'");
      if (i + 1 >= argc) throw UsageError("option '" + a + "' needs a value");
      options[a].push_back(argv[++i]);
    }
  }
  std::vector<std::string> all(const std::string& key) const {
    auto it = options.find(key);
    return it == options.end() ? std::vector<std::string>{} : it->second;
  }
  std::string one(const std::string& key, const std::string& fallback) const {
    auto v = all(key);
    if (v.size() > 1) throw UsageError("option '" + key + "' given more than once");
    return v.empty() ? fallback : v.front();
  }
};

double parse_number(const std::string& key, const std::string& text) {
  double v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size())
    throw UsageError("option '" + key + "' expects a number, got '" + text + "'");
  return v;
}

int parse_int(const std::string& key, const std::string& text) {
  int v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size())
    throw UsageError("option '" + key + "' expects an integer, got '" + text + "'");
  return v;
}

bool parse_on_off(const std::string& key, const std::string& text) {
  if (text == "on") return true;
  if (text == "off") return false;
  throw UsageError("option '" + key + "' expects on or off, got '" + text + "'");
}

void check_dtype(const std::string& d) {
  if (d != "float32" && d != "float64")
    throw UsageError("--dtype must be float32 or float64, got '" + d + "'");
}

std::pair<muon::index_t, muon::index_t> matrix_shape(const std::vector<muon::index_t>& shape,
                                                     const std::string& file) {
  if (shape.size() < 2)
    throw UsageError(file + ": needs a matrix (2 or more dimensions), got shape " +
                     muon::detail::shape_string(shape));
  muon::TensorView<const float> t{nullptr, shape};
  return {t.flattened().rows(), t.flattened().cols()};
}

/// --tolerance X: textbook steps after the schedule until the residual is at most X (at most
/// the library's default cap of extra steps); 0 = off.
muon::NewtonSchulzOptions ns_options(const std::string& schedule, int steps, double tolerance = 0) {
  muon::NewtonSchulzOptions o;
  o.schedule = muon::Schedule::from_name(schedule);
  o.steps = steps;
  o.tolerance = tolerance;
  muon::validate(o, "--schedule/--steps/--tolerance");
  return o;
}

/// Refuses a matrix holding NaN or Inf, naming the file and the first such entry: Newton-Schulz
/// of it would be all NaN.
template <class T>
void require_finite(const std::vector<T>& data, const std::string& file) {
  const auto bad = std::find_if(data.begin(), data.end(), [](T v) { return !std::isfinite(v); });
  if (bad != data.end())
    throw std::runtime_error(file + ": entry " + std::to_string(bad - data.begin()) + " (row-major) is " +
                     std::to_string(*bad) + "; the input must be finite");
}

// ---- orthogonalize ----------------------------------------------------------------------
template <class T>
void orthogonalize(const std::string& in, const std::string& out,
                   const muon::NewtonSchulzOptions& o) {
  auto a = muon::npy::read<T>(in);
  const auto [rows, cols] = matrix_shape(a.shape, in);
  require_finite(a.data, in);
  std::vector<T> result(a.data.size());
  muon::EigenBackend backend;
  muon::orthogonalize(backend, muon::row_major_view<muon::HostSpace, const T>(a.data.data(), rows, cols),
                      muon::row_major_view(result.data(), rows, cols), o);
  muon::npy::write(out, a.shape, result.data());
}

int cmd_orthogonalize(int argc, char** argv) {
  Args args(argc, argv, 2, {"--schedule", "--steps", "--dtype", "--tolerance"});
  if (args.positional.size() != 2) throw UsageError("orthogonalize needs IN.npy and OUT.npy");
  const auto o = ns_options(args.one("--schedule", "keller"),
                            parse_int("--steps", args.one("--steps", "5")),
                            parse_number("--tolerance", args.one("--tolerance", "0")));
  const std::string dtype = args.one("--dtype", "float32");
  check_dtype(dtype);
  if (dtype == "float32")
    orthogonalize<float>(args.positional[0], args.positional[1], o);
  else
    orthogonalize<double>(args.positional[0], args.positional[1], o);
  return 0;
}

std::vector<std::pair<muon::index_t, muon::index_t>> parse_shapes(
    const std::vector<std::string>& shapes) {
  std::vector<std::pair<muon::index_t, muon::index_t>> dims;
  for (const auto& s : shapes) {
    const auto x = s.find('x');
    if (x == std::string::npos) throw UsageError("--shape expects MxN, got '" + s + "'");
    const int m = parse_int("--shape", s.substr(0, x)), n = parse_int("--shape", s.substr(x + 1));
    if (m < 1 || n < 1) throw UsageError("--shape extents must be >= 1, got '" + s + "'");
    dims.emplace_back(m, n);
  }
  return dims;
}

template <class T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> random_matrix(muon::index_t m,
                                                                                muon::index_t n) {
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> normal;
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> x(m, n);
  for (muon::index_t i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(normal(rng));
  return x;
}

// ---- accuracy ---------------------------------------------------------------------------
template <class T>
void accuracy_row(muon::index_t m, muon::index_t n, const std::string& dtype,
                  const std::string& schedule, int steps, double tolerance) {
  const auto x = random_matrix<T>(m, n);
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> o(m, n);
  muon::EigenBackend backend;
  muon::NewtonSchulzReport report;
  muon::orthogonalize(backend, muon::MatrixView<const T>(muon::view(x)), muon::view(o),
                      ns_options(schedule, steps, tolerance), &report);
  const auto r = muon::orthogonality(muon::MatrixView<const T>(muon::view(o)),
                                     muon::MatrixView<const T>(muon::view(x)));
  std::printf("%-11s %-8s %-14s %5d %9.4f %9.4f %9.4f %11.3e %10.3e %5d\n",
              (std::to_string(m) + "x" + std::to_string(n)).c_str(), dtype.c_str(),
              schedule.c_str(), steps, r.s_min, r.s_max, r.max_deviation, r.msign_distance,
              report.residual, report.steps);
}

int cmd_accuracy(int argc, char** argv) {
  Args args(argc, argv, 2, {"--shape", "--schedule", "--steps", "--dtype", "--tolerance"});
  if (!args.positional.empty()) throw UsageError("accuracy takes no positional arguments");
  const double tolerance = parse_number("--tolerance", args.one("--tolerance", "0"));
  auto shapes = args.all("--shape");
  auto schedules = args.all("--schedule");
  auto steps = args.all("--steps");
  auto dtypes = args.all("--dtype");
  if (shapes.empty()) shapes = {"256x256", "256x1024", "1024x256"};
  if (schedules.empty()) schedules = {"keller", "you", "polar_express", "textbook"};
  if (steps.empty()) steps = {"5"};
  if (dtypes.empty()) dtypes = {"float32"};
  const auto dims = parse_shapes(shapes);
  for (const auto& d : dtypes) check_dtype(d);
  for (const auto& s : schedules)
    for (const auto& k : steps) (void)ns_options(s, parse_int("--steps", k), tolerance);
  std::printf("Newton-Schulz accuracy on Gaussian random matrices (seed 1234); singular values of\n"
              "the result (1 = orthogonal) and ||O - msign(X)||_F / sqrt(min(m,n)) by SVD in double;\n"
              "residual = ||O O^T - I||_F / sqrt(min(m,n)) as the library measures it, and the\n"
              "steps it ran (more than asked where --tolerance added textbook steps)\n");
  std::printf("%-11s %-8s %-14s %5s %9s %9s %9s %11s %10s %5s\n", "shape", "dtype", "schedule",
              "steps", "s_min", "s_max", "max|s-1|", "dist_msign", "residual", "ran");
  for (auto [m, n] : dims)
    for (const auto& d : dtypes)
      for (const auto& s : schedules)
        for (const auto& k : steps) {
          if (d == "float32")
            accuracy_row<float>(m, n, d, s, parse_int("--steps", k), tolerance);
          else
            accuracy_row<double>(m, n, d, s, parse_int("--steps", k), tolerance);
        }
  return 0;
}

// ---- bench ------------------------------------------------------------------------------
/// Median seconds of f() over `repeat` runs after one warm-up run.
template <class F>
double median_seconds(int repeat, F&& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < repeat; ++r) {
    const auto start = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

template <class T>
void bench_row(muon::index_t m, muon::index_t n, const std::string& dtype,
               const muon::NewtonSchulzOptions& o, int repeat) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  muon::EigenBackend backend;
  const Mat x = random_matrix<T>(m, n);
  muon::NewtonSchulzWorkspace<muon::EigenBackend, T> ws;
  ws.reserve(backend, m, n);
  const auto schedule = o.schedule.resolve(o.steps);
  const double ns = median_seconds(repeat, [&] {
    backend.copy(muon::MatrixView<const T>(muon::view(x)), ws.input(backend, m, n));
    (void)ws.run(backend, m, n, schedule, o.schedule.norm_scale(), o.eps);
  });
  // The same-size GEMM (k x N times N x k) through the same backend, measured now.
  const muon::index_t k = std::min(m, n), big = std::max(m, n);
  const Mat a = random_matrix<T>(k, big), b = random_matrix<T>(big, k);
  Mat c(k, k);
  const double gemm = median_seconds(repeat, [&] {
    backend.gemm(T(1), muon::MatrixView<const T>(muon::view(a)),
                 muon::MatrixView<const T>(muon::view(b)), T(0), muon::view(c));
  });
  const double kd = double(k), nd = double(big);
  const double ns_flops = o.steps * (4 * kd * kd * nd + 2 * kd * kd * kd);
  const double gemm_flops = 2 * kd * kd * nd;
  std::printf("%-11s %-8s %-14s %5d %10.2f %9.1f %10.1f %9.2f\n",
              (std::to_string(m) + "x" + std::to_string(n)).c_str(), dtype.c_str(),
              o.schedule.name().c_str(), o.steps, ns * 1e3, ns_flops / ns * 1e-9,
              gemm_flops / gemm * 1e-9, (ns_flops / ns) / (gemm_flops / gemm));
  std::fflush(stdout);
}

int cmd_bench(int argc, char** argv) {
  Args args(argc, argv, 2, {"--shape", "--schedule", "--steps", "--dtype", "--repeat"});
  if (!args.positional.empty()) throw UsageError("bench takes no positional arguments");
  auto shapes = args.all("--shape");
  if (shapes.empty()) shapes = {"1024x1024", "1024x4096", "4096x1024", "2048x2048"};
  const auto dims = parse_shapes(shapes);
  const auto o = ns_options(args.one("--schedule", "keller"),
                            parse_int("--steps", args.one("--steps", "5")));
  const std::string dtype = args.one("--dtype", "float32");
  check_dtype(dtype);
  const int repeat = parse_int("--repeat", args.one("--repeat", "5"));
  if (repeat < 1) throw UsageError("--repeat must be >= 1");
  std::printf("Newton-Schulz speed: median of %d runs after a warm-up; products on %s.\n"
              "GFLOP/s counts the nominal 4k^2N + 2k^3 flops per step (k = min, N = max side);\n"
              "gemm_ratio = NS GFLOP/s / GFLOP/s of a k x N by N x k GEMM measured in this run.\n",
              repeat, muon::EigenBackend::products());
  std::printf("%-11s %-8s %-14s %5s %10s %9s %10s %9s\n", "shape", "dtype", "schedule", "steps",
              "ms", "GFLOP/s", "gemm_GF/s", "gemm_ratio");
  for (auto [m, n] : dims) {
    if (dtype == "float32")
      bench_row<float>(m, n, dtype, o, repeat);
    else
      bench_row<double>(m, n, dtype, o, repeat);
  }
  return 0;
}

// ---- step -------------------------------------------------------------------------------
template <class T>
void step(const std::string& param_file, const std::vector<std::string>& grad_files,
          const std::string& out, const muon::MuonOptions& options) {
  auto param = muon::npy::read<T>(param_file);
  (void)matrix_shape(param.shape, param_file);
  require_finite(param.data, param_file);
  std::vector<T> grad(param.data.size());
  muon::GroupOptions group;
  group.muon = options;
  muon::Optimizer<muon::EigenBackend, T> opt(group);
  opt.add_muon("param", muon::TensorView<T>{param.data.data(), param.shape},
               muon::TensorView<const T>{grad.data(), param.shape});
  for (const auto& file : grad_files) {
    auto g = muon::npy::read<T>(file);
    if (g.shape != param.shape)
      throw UsageError(file + ": gradient shape " + muon::detail::shape_string(g.shape) +
                       " differs from the parameter's " + muon::detail::shape_string(param.shape));
    grad = std::move(g.data);
    opt.set_grad(muon::ParamId{0}, muon::TensorView<const T>{grad.data(), param.shape}.flattened());
    opt.step();
  }
  muon::npy::write(out, param.shape, param.data.data());
}

int cmd_step(int argc, char** argv) {
  Args args(argc, argv, 2,
            {"--param", "--grad", "--out", "--lr", "--momentum", "--nesterov", "--weight-decay",
             "--scale", "--momentum-form", "--schedule", "--steps", "--dtype"});
  if (!args.positional.empty())
    throw UsageError("step takes no positional arguments (got '" + args.positional[0] + "')");
  const std::string param = args.one("--param", ""), out = args.one("--out", "");
  const auto grads = args.all("--grad");
  if (param.empty()) throw UsageError("step needs --param P.npy");
  if (out.empty()) throw UsageError("step needs --out OUT.npy");
  if (grads.empty()) throw UsageError("step needs at least one --grad G.npy");
  muon::MuonOptions o;
  o.lr = parse_number("--lr", args.one("--lr", "0.001"));
  o.momentum = parse_number("--momentum", args.one("--momentum", "0.95"));
  o.nesterov = parse_on_off("--nesterov", args.one("--nesterov", "on"));
  o.weight_decay = parse_number("--weight-decay", args.one("--weight-decay", "0.1"));
  o.scale = muon::scale_mode_from_name(args.one("--scale", "original"));
  o.momentum_form = muon::momentum_form_from_name(args.one("--momentum-form", "ema"));
  o.newton_schulz = ns_options(args.one("--schedule", "keller"),
                               parse_int("--steps", args.one("--steps", "5")));
  muon::validate(o, "options");
  const std::string dtype = args.one("--dtype", "float32");
  check_dtype(dtype);
  if (dtype == "float32")
    step<float>(param, grads, out, o);
  else
    step<double>(param, grads, out, o);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  try {
    if (command == "orthogonalize") return cmd_orthogonalize(argc, argv);
    if (command == "accuracy") return cmd_accuracy(argc, argv);
    if (command == "bench") return cmd_bench(argc, argv);
    if (command == "step") return cmd_step(argc, argv);
    if (command == "--help" || command == "-h" || command == "help") {
      std::cout << kUsage;
      return 0;
    }
    throw UsageError(command.empty() ? "no command given (orthogonalize, accuracy or step)"
                                     : "unknown command '" + command + "'");
  } catch (const UsageError& e) {
    std::cerr << "muon-cli: error: " << e.what() << " (see muon-cli --help)\n";
  } catch (const std::exception& e) {
    const std::string what = e.what();
    std::cerr << "muon-cli: error: " << (what.rfind("muon: ", 0) == 0 ? what.substr(6) : what)
              << "\n";
  }
  return 1;
}
