// muon-cli: Muon on your own matrices, from .npy files. Arguments are parsed by CLI11;
// `muon-cli --help` and `muon-cli COMMAND --help` list every option with its default.
//
//   muon-cli orthogonalize IN.npy OUT.npy [--schedule S] [--steps N] [--dtype D] [--tolerance X]
//   muon-cli accuracy [--shape MxN]... [--schedule S]... [--steps N]... [--dtype D]...
//   muon-cli bench [--shape MxN]... [--steps N] [--schedule S] [--dtype D] [--repeat R]
//   muon-cli step --param P.npy --grad G1.npy [--grad G2.npy ...] --out OUT.npy [options]
//
// Any bad input ends with one line on stderr ("muon-cli: error: ...") and exit status 1,
// before anything is written to stdout or to a file.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <map>
#include <set>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "muon/eigen.hpp"
#include "muon/io/npy.hpp"
#include "muon/version.hpp"

namespace {

using Shape = std::pair<muon::index_t, muon::index_t>;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const std::vector<std::string> kDtypes = {"float32", "float64"};

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
/// Each refusal names the option it is about.
muon::NewtonSchulzOptions ns_options(const std::string& schedule, int steps, double tolerance = 0) {
  if (steps < 1 || steps > muon::kMaxNewtonSchulzSteps)
    throw UsageError("--steps " + std::to_string(steps) + " is out of range [1, " +
                     std::to_string(muon::kMaxNewtonSchulzSteps) + "]");
  if (!(std::isfinite(tolerance) && tolerance >= 0)) {
    std::ostringstream value;
    value << tolerance;
    throw UsageError("--tolerance " + value.str() + " must be finite and >= 0 (0: off)");
  }
  muon::NewtonSchulzOptions o;
  o.schedule = muon::Schedule::from_name(schedule);
  o.steps = steps;
  o.tolerance = tolerance;
  try {
    muon::validate(o, "cli");
  } catch (const muon::InvalidArgument& e) {  // the schedule itself, or with the tolerance
    std::string why = e.what();
    why = why.substr(why.rfind("muon: ", 0) == 0 ? 6 : 0);
    why = why.substr(0, why.find(" (in cli."));
    throw UsageError("--schedule " + schedule + " --steps " + std::to_string(steps) + ": " + why);
  }
  return o;
}

/// CLI11 reads an empty value ("--lr $UNSET") as 0; a number option refuses it.
const CLI::Validator kNumber(
    [](const std::string& value) {
      return value.empty() ? std::string("an empty value is not a number") : std::string();
    },
    "", "number");  // no description: --help shows the type and default as before

/// Refuses a matrix holding NaN or Inf, naming the file and the first such entry: Newton-Schulz
/// of it would be all NaN.
template <class T>
void require_finite(const std::vector<T>& data, const std::string& file) {
  const auto bad = std::find_if(data.begin(), data.end(), [](T v) { return !std::isfinite(v); });
  if (bad != data.end())
    throw std::runtime_error(file + ": entry " + std::to_string(bad - data.begin()) +
                             " (row-major) is " + std::to_string(*bad) +
                             "; the input must be finite");
}

/// A .npy file in the working precision T. Read as double (exact for float32 files), so that
/// the dtype the file held is known before T is chosen.
template <class T>
muon::npy::Array<T> in_precision(muon::npy::Array<double> a) {
  if constexpr (std::is_same_v<T, double>) {
    return a;  // moved, not copied
  } else {
    return {a.shape, std::vector<T>(a.data.begin(), a.data.end()), a.stored};
  }
}

/// --dtype when given, else the dtype of the file the command reads.
std::string dtype_or(const std::string& requested, const muon::npy::Array<double>& a) {
  return requested.empty() ? muon::npy::to_string(a.stored) : requested;
}

/// --precision: the CPU backend's Newton-Schulz precision for float32 matrices.
const std::map<std::string, muon::cpu::Precision> kPrecisions{
    {"auto", muon::cpu::Precision::automatic},
    {"float32", muon::cpu::Precision::float32},
    {"bfloat16", muon::cpu::Precision::bfloat16}};

muon::EigenBackend backend_for(const std::string& precision) {
  return muon::EigenBackend(muon::CpuOptions{kPrecisions.at(precision)});
}

/// What a T matrix's Newton-Schulz multiplies in on `backend`: float64, float32 or bfloat16.
template <class T>
const char* products_in(const muon::EigenBackend& backend, const muon::NewtonSchulzOptions& o) {
  if constexpr (std::is_same_v<T, double>) return "float64";
  return backend.use_bf16(o.method) ? "bfloat16" : "float32";
}

// ---- orthogonalize ----------------------------------------------------------------------
template <class T>
void orthogonalize(const std::string& in, muon::npy::Array<double> file, const std::string& out,
                   const muon::NewtonSchulzOptions& o, const std::string& precision) {
  auto a = in_precision<T>(std::move(file));
  const auto [rows, cols] = matrix_shape(a.shape, in);
  require_finite(a.data, in);
  std::vector<T> result(a.data.size());
  muon::EigenBackend backend = backend_for(precision);
  muon::orthogonalize(backend,
                      muon::row_major_view<muon::HostSpace, const T>(a.data.data(), rows, cols),
                      muon::row_major_view(result.data(), rows, cols), o);
  muon::npy::write(out, a.shape, result.data());
}

struct OrthogonalizeArgs {
  std::string in, out, schedule = "keller", dtype, precision = "auto";
  int steps = muon::NewtonSchulzOptions{}.steps;
  double tolerance = 0;
};

void run_orthogonalize(const OrthogonalizeArgs& a) {
  const auto o = ns_options(a.schedule, a.steps, a.tolerance);
  auto file = muon::npy::read<double>(a.in);
  if (dtype_or(a.dtype, file) == "float32")
    orthogonalize<float>(a.in, std::move(file), a.out, o, a.precision);
  else
    orthogonalize<double>(a.in, std::move(file), a.out, o, a.precision);
}

// ---- shapes and memory --------------------------------------------------------------------
/// MxN with 64-bit extents >= 1; an extent past int64, or M*N past it, is reported as overflow.
Shape parse_shape(const std::string& s) {
  const auto x = s.find('x');
  if (x == std::string::npos) throw UsageError("--shape expects MxN, got '" + s + "'");
  auto extent = [&](const std::string& text) {
    std::int64_t v = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec == std::errc::result_out_of_range)
      throw UsageError("--shape '" + s + "': extent " + text + " overflows a 64-bit integer");
    if (ec != std::errc() || end != text.data() + text.size())
      throw UsageError("--shape expects MxN with integer extents, got '" + s + "'");
    if (v < 1) throw UsageError("--shape extents must be >= 1, got '" + s + "'");
    return static_cast<muon::index_t>(v);
  };
  const muon::index_t m = extent(s.substr(0, x)), n = extent(s.substr(x + 1));
  muon::index_t size = 0;
  if (__builtin_mul_overflow(m, n, &size))
    throw UsageError("--shape '" + s + "': " + std::to_string(m) + " * " + std::to_string(n) +
                     " elements overflow a 64-bit integer");
  return {m, n};
}

