#pragma once
// Newton–Schulz coefficient schedules. One NS step maps X to a X + b (X X^T) X + c (X X^T)^2 X,
// i.e. every singular value s to p(s) = a s + b s^3 + c s^5. A schedule gives (a, b, c) per step.
//
//   keller        (3.4445, -4.7750, 2.0315) every step (K. Jordan, "Muon", 2024): fast, maps
//                 singular values into about [0.68, 1.13] rather than exactly to 1, by design.
//   you           five per-step triples tuned by Jiacheng You (2024); later steps reuse the last.
//   polar_express minimax-optimal per-step quintics (Amsel, Persson, Musco, Gower 2025,
//                 arXiv:2505.16932), generated for the requested number of steps, with
//                 normalization by 1.02 ||X||_F. With 5 steps it reproduces the published list
//                 (8.1566, -22.4833, 15.8788) ... (2.3465, -1.7098, 0.4232).
//   textbook      (15/8, -10/8, 3/8): the convergent quintic; enough steps give the exact msign.
//   custom        any user list; later steps reuse the last triple.
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
  enum class Kind { keller, you, polar_express, textbook, custom };

  static Schedule keller() { return {Kind::keller, "keller", {{3.4445, -4.7750, 2.0315}}, 1.0}; }
  static Schedule you() {
    return {Kind::you,
            "you",
            {{4.0848, -6.8946, 2.9270},
             {3.9505, -6.3029, 2.6377},
             {3.7418, -5.5913, 2.3037},
             {2.8769, -3.1427, 1.2046},
             {2.8366, -3.0525, 1.2012}},
            1.0};
  }
  static Schedule polar_express() { return {Kind::polar_express, "polar_express", {}, 1.02}; }
  static Schedule textbook() { return {Kind::textbook, "textbook", {kTextbookQuintic}, 1.0}; }
  /// A user list; `norm_scale` multiplies ||X||_F in the initial normalization.
  static Schedule custom(std::vector<Coefficients> coefficients, double norm_scale = 1.0) {
    return {Kind::custom, "custom", std::move(coefficients), norm_scale};
  }
  /// keller | you | polar_express | textbook
  static Schedule from_name(const std::string& name) {
    if (name == "keller") return keller();
    if (name == "you") return you();
    if (name == "polar_express") return polar_express();
    if (name == "textbook") return textbook();
    throw InvalidArgument("muon: unknown Newton-Schulz schedule '" + name +
                          "' (expected keller, you, polar_express or textbook)");
  }

  [[nodiscard]] Kind kind() const noexcept { return kind_; }
  [[nodiscard]] const std::string& name() const noexcept { return name_; }
  [[nodiscard]] double norm_scale() const noexcept { return norm_scale_; }
  [[nodiscard]] const std::vector<Coefficients>& listed() const noexcept { return list_; }

  /// The (a, b, c) of each of `steps` steps. Throws InvalidArgument on a malformed schedule.
  [[nodiscard]] std::vector<Coefficients> resolve(int steps) const;

 private:
  Schedule(Kind kind, std::string name, std::vector<Coefficients> list, double norm_scale)
      : kind_(kind), name_(std::move(name)), list_(std::move(list)), norm_scale_(norm_scale) {}

  Kind kind_;
  std::string name_;
  std::vector<Coefficients> list_;
  double norm_scale_;
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
  std::vector<Coefficients> out(static_cast<std::size_t>(steps));
  for (int t = 0; t < steps; ++t)
    out[t] = list_[std::min<std::size_t>(static_cast<std::size_t>(t), list_.size() - 1)];
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
