#pragma once
// Newton–Schulz coefficient schedules. One NS step maps X to a X + b (X X^T) X + c (X X^T)^2 X,
// i.e. every singular value s to p(s) = a s + b s^3 + c s^5. A schedule gives (a, b, c) per step.
// After its list a schedule repeats its last triple, or (where marked "cycles") the list again.
//
//   keller        (3.4445, -4.7750, 2.0315) every step (K. Jordan, "Muon", 2024): fast, maps
//                 singular values into about [0.68, 1.13] rather than exactly to 1, by design.
//   you           five per-step triples tuned by Jiacheng You (2024); later steps reuse the last.
//   polar_express minimax-optimal per-step quintics (Amsel, Persson, Musco, Gower 2025,
//                 arXiv:2505.16932), generated for the requested number of steps, with
//                 normalization by 1.02 ||X||_F. With 5 steps it reproduces the published list
//                 (8.1566, -22.4833, 15.8788) ... (2.3465, -1.7098, 0.4232).
//   textbook      (15/8, -10/8, 3/8): the convergent quintic; enough steps give the exact msign.
//   custom        any user list; later steps reuse the last triple (or cycle, if asked).
// The named sets of NVIDIA's Emerging-Optimizers (muon_utils.py), under its names and with its
// repetition, normalized by ||X||_F:
//   simple        keller's triple.
//   quintic       you's five triples, cycling after the fifth.
//   polar_express_paper  the paper's 8-step list with its 1.01 safety factor divided in
//                 ((8.2051, -22.9019, 16.4607) ...); Emerging-Optimizers calls it polar_express.
//   cans          CANS (Grishina et al. 2025, arXiv:2506.10935): Remez on an adapted interval.
//   aol           four triples of thib-s/flash-newton-schulz, cycling.
//   deepseekv4    keller's triple 8 times, then (2, -1.5, 0.5) (DeepSeek-V4 report).
//   cubic5        five cubics (c = 0; arXiv:2606.00371): one product fewer a step, exactly 5
//                 steps.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "muon/core/error.hpp"

namespace muon {

struct Coefficients {
  double a = 0, b = 0, c = 0;
  friend bool operator==(const Coefficients&, const Coefficients&) = default;
};

inline constexpr int kMaxNewtonSchulzSteps = 100;

/// The convergent quintic p(s) = (15 s - 10 s^3 + 3 s^5) / 8: p(1) = 1 with p'(1) = p''(1) = 0,
/// so each step cubes the distance to 1. It maps [0, kTextbookBasin] into itself, and every
/// s in (0, kTextbookBasin) goes to 1 (kTextbookBasin = sqrt(7/3) is its other fixed point).
inline constexpr Coefficients kTextbookQuintic{1.875, -1.25, 0.375};
inline constexpr double kTextbookBasin = 1.5275252316519468;
/// The largest value a schedule may map a singular value to, at any step (see
/// singular_value_bound); beyond it float products could overflow, and no useful schedule
/// comes near it (keller peaks at about 1.2).
inline constexpr double kMaxScheduleGain = 1e3;

/// The singular values a schedule can produce, in exact arithmetic, from inputs with singular
/// values in [0, input_max] (1 after the Frobenius normalization; 1 / norm_scale for a
/// norm_scale below 1): the largest output (`output`) and the largest value at any step
/// (`peak`). Exact, not sampled: the image of an interval under a polynomial is the interval
/// between its extremes there (at the ends or at a critical point), so the image of
/// [0, input_max] is followed step by step.
struct SingularValueBound {
  double output = 0, peak = 0;
};
SingularValueBound singular_value_bound(std::span<const Coefficients> steps,
                                        double input_max = 1.0);

class Schedule {
 public:
  enum class Kind {
    keller, you, polar_express, textbook, custom,
    simple, quintic, polar_express_paper, cans, aol, deepseekv4, cubic5
  };
  /// What follows the list: its last triple again, or the whole list again.
  enum class Repeat { last, cycle };