std::vector<Shape> parse_shapes(const std::vector<std::string>& shapes) {
  std::vector<Shape> dims;
  for (const auto& s : shapes) dims.push_back(parse_shape(s));
  return dims;
}

/// Refuses, before any output, a shape whose buffers (`copies` matrices of `bytes`-byte
/// scalars, about) cannot fit: more than the machine's memory, or an allocation that fails.
void require_memory(const std::vector<Shape>& shapes, double copies, std::size_t bytes) {
  const double physical = static_cast<double>(sysconf(_SC_PHYS_PAGES)) *
                          static_cast<double>(sysconf(_SC_PAGESIZE));
  for (auto [m, n] : shapes) {
    const double need = static_cast<double>(m) * static_cast<double>(n) * copies *
                        static_cast<double>(bytes);
    auto gib = [](double b) {
      char text[32];
      std::snprintf(text, sizeof text, "%.1f GiB", b / (1 << 30));
      return std::string(text);
    };
    const std::string what = "--shape " + std::to_string(m) + "x" + std::to_string(n) +
                             " needs about " + gib(need);
    if (physical > 0 && need > physical)
      throw UsageError(what + ", more than this machine's " + gib(physical) + " of memory");
    // Reserved, not touched: refused here where the allocator already knows it cannot.
    std::unique_ptr<char[]> probe(new (std::nothrow) char[static_cast<std::size_t>(need)]);
    if (!probe) throw UsageError(what + ", which could not be allocated");
  }
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
                  const std::string& precision, const std::string& schedule, int steps,
                  double tolerance) {
  const auto x = random_matrix<T>(m, n);
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> o(m, n);
  muon::EigenBackend backend = backend_for(precision);
  muon::NewtonSchulzReport report;
  const muon::NewtonSchulzOptions options = ns_options(schedule, steps, tolerance);
  muon::orthogonalize(backend, muon::MatrixView<const T>(muon::view(x)), muon::view(o), options,
                      &report);
  const auto r = muon::orthogonality(muon::MatrixView<const T>(muon::view(o)),
                                     muon::MatrixView<const T>(muon::view(x)));
  std::printf("%-11s %-8s %-9s %-20s %5d %9.4f %9.4f %9.4f %11.3e %10.3e %5d\n",
              (std::to_string(m) + "x" + std::to_string(n)).c_str(), dtype.c_str(),
              products_in<T>(backend, options),
              schedule.c_str(), steps, r.s_min, r.s_max, r.max_deviation, r.msign_distance,
              report.residual, report.steps);
}

