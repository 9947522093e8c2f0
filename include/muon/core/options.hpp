#pragma once
// Hyper-parameters. Defaults are torch.optim.Muon's and torch.optim.AdamW's, so a model tuned
// with PyTorch keeps its settings. Every option is checked by validate() when an optimizer or
// group is created or changed, never inside step().
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "muon/core/error.hpp"
#include "muon/core/schedule.hpp"

namespace muon {

/// ema: M <- mu M + (1 - mu) G (torch, Keller).   sum: M <- mu M + G (Moonlight, dion).
enum class MomentumForm { ema, sum };

/// Per-shape factor s on the Muon update W <- W - lr * s * O, on the flattened (rows, cols):
///   original         sqrt(max(1, rows / cols))            (Keller; torch default)
///   match_rms_adamw  rms_factor * sqrt(max(rows, cols))   (Moonlight: update RMS = rms_factor)
///   spectral         sqrt(rows / cols)                    (dion)
///   none             1
enum class ScaleMode { original, match_rms_adamw, spectral, none };

/// What step() does when a gradient holds NaN or Inf. With error or skip nothing is modified.
///   error: throw NonFiniteGradient naming the parameter.   skip: return a report saying so.
///   unchecked: no check (as torch.optim does); NaN propagates into the parameters. On a GPU
///   this is what keeps step() free of host synchronization (and capturable in a CUDA graph).
/// With error or skip each Muon parameter's Newton-Schulz result is checked too, before it is
/// applied. Newton-Schulz is finite for finite input (schedules that diverge are refused), so
/// this fires only when the momentum itself overflows (sum form, gradients near the float
/// maximum): that parameter and its momentum are left as they were, the others take the step,
/// and error throws NonFiniteUpdate afterwards while skip counts it in StepReport::refused.
enum class NonFinitePolicy { error, skip, unchecked };

/// How Newton–Schulz is carried out (the same iteration; only flops and rounding differ):
///   standard   X <- B X every step (3 k^2 N + k^3 flops a step)
///   gram       on the k x k Gram matrix, X touched once at the end (algorithm/newton_schulz.hpp)
///   automatic  gram for matrices at least kGramMinAspect times as long as wide, where it saves
///              flops even with the restarts the schedule and precision need; else standard
enum class NewtonSchulzMethod { standard, gram, automatic };

struct NewtonSchulzOptions {
  Schedule schedule = Schedule::keller();
  int steps = 5;
  double eps = 1e-7;  ///< X is divided by max(norm_scale * ||X||_F, eps)
  NewtonSchulzMethod method = NewtonSchulzMethod::automatic;
  /// 0: run the schedule only. Otherwise, after the schedule, textbook quintic steps follow
  /// until the result's residual ||O O^T - I||_F / sqrt(min(m, n)) is at most `tolerance` or
  /// `max_extra_steps` were added (each costs one plain-loop step; the check itself one SYRK).
  /// keller and you stop short of 1 by design (residual about 0.1-0.3), so with them this is a
  /// clean-up to the exact msign; polar_express and textbook are already close. A matrix of
  /// rank r cannot get below sqrt(1 - r / min(m, n)): the cap is what ends such runs.
  double tolerance = 0;
  int max_extra_steps = 10;
};

struct OptimizerOptions {
  NonFinitePolicy non_finite = NonFinitePolicy::error;
  /// Each step() reports, per Muon matrix, how orthogonal its update was (StepReport::
  /// newton_schulz). Costs one SYRK and two host reads a matrix, and the report's allocation;
  /// needs a backend that measures residuals (EigenBackend). Optimizer only.
  bool telemetry = false;
  /// Newton-Schulz runs grouped: on a backend with workers (RunsSideBySide: EigenBackend) the
  /// matrices that gain from it side by side, one BLAS thread each, costliest first; on a
  /// batching backend (RunsBatched: CudaBackend, float) same-shape matrices of one group in one
  /// batched call. false: every matrix one after the other, as a loop over the parameters
  /// would (e.g. when your own threads keep the cores busy).
  bool grouped = true;
  /// Check, at every step(), that the objects registered through add_muon / add_adamw (an
  /// Eigen::Matrix, your own adapted type) still hold the memory they were registered with.
  /// Assigning a new matrix to a registered gradient (`G = make_grad();` move-assigns, so G
  /// takes the new storage and the optimizer's view is left on freed memory) is then refused
  /// with an error naming the parameter instead of reading freed memory. Costs one muon::view()
  /// per registered object a step; the objects themselves (not only their memory) must then
  /// outlive the optimizer. Off by default.
  bool watch_storage = false;
};

inline const char* to_string(MomentumForm f) {
  switch (f) {
    case MomentumForm::ema: return "ema";
    case MomentumForm::sum: return "sum";
  }
  return "?";
}
inline const char* to_string(ScaleMode s) {
  switch (s) {
    case ScaleMode::original: return "original";
    case ScaleMode::match_rms_adamw: return "match_rms_adamw";
    case ScaleMode::spectral: return "spectral";
    case ScaleMode::none: return "none";
  }
  return "?";
}
inline const char* to_string(NewtonSchulzMethod m) {
  switch (m) {
    case NewtonSchulzMethod::standard: return "standard";
    case NewtonSchulzMethod::gram: return "gram";
    case NewtonSchulzMethod::automatic: return "automatic";
  }
  return "?";
}
inline ScaleMode scale_mode_from_name(const std::string& name) {
  for (ScaleMode s : {ScaleMode::original, ScaleMode::match_rms_adamw, ScaleMode::spectral,
                      ScaleMode::none})
    if (name == to_string(s)) return s;
  throw InvalidArgument("muon: unknown scale mode '" + name +
                        "' (expected original, match_rms_adamw, spectral or none)");
}
inline MomentumForm momentum_form_from_name(const std::string& name) {
  if (name == "ema") return MomentumForm::ema;
  if (name == "sum") return MomentumForm::sum;
  throw InvalidArgument("muon: unknown momentum form '" + name + "' (expected ema or sum)");
}

namespace detail {

inline void require(bool ok, const std::string& where, const char* field, double value,
                    const char* rule) {
  if (!ok)
    throw InvalidArgument("muon: " + where + "." + field + " = " + std::to_string(value) +
                          " is invalid: it must be " + rule);
}

/// An enumerator outside its enum (a cast from a bad integer, a corrupted archive) is refused
/// like a bad number, naming the field.
template <class E, class... Known>
void require_enum(E value, const std::string& where, const char* field, Known... known) {
  if (((value != known) && ...))
    throw InvalidArgument("muon: " + where + "." + field + " = " +
                          std::to_string(static_cast<long long>(value)) +
                          " is not one of its enumerators");
}

}  // namespace detail

inline void validate(const NewtonSchulzOptions& o, const std::string& where) {
  detail::require(std::isfinite(o.eps) && o.eps > 0, where, "newton_schulz.eps", o.eps,
                  "finite and > 0");
  detail::require(std::isfinite(o.tolerance) && o.tolerance >= 0, where,
                  "newton_schulz.tolerance", o.tolerance, "finite and >= 0 (0 = off)");
  detail::require(o.max_extra_steps >= 0 && o.max_extra_steps <= kMaxNewtonSchulzSteps, where,
                  "newton_schulz.max_extra_steps", o.max_extra_steps, "in [0, 100]");
  std::vector<Coefficients> steps;
  try {
    steps = o.schedule.resolve(o.steps);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(std::string(e.what()) + " (in " + where + ".newton_schulz)");
  }
  if (o.tolerance == 0) return;
  // The added textbook steps converge only from singular values below kTextbookBasin.
  const double output =
      singular_value_bound(steps, 1.0 / std::min(o.schedule.norm_scale(), 1.0)).output;
  if (!(output < kTextbookBasin))
    throw InvalidArgument("muon: " + where + ".newton_schulz.tolerance: schedule '" +
                          o.schedule.name() + "' with " + std::to_string(o.steps) +
                          " steps can end with singular values up to " +
                          std::to_string(output) +
                          ", from where the added textbook steps diverge (they need < " +
                          std::to_string(kTextbookBasin) + ")");
}

inline void validate(const OptimizerOptions& o, const std::string& where = "OptimizerOptions") {
  detail::require_enum(o.non_finite, where, "non_finite", NonFinitePolicy::error, NonFinitePolicy::skip,
               NonFinitePolicy::unchecked);
}

}  // namespace muon