  static Schedule keller() { return {Kind::keller, "keller", {kKeller}}; }
  static Schedule you() { return {Kind::you, "you", you_list()}; }
  static Schedule polar_express() { return {Kind::polar_express, "polar_express", {}, 1.02}; }
  static Schedule textbook() { return {Kind::textbook, "textbook", {kTextbookQuintic}}; }
  static Schedule simple() { return {Kind::simple, "simple", {kKeller}}; }
  static Schedule quintic() { return {Kind::quintic, "quintic", you_list(), 1.0, Repeat::cycle}; }
  static Schedule polar_express_paper() {
    return {Kind::polar_express_paper,
            "polar_express_paper",
            {{8.2051, -22.9019, 16.4607},
             {4.0664, -2.8612, 0.5184},
             {3.9096, -2.8234, 0.5250},
             {3.2856, -2.4153, 0.4853},
             {2.2779, -1.6198, 0.3985},
             {1.8726, -1.2307, 0.3585},
             {1.8564, -1.2132, 0.3568},
             {1.8750, -1.2500, 0.3750}}};
  }
  static Schedule cans() {
    return {Kind::cans,
            "cans",
            {{8.4703, -25.1081, 18.6293},
             {4.1828, -3.1087, 0.5806},
             {3.9619, -2.9541, 0.5630},
             {3.2866, -2.4647, 0.5074},
             {2.2737, -1.6447, 0.4162}}};
  }
  static Schedule aol() {
    return {Kind::aol,
            "aol",
            {{4.0098, -7.0585, 2.4635},
             {3.4585, -5.5479, 2.5959},
             {2.7573, -3.2939, 1.4254},
             {2.7215, -3.0494, 1.3169}},
            1.0,
            Repeat::cycle};
  }
  static Schedule deepseekv4() {
    std::vector<Coefficients> list(8, kKeller);
    list.insert(list.end(), 2, Coefficients{2.0, -1.5, 0.5});
    return {Kind::deepseekv4, "deepseekv4", std::move(list)};
  }
  static Schedule cubic5() {
    Schedule s{Kind::cubic5,
               "cubic5",
               {{3.3656576, -3.3420992, 0.0},
                {2.5744352, -1.4957376, 0.0},
                {2.5368962, -1.4312570, 0.0},
                {2.4418906, -1.2764040, 0.0},
                {2.2230472, -0.9630650, 0.0}},
               1.0,
               Repeat::cycle};
    s.fixed_steps_ = 5;
    return s;
  }
  /// A user list; `norm_scale` multiplies ||X||_F in the initial normalization.
  static Schedule custom(std::vector<Coefficients> coefficients, double norm_scale = 1.0,
                         Repeat repeat = Repeat::last) {
    return {Kind::custom, "custom", std::move(coefficients), norm_scale, repeat};
  }
  /// Every name from_name() knows, in the order of the docs' table.
  static constexpr const char* names[] = {"keller", "you", "polar_express", "textbook",
                                          "simple", "quintic", "polar_express_paper", "cans",
                                          "aol", "deepseekv4", "cubic5"};
  /// One of `names`.
  static Schedule from_name(const std::string& name) {
    for (const Schedule& s : {keller(), you(), polar_express(), textbook(), simple(), quintic(),
                              polar_express_paper(), cans(), aol(), deepseekv4(), cubic5()})
      if (s.name() == name) return s;
    std::string known;
    for (const char* n : names) known += std::string(known.empty() ? "" : ", ") + n;
    throw InvalidArgument("muon: unknown Newton-Schulz schedule '" + name + "' (expected one of " +
                          known + ")");
  }

  [[nodiscard]] Kind kind() const noexcept { return kind_; }
  [[nodiscard]] const std::string& name() const noexcept { return name_; }
  [[nodiscard]] double norm_scale() const noexcept { return norm_scale_; }
  [[nodiscard]] Repeat repeat() const noexcept { return repeat_; }
  [[nodiscard]] const std::vector<Coefficients>& listed() const noexcept { return list_; }
  /// The steps the schedule is made for: its list's length where that is more than one
  /// triple, else 5 (the default of NewtonSchulzOptions).
  [[nodiscard]] int intended_steps() const noexcept {
    return list_.size() > 1 ? static_cast<int>(list_.size()) : 5;
  }

  /// The (a, b, c) of each of `steps` steps. Throws InvalidArgument on a malformed schedule.
  [[nodiscard]] std::vector<Coefficients> resolve(int steps) const;