struct AccuracyArgs {
  std::vector<std::string> shapes{"256x256", "256x1024", "1024x256"};
  std::vector<std::string> schedules{std::begin(muon::Schedule::names),
                                     std::end(muon::Schedule::names)};
  std::vector<int> steps;  // none given: each schedule at the steps it is made for
  std::vector<std::string> dtypes{"float32"};
  std::vector<std::string> precisions{"auto"};
  double tolerance = 0;
};

void run_accuracy(const AccuracyArgs& a) {
  const auto dims = parse_shapes(a.shapes);
  const auto steps_of = [&](const std::string& s) {
    return a.steps.empty() ? std::vector<int>{muon::Schedule::from_name(s).intended_steps()}
                           : a.steps;
  };
  for (const auto& s : a.schedules)
    for (int k : steps_of(s)) (void)ns_options(s, k, a.tolerance);
  // The input, the result, the workspace, and the SVD's double copies.
  require_memory(dims, 12, 8);
  std::printf("Newton-Schulz accuracy on Gaussian random matrices (seed 1234); singular values of\n"
              "the result (1 = orthogonal) and ||O - msign(X)||_F / sqrt(min(m,n)) by SVD in double;\n"
              "residual = ||O O^T - I||_F / sqrt(min(m,n)) as the library measures it, and the\n"
              "steps it ran (more than asked where --tolerance added textbook steps)\n");
  std::printf("%-11s %-8s %-9s %-20s %5s %9s %9s %9s %11s %10s %5s\n", "shape", "dtype",
              "products", "schedule", "steps", "s_min", "s_max", "max|s-1|", "dist_msign",
              "residual", "ran");
  for (auto [m, n] : dims)
    for (const auto& d : a.dtypes)
      for (const auto& p : d == "float32" ? a.precisions : std::vector<std::string>{"auto"})
        for (const auto& s : a.schedules)
          for (int k : steps_of(s)) {
            if (d == "float32")
              accuracy_row<float>(m, n, d, p, s, k, a.tolerance);
            else
              accuracy_row<double>(m, n, d, p, s, k, a.tolerance);
          }
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
               const std::string& precision, const muon::NewtonSchulzOptions& o, int repeat) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  muon::EigenBackend backend = backend_for(precision);
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
  double ns_flops = 0;  // a cubic step (c = 0) has no A^2
  for (const auto& p : schedule) ns_flops += 4 * kd * kd * nd + (p.c != 0 ? 2 * kd * kd * kd : 0);
  const double gemm_flops = 2 * kd * kd * nd;
  std::printf("%-11s %-8s %-9s %-20s %5d %10.2f %9.1f %10.1f %9.2f\n",
              (std::to_string(m) + "x" + std::to_string(n)).c_str(), dtype.c_str(),
              products_in<T>(backend, o), o.schedule.name().c_str(), o.steps, ns * 1e3,
              ns_flops / ns * 1e-9, gemm_flops / gemm * 1e-9, (ns_flops / ns) / (gemm_flops / gemm));
  std::fflush(stdout);
}

