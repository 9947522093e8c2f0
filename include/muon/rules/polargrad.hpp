#pragma once
// PolarGrad (T. T.-K. Lau, Q. Long, W. Su 2025, arXiv:2505.21799; NVIDIA Emerging-Optimizers'
// PolarGrad semantics): Muon's orthogonalized update scaled by the nuclear norm of its input,
// which makes it steepest descent in the spectral norm rather than Muon's normalized step. Per
// matrix W with gradient G:
//   M, U, O as Muon's (momentum, Nesterov look-ahead, O <- NewtonSchulz(U))
//   nu  <- <O, U>_F = sum_ij O_ij U_ij    (the nuclear norm ||U||_* when O = msign(U))
//   W   <- W (1 - lr wd) - lr s(m, n) extra_scale nu O   (ScaleMode and cautious decay as Muon's)
// Its defaults are Emerging-Optimizers' (EMA momentum without Nesterov, no shape scale, the
// quintic coefficient set, lr 3e-4, weight decay 0.01).
#include <cstddef>
#include <string>

#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/stage.hpp"
#include "muon/rules/muon.hpp"

namespace muon {

/// Muon's options (other defaults) and the factor on the nuclear-norm step.
struct PolarGradOptions : MuonOptions {
  double extra_scale = 1.0;  ///< Emerging-Optimizers' extra_scale_factor
  PolarGradOptions()
      : MuonOptions{.lr = 3e-4,
                    .weight_decay = 0.01,
                    .nesterov = false,
                    .momentum_form = MomentumForm::ema,
                    .scale = ScaleMode::none,
                    .newton_schulz = {.schedule = Schedule::quintic()}} {}
};

inline void validate(const PolarGradOptions& o, const std::string& where = "PolarGradOptions") {
  validate(static_cast<const MuonOptions&>(o), where);
  detail::require(std::isfinite(o.extra_scale) && o.extra_scale > 0, where, "extra_scale",
                  o.extra_scale, "finite and > 0");
}

}  // namespace muon

namespace muon::rules {

struct PolarGrad {
  using Options = PolarGradOptions;
  static constexpr UpdateRule id{4};
  static constexpr const char* name = "polargrad";
  static constexpr std::size_t buffers = 1;  // M
  static constexpr bool orthogonalizes = true;
  static constexpr bool fixed_update_scale = false;  // the step is also nu times O
  struct Slot {
    Options polargrad{};
  };
  template <class Group>
  static auto& options(Group& g) {
    return g.polargrad;
  }
  template <class O, class F>
  static void fields(O& o, F&& f) {
    Muon::fields(o, f);
    f("extra_scale", o.extra_scale);
  }
  static void validate(const Options& o, const std::string& where) { muon::validate(o, where); }
  static double update_scale(const Options& o, index_t rows, index_t cols) {
    return Muon::update_scale(o, rows, cols) * o.extra_scale;
  }
  /// apply()'s scratch for a rows x cols matrix: a copy of U, its row sums and their total.
  static index_t scratch_elements(index_t rows, index_t cols) { return rows * cols + rows + 1; }

  template <class B, class T, class S>
  static void accumulate(B& backend, MatrixView<T, S> m, MatrixView<const T, S> g,
                         MatrixView<T, S> u, const Options& o) {
    Muon::accumulate(backend, m, g, u, o);
  }
  /// Keeps U, the Newton-Schulz input, for apply().
  template <class B, class T, class S>
  static void observe_input(B& backend, MatrixView<const T, S> u, MatrixView<T, S> scratch,
                            const Options&) {
    backend.copy(u, MatrixView<T, S>(scratch.data(), u.rows(), u.cols(), u.cols(), 1));
  }

  struct Multiply {
    template <class A, class B>
    MUON_HOST_DEVICE void operator()(A&& a, const B& b) const {
      a = a * b;
    }
  };
  template <class B, class T, class S>
  static void apply(B& backend, MatrixView<T, S> w, MatrixView<const T, S> o,
                    const MatrixView<T, S>* /*state*/, MatrixView<T, S> scratch,
                    const Options& options) {
    using View = MatrixView<T, S>;
    using ConstView = MatrixView<const T, S>;
    const index_t m = w.rows(), n = w.cols();
    T* at = scratch.data();
    const View u(at, m, n, n, 1), r(at + m * n, m, 1, 1, 1), nu(at + m * n + m, 1, 1, 1, 1);
    backend.each(Multiply{}, u, o);  // U .* O
    backend.reduce_rows(stage::Identity{}, r, ConstView(u));
    backend.reduce_rows(stage::Identity{}, nu, ConstView(r).transposed());
    backend.each(Muon::ScaledApply<T>(Muon::step(options, update_scale(options, m, n)), nu.data()), w, o);
  }
};

}  // namespace muon::rules