 private:
  static constexpr Coefficients kKeller{3.4445, -4.7750, 2.0315};
  static std::vector<Coefficients> you_list() {
    return {{4.0848, -6.8946, 2.9270},
            {3.9505, -6.3029, 2.6377},
            {3.7418, -5.5913, 2.3037},
            {2.8769, -3.1427, 1.2046},
            {2.8366, -3.0525, 1.2012}};
  }
  Schedule(Kind kind, std::string name, std::vector<Coefficients> list, double norm_scale = 1.0,
           Repeat repeat = Repeat::last)
      : kind_(kind), name_(std::move(name)), list_(std::move(list)), norm_scale_(norm_scale),
        repeat_(repeat) {}

  Kind kind_;
  std::string name_;
  std::vector<Coefficients> list_;
  double norm_scale_;
  Repeat repeat_;
  int fixed_steps_ = 0;  // > 0: the only step count the schedule runs (cubic5)
};

namespace detail {

/// Solves the 4x4 system M x = rhs by Gaussian elimination with partial pivoting.
inline std::array<double, 4> solve4(std::array<std::array<double, 4>, 4> m,
                                    std::array<double, 4> rhs) {
  for (int col = 0; col < 4; ++col) {
    int pivot = col;
    for (int r = col + 1; r < 4; ++r)
      if (std::abs(m[r][col]) > std::abs(m[pivot][col])) pivot = r;
    std::swap(m[col], m[pivot]);
    std::swap(rhs[col], rhs[pivot]);
    for (int r = col + 1; r < 4; ++r) {
      const double f = m[r][col] / m[col][col];
      for (int k = col; k < 4; ++k) m[r][k] -= f * m[col][k];
      rhs[r] -= f * rhs[col];
    }
  }
  std::array<double, 4> x{};
  for (int r = 3; r >= 0; --r) {
    double s = rhs[r];
    for (int k = r + 1; k < 4; ++k) s -= m[r][k] * x[k];
    x[r] = s / m[r][r];
  }
  return x;
}

/// The odd quintic that best approximates 1 on [l, u] in the max norm (Remez exchange with the
/// equioscillation points l < q < r < u), after Algorithm 1 of arXiv:2505.16932.
inline Coefficients optimal_quintic(double l, double u) {
  if (l / u >= 1 - 5e-6) return {15.0 / 8 / u, -10.0 / 8 / (u * u * u), 3.0 / 8 / std::pow(u, 5)};
  double q = (3 * l + 1) / 4, r = (l + 3) / 4;
  double error = std::numeric_limits<double>::infinity(), previous;
  Coefficients p;
  for (int iteration = 0; iteration < 100; ++iteration) {
    previous = error;
    auto row = [](double x, double sign) {
      return std::array<double, 4>{x, x * x * x, std::pow(x, 5), sign};
    };
    const auto x = solve4({row(l, 1), row(q, -1), row(r, 1), row(u, -1)}, {1, 1, 1, 1});
    p = {x[0], x[1], x[2]};
    error = x[3];
    const double disc = std::sqrt(9 * p.b * p.b - 20 * p.a * p.c);
    q = std::sqrt((-3 * p.b - disc) / (10 * p.c));
    r = std::sqrt((-3 * p.b + disc) / (10 * p.c));
    if (std::abs(previous - error) <= 1e-15) break;
  }
  return p;
}

/// Composition of optimal quintics for `steps` steps starting from singular values in
/// [l0, 1], with the paper's cushion and a safety factor on all steps but the last
/// (parameters that reproduce the published 5-step list used by modded-nanogpt and dion).
inline std::vector<Coefficients> polar_express_coefficients(int steps, double l0 = 1e-3,
                                                            double cushion = 0.02,
                                                            double safety = 0.02) {
  std::vector<Coefficients> out;
  double l = l0, u = 1;
  auto poly = [](const Coefficients& p, double x) {
    return p.a * x + p.b * x * x * x + p.c * std::pow(x, 5);
  };
  for (int t = 0; t < steps; ++t) {
    Coefficients p = optimal_quintic(std::max(l, cushion * u), u);
    const double rescale = 2 / (poly(p, l) + poly(p, u));  // recentre around 1 on [l, u]
    p = {p.a * rescale, p.b * rescale, p.c * rescale};
    if (t + 1 < steps) {
      const double s = 1 + safety;
      p = {p.a / s, p.b / (s * s * s), p.c / std::pow(s, 5)};
    }
    out.push_back(p);
    l = poly(p, l);
    u = 2 - l;
  }
  return out;
}

}  // namespace detail

inline SingularValueBound singular_value_bound(std::span<const Coefficients> steps,
                                               double input_max) {
  SingularValueBound bound;
  double lo = 0, hi = input_max;  // the image so far
  for (const Coefficients& p : steps) {
    auto f = [&](double x) { return x * (p.a + x * x * (p.b + x * x * p.c)); };
    double new_lo = std::min(f(lo), f(hi)), new_hi = std::max(f(lo), f(hi));
    // critical points: p'(x) = a + 3 b x^2 + 5 c x^4 = 0, a quadratic in z = x^2
    double z[2] = {-1, -1};
    if (p.c != 0) {
      const double disc = 9 * p.b * p.b - 20 * p.a * p.c;
      if (disc >= 0) {
        z[0] = (-3 * p.b - std::sqrt(disc)) / (10 * p.c);
        z[1] = (-3 * p.b + std::sqrt(disc)) / (10 * p.c);
      }
    } else if (p.b != 0) {
      z[0] = -p.a / (3 * p.b);
    }
    for (double zi : z) {
      if (!(zi > 0)) continue;
      for (double x : {std::sqrt(zi), -std::sqrt(zi)})
        if (x > lo && x < hi) {
          new_lo = std::min(new_lo, f(x));
          new_hi = std::max(new_hi, f(x));
        }
    }
    lo = new_lo;
    hi = new_hi;
    bound.peak = std::max({bound.peak, std::abs(lo), std::abs(hi)});
    if (!(bound.peak <= kMaxScheduleGain)) break;  // diverging (or NaN): no need to go on
  }
  bound.output = std::max(std::abs(lo), std::abs(hi));
  return bound;
}

inline std::vector<Coefficients> Schedule::resolve(int steps) const {
  if (steps < 1 || steps > kMaxNewtonSchulzSteps)
    throw InvalidArgument("muon: Newton-Schulz steps = " + std::to_string(steps) +
                          " is out of range [1, " + std::to_string(kMaxNewtonSchulzSteps) + "]");
  if (!(std::isfinite(norm_scale_) && norm_scale_ > 0))
    throw InvalidArgument("muon: schedule '" + name_ + "' has norm_scale " +
                          std::to_string(norm_scale_) + "; it must be finite and > 0");
  if (kind_ == Kind::polar_express) return detail::polar_express_coefficients(steps);
  if (list_.empty())
    throw InvalidArgument("muon: schedule '" + name_ + "' has no coefficients");
  for (std::size_t i = 0; i < list_.size(); ++i) {
    const auto& p = list_[i];
    if (!(std::isfinite(p.a) && std::isfinite(p.b) && std::isfinite(p.c)))
      throw InvalidArgument("muon: schedule '" + name_ + "' coefficient triple " +
                            std::to_string(i) + " is not finite");
  }
  if (fixed_steps_ > 0 && steps != fixed_steps_)
    throw InvalidArgument("muon: schedule '" + name_ + "' is made for exactly " +
                          std::to_string(fixed_steps_) + " steps; steps = " +
                          std::to_string(steps) + " (set steps to " +
                          std::to_string(fixed_steps_) + ", or give the triples as custom)");
  std::vector<Coefficients> out(static_cast<std::size_t>(steps));
  for (std::size_t t = 0; t < out.size(); ++t)
    out[t] = list_[repeat_ == Repeat::cycle ? t % list_.size() : std::min(t, list_.size() - 1)];
  // A schedule that blows singular values up would write Inf into the weights; refuse it here,
  // where the user chose it, rather than inside step().
  const double peak = singular_value_bound(out, 1.0 / std::min(norm_scale_, 1.0)).peak;
  if (!(peak <= kMaxScheduleGain))
    throw InvalidArgument("muon: schedule '" + name_ + "' with " + std::to_string(steps) +
                          " steps maps singular values in [0, 1] up to " +
                          std::to_string(peak) + "; a Newton-Schulz schedule must keep them below " +
                          std::to_string(kMaxScheduleGain));
  return out;
}

}  // namespace muon