struct BenchArgs {
  std::vector<std::string> shapes{"1024x1024", "1024x4096", "4096x1024", "2048x2048"};
  std::string schedule = "keller";
  int steps = muon::NewtonSchulzOptions{}.steps;
  std::string dtype = "float32";
  std::string precision = "auto";
  int repeat = 5;
};

void run_bench(const BenchArgs& a) {
  const auto dims = parse_shapes(a.shapes);
  const auto o = ns_options(a.schedule, a.steps);
  // The input, the workspace, and the GEMM's operands.
  require_memory(dims, 8, a.dtype == "float32" ? 4 : 8);
  std::printf("%s\nNewton-Schulz speed: median of %d runs after a warm-up.\n"
              "GFLOP/s counts the nominal 4k^2N + 2k^3 flops per step (k = min, N = max side; 4k^2N\n"
              "for a cubic step, c = 0);\n"
              "gemm_ratio = NS GFLOP/s / GFLOP/s of a k x N by N x k GEMM (in the dtype, on the\n"
              "BLAS) measured in this run; products: what Newton-Schulz multiplies in.\n",
              backend_for(a.precision).engine().c_str(), a.repeat);
  std::printf("%-11s %-8s %-9s %-20s %5s %10s %9s %10s %9s\n", "shape", "dtype", "products",
              "schedule", "steps", "ms", "GFLOP/s", "gemm_GF/s", "gemm_ratio");
  for (auto [m, n] : dims) {
    if (a.dtype == "float32")
      bench_row<float>(m, n, a.dtype, a.precision, o, a.repeat);
    else
      bench_row<double>(m, n, a.dtype, a.precision, o, a.repeat);
  }
}

// ---- step -------------------------------------------------------------------------------
template <class T>
void step(const std::string& param_file, muon::npy::Array<double> file,
          const std::vector<std::string>& grad_files, const std::string& out, muon::UpdateRule rule,
          const muon::GroupOptions& options) {
  auto param = in_precision<T>(std::move(file));
  muon::rules::All::visit(rule, [&](auto r) {  // an orthogonalizing rule takes matrices only
    if constexpr (decltype(r)::orthogonalizes)
      (void)matrix_shape(param.shape, param_file);
    else if (param.shape.empty())
      throw UsageError(param_file + ": needs an array (1 or more dimensions), got a scalar");
  });
  require_finite(param.data, param_file);
  std::vector<T> grad(param.data.size());
  muon::Optimizer<muon::EigenBackend, T> opt(options);
  muon::rules::All::visit(rule, [&](auto r) {
    opt.add(r, "param", muon::TensorView<T>{param.data.data(), param.shape},
            muon::TensorView<const T>{grad.data(), param.shape});
  });
  for (const auto& name : grad_files) {
    auto g = in_precision<T>(muon::npy::read<double>(name));
    if (g.shape != param.shape)
      throw UsageError(name + ": gradient shape " + muon::detail::shape_string(g.shape) +
                       " differs from the parameter's " + muon::detail::shape_string(param.shape));
    require_finite(g.data, name);  // named here: the optimizer knows no file names
    grad = std::move(g.data);
    opt.set_grad(muon::ParamId{0}, muon::TensorView<const T>{grad.data(), param.shape}.flattened());
    opt.step();
  }
  muon::npy::write(out, param.shape, param.data.data());
}

/// An enum's names, from its to_string (which says "?" past the last enumerator; its
/// enumerators are numbered from 0 without gaps).
template <class E>
std::vector<std::string> enum_names() {
  std::vector<std::string> names;
  for (int i = 0; i < 64 && std::string(to_string(static_cast<E>(i))) != "?"; ++i)
    names.emplace_back(to_string(static_cast<E>(i)));
  return names;
}

/// One flag of `step` for the option of that name of every rule that has one: --lr sets
/// muon.lr or adamw.lr, the chosen rule's. Its type and the default --help shows are
/// the first such rule's, its description lists each rule's; a flag not given leaves the
/// chosen rule's default. Newton-Schulz fields drop their "ns." (--steps, --eps, --method).
struct RuleFlag {
  std::string sets;  // "muon.lr (0.001), adamw.lr (0.001)"
  double number = 0;
  int integer = 0;
  std::string text;  // on/off, or an enumerator's name
  CLI::Option* option = nullptr;
};
std::string flag_of(std::string field) {
  if (field.rfind("ns.", 0) == 0) field = field.substr(3);
  std::replace(field.begin(), field.end(), '_', '-');
  return "--" + field;
}

struct StepArgs {
  std::string param, out, rule = "muon", schedule = "keller", dtype;
  std::vector<std::string> grads;
  std::map<std::string, RuleFlag> flags;
  CLI::Option* schedule_flag = nullptr;
};

/// Every rule's options as flags of `cmd`.
void add_rule_flags(CLI::App& cmd, StepArgs& a) {
  muon::rules::All::for_each([&](auto rule) {
    using R = decltype(rule);
    typename R::Options defaults{};
    std::set<std::string> mine;
    R::fields(defaults, [&](const char* field, const auto& value) {
      if (!mine.insert(flag_of(field)).second)  // two fields of one rule on one flag
        throw std::logic_error(std::string("muon-cli: rule ") + R::name + " has two options on " +
                               flag_of(field));
      std::ostringstream shown;  // the rule's default, as the flag takes it
      using V = std::decay_t<decltype(value)>;
      if constexpr (std::is_same_v<V, bool>) shown << (value ? "on" : "off");
      else if constexpr (std::is_enum_v<V>) shown << to_string(value);
      else shown << value;
      const std::string sets = std::string(R::name) + "." + field + " (" + shown.str() + ")";
      const auto [it, added] = a.flags.try_emplace(flag_of(field));
      if (!added) {
        it->second.sets += ", " + sets;
        return;
      }
      RuleFlag& f = it->second;
      f.sets = sets;
      if constexpr (std::is_same_v<V, double>) {
        f.number = value;
        f.option = cmd.add_option(it->first, f.number)->check(kNumber);
      } else if constexpr (std::is_same_v<V, int>) {
        f.integer = value;
        f.option = cmd.add_option(it->first, f.integer)->check(kNumber);
      } else if constexpr (std::is_same_v<V, bool>) {
        f.text = value ? "on" : "off";
        f.option = cmd.add_option(it->first, f.text)->check(CLI::IsMember({"on", "off"}));
      } else {
        f.text = to_string(value);
        f.option = cmd.add_option(it->first, f.text)->check(CLI::IsMember(enum_names<V>()));
      }
    });
  });
  for (auto& [flag, f] : a.flags) f.option->description("sets " + f.sets);
}

/// Every rule's name, in the list's order: "muon, adamw".
std::string rule_names() {
  std::string names;
  muon::rules::All::for_each([&](auto r) { names += (names.empty() ? "" : ", ") + std::string(decltype(r)::name); });
  return names;
}

/// The chosen rule's options from the flags given; a flag of another rule is refused.
muon::GroupOptions rule_options(StepArgs& a, muon::UpdateRule& id) {
  if (!muon::rules::All::from_name(a.rule, id))
    throw UsageError("--rule " + a.rule + " is not a rule (" + rule_names() + ")");
  muon::GroupOptions group;
  muon::rules::All::visit(id, [&](auto rule) {
    using R = decltype(rule);
    auto& o = R::options(group);
    std::vector<std::string> mine;
    R::fields(o, [&](const char* field, auto& value) {
      const std::string flag = flag_of(field);
      mine.push_back(flag);
      const RuleFlag& f = a.flags.at(flag);
      if (f.option->count() == 0) return;
      using V = std::decay_t<decltype(value)>;
      if constexpr (std::is_same_v<V, double>) value = f.number;
      else if constexpr (std::is_same_v<V, int>) value = f.integer;
      else if constexpr (std::is_same_v<V, bool>) value = f.text == "on";
      else {
        const auto names = enum_names<V>();
        value = static_cast<V>(std::find(names.begin(), names.end(), f.text) - names.begin());
      }
    });
    for (const auto& [flag, f] : a.flags)
      if (f.option->count() != 0 && std::find(mine.begin(), mine.end(), flag) == mine.end()) {
        std::string list;
        for (const auto& m : mine) list += (list.empty() ? "" : " ") + m;
        throw UsageError(flag + " is not an option of rule " + R::name + " (it takes " + list +
                         (R::orthogonalizes ? " --schedule" : "") + ")");
      }
    if constexpr (R::orthogonalizes) {
      if (a.schedule_flag->count() != 0)  // else the rule's own
        o.newton_schulz.schedule = ns_options(a.schedule, o.newton_schulz.steps).schedule;
    } else if (a.schedule_flag->count() != 0) {
      throw UsageError(std::string("--schedule: rule ") + R::name + " does not orthogonalize");
    }
  });
  muon::validate(group, "options");
  return group;
}

void run_step(StepArgs& a) {
  muon::UpdateRule rule{};
  const muon::GroupOptions group = rule_options(a, rule);
  auto file = muon::npy::read<double>(a.param);
  if (dtype_or(a.dtype, file) == "float32")
    step<float>(a.param, std::move(file), a.grads, a.out, rule, group);
  else
    step<double>(a.param, std::move(file), a.grads, a.out, rule, group);
}

/// The options every Newton-Schulz command shares.
void add_schedule_options(CLI::App& cmd, std::string& schedule, int& steps) {
  cmd.add_option("--schedule", schedule,
                 "Newton-Schulz coefficients: keller, you, polar_express, textbook, simple, "
                 "quintic, polar_express_paper, cans, aol, deepseekv4 or cubic5");
  cmd.add_option("--steps", steps, "Newton-Schulz steps")->check(kNumber);
}

}  // namespace

int main(int argc, char** argv) {
  muon::EigenBackend::link_eigen_products();  // so that MUON_PRODUCTS=eigen can compare engines
  CLI::App app{"muon-cli: the Muon optimizer's Newton-Schulz orthogonalization and update step "
               "on .npy files.\nAn N-D array (N > 2) is treated as the (shape[0], product of "
               "the rest) matrix.",
               "muon-cli"};
  app.set_version_flag("--version", std::string("muon-cli ") + MUON_VERSION_STRING +
                                        " (" + muon::EigenBackend().engine() + ")");
  app.option_defaults()->always_capture_default();  // --help shows every default
  const auto dtype_check = CLI::IsMember(kDtypes);

  OrthogonalizeArgs orth_args;
  CLI::App* orth = app.add_subcommand("orthogonalize", "Newton-Schulz of one matrix, IN to OUT");
  orth->add_option("IN", orth_args.in, "input .npy (float32 or float64)")->required();
  orth->add_option("OUT", orth_args.out, "output .npy")->required();
  add_schedule_options(*orth, orth_args.schedule, orth_args.steps);
  orth->add_option("--dtype", orth_args.dtype,
                   "working and output precision (default: the input's)")
      ->check(dtype_check);
  const auto precision_check = CLI::IsMember({"auto", "float32", "bfloat16"});
  const char* precision_help =
      "Newton-Schulz products for float32: auto (bfloat16 where the CPU multiplies bf16 in "
      "hardware), float32 or bfloat16";
  orth->add_option("--precision", orth_args.precision, precision_help)->check(precision_check);
  orth->add_option("--tolerance", orth_args.tolerance,
                   "add textbook steps until ||O O^T - I||_F / sqrt(k) <= X (0: off)")
      ->check(kNumber);

  AccuracyArgs acc;
  CLI::App* accuracy = app.add_subcommand(
      "accuracy", "How close to orthogonal Newton-Schulz gets on random matrices (SVD in double)");
  accuracy->add_option("--shape", acc.shapes, "MxN, repeatable");
  accuracy->add_option("--schedule", acc.schedules, "repeatable");
  accuracy->add_option("--steps", acc.steps,
                       "repeatable; none: each schedule at the steps it is made for")
      ->check(kNumber);
  accuracy->add_option("--dtype", acc.dtypes, "repeatable")->check(dtype_check);
  accuracy->add_option("--precision", acc.precisions, "repeatable; as for orthogonalize")
      ->check(precision_check);
  accuracy->add_option("--tolerance", acc.tolerance, "as for orthogonalize")->check(kNumber);

  BenchArgs bench;
  CLI::App* bench_cmd = app.add_subcommand(
      "bench", "Newton-Schulz speed against a same-size GEMM measured in the same run");
  bench_cmd->add_option("--shape", bench.shapes, "MxN, repeatable");
  add_schedule_options(*bench_cmd, bench.schedule, bench.steps);
  bench_cmd->add_option("--dtype", bench.dtype)->check(dtype_check);
  bench_cmd->add_option("--precision", bench.precision, precision_help)->check(precision_check);
  bench_cmd->add_option("--repeat", bench.repeat, "timed runs per shape (median)")
      ->check(kNumber)
      ->check(CLI::Range(1, 1000));

  StepArgs st;
  CLI::App* step_cmd = app.add_subcommand(
      "step", "steps of one rule (Muon by default) on one parameter, one step per --grad; "
              "writes the new parameter");
  step_cmd->add_option("--param", st.param, "parameter .npy (2-D, or N-D flattened)")->required();
  step_cmd->add_option("--grad", st.grads, "gradient .npy, repeatable: one step each")
      ->required();
  step_cmd->add_option("--out", st.out, "where the updated parameter is written")->required();
  step_cmd->add_option("--rule", st.rule,
                       "the update rule: " + rule_names() +
                           "; each rule's options are the flags below that set it");
  add_rule_flags(*step_cmd, st);
  st.schedule_flag = step_cmd->add_option("--schedule", st.schedule,
                       "Newton-Schulz coefficients (orthogonalizing rules; default: the "
                       "rule's own, keller for muon): any name muon-cli accuracy --help lists");
  step_cmd->add_option("--dtype", st.dtype, "working and output precision (default: the "
                                            "parameter's)")
      ->check(dtype_check);

  // Commands are checked here so that a typo reads as one, not as CLI11's "not expected".
  if (argc < 2) {
    std::cerr << "muon-cli: error: no command given (orthogonalize, accuracy, bench or step; "
                 "see muon-cli --help)\n";
    return 1;
  }
  const std::string command = argv[1];
  const auto commands = {orth, accuracy, bench_cmd, step_cmd};
  if (command.rfind('-', 0) != 0 &&
      std::none_of(commands.begin(), commands.end(),
                   [&](const CLI::App* c) { return c->get_name() == command; })) {
    std::cerr << "muon-cli: error: unknown command '" << command << "' (see muon-cli --help)\n";
    return 1;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "muon-cli: error: " << e.what() << " (see muon-cli "
              << (command.rfind('-', 0) == 0 ? "" : command + " ") << "--help)\n";
    return 1;
  }
  try {
    if (orth->parsed()) {
      run_orthogonalize(orth_args);
    } else if (accuracy->parsed()) {
      run_accuracy(acc);
    } else if (bench_cmd->parsed()) {
      run_bench(bench);
    } else if (step_cmd->parsed()) {
      run_step(st);
    } else {
      std::cerr << "muon-cli: error: no command given (see muon-cli --help)\n";
      return 1;
    }
    return 0;
  } catch (const UsageError& e) {
    std::cerr << "muon-cli: error: " << e.what() << " (see muon-cli " << command << " --help)\n";
  } catch (const std::bad_alloc&) {
    std::cerr << "muon-cli: error: out of memory\n";
  } catch (const std::exception& e) {
    const std::string what = e.what();
    std::cerr << "muon-cli: error: " << (what.rfind("muon: ", 0) == 0 ? what.substr(6) : what)
              << "\n";
  }
  return 1;
}
