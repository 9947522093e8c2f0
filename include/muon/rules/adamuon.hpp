#pragma once
// AdaMuon (C. Si, D. Zhang, W. Shen 2025, arXiv:2507.11005; NVIDIA Emerging-Optimizers'
// AdaptiveMuon(moment2_method="adamuon") semantics): Muon whose orthogonalized update is
// normalized elementwise by a running second moment of it, as Adam normalizes a gradient. Per
// matrix W (m x n) with gradient G:
//   M, U, O as Muon's (momentum, Nesterov look-ahead, O <- NewtonSchulz(U))
//   V   <- lerp(V, O .* O, 1 - beta2)     (V: m x n, zero at the start)
//   N   <- O ./ (sqrt(V) + eps)
//   W   <- W (1 - lr wd) - lr s(m, n) N   (ScaleMode and cautious decay as Muon's)
// V is kept where the matrix is orthogonalized. Emerging-Optimizers' scale modes are muon's:
// its "spectral" with extra_scale_factor x is match_rms_adamw with rms_factor x (the default
// here, x = 0.2, Moonlight's RMS alignment), "shape_scaling" is original, "unit_rms_norm" is
// spectral. Other defaults are the peer's (EMA momentum without Nesterov, the quintic set).
#include <cstddef>
#include <string>

#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/stage.hpp"
#include "muon/rules/muon.hpp"

namespace muon {

/// Muon's options (other defaults) and the second moment's.
struct AdaMuonOptions : MuonOptions {
  double beta2 = 0.95;  ///< the second moment's decay
  double moment_eps = 1e-8;  ///< added to its square root (the peer's eps)
  AdaMuonOptions()
      : MuonOptions{.lr = 1e-3,
                    .weight_decay = 0.1,
                    .nesterov = false,
                    .momentum_form = MomentumForm::ema,
                    .scale = ScaleMode::match_rms_adamw,
                    .newton_schulz = {.schedule = Schedule::quintic()}} {}
};

inline void validate(const AdaMuonOptions& o, const std::string& where = "AdaMuonOptions") {
  validate(static_cast<const MuonOptions&>(o), where);
  detail::require(o.beta2 >= 0 && o.beta2 < 1, where, "beta2", o.beta2, "in [0, 1)");
  detail::require(std::isfinite(o.moment_eps) && o.moment_eps > 0, where, "moment_eps",
                  o.moment_eps, "finite and > 0");
}

}  // namespace muon

namespace muon::rules {

struct AdaMuon {
  using Options = AdaMuonOptions;
  static constexpr UpdateRule id{5};
  static constexpr const char* name = "adamuon";
  static constexpr std::size_t buffers = 1;         // M, per element
  static constexpr std::size_t matrix_buffers = 1;  // V, per element of each matrix
  static constexpr bool orthogonalizes = true;
  struct Slot {
    Options adamuon{};
  };
  template <class Group>
  static auto& options(Group& g) {
    return g.adamuon;
  }
  template <class O, class F>
  static void fields(O& o, F&& f) {
    Muon::fields(o, f);
    f("beta2", o.beta2);
    f("moment_eps", o.moment_eps);
  }
  static void validate(const Options& o, const std::string& where) { muon::validate(o, where); }
  static double update_scale(const Options& o, index_t rows, index_t cols) {
    return Muon::update_scale(o, rows, cols);
  }
  /// V's elements for a rows x cols matrix.
  static index_t matrix_state_elements(index_t rows, index_t cols, const Options&) { return rows * cols; }

  template <class B, class T, class S>
  static void accumulate(B& backend, MatrixView<T, S> m, MatrixView<const T, S> g,
                         MatrixView<T, S> u, const Options& o) {
    Muon::accumulate(backend, m, g, u, o);
  }

  /// The update stage on (W, O, V).
  template <class T>
  struct Apply {
    Muon::Apply<T> muon;
    T weight, eps;  // weight = 1 - beta2
    Apply(Muon::Step s, const Options& o)
        : muon(s), weight(static_cast<T>(1 - o.beta2)), eps(static_cast<T>(o.moment_eps)) {}
    template <class W, class O, class V>
    MUON_HOST_DEVICE void operator()(W&& w, const O& o, V&& v) const {
      stage::assign_lerp(v, v, o * o, weight);
      muon(w, o / (stage::sqrt(v) + eps));
    }
  };

  /// W <- decay W - alpha N for one matrix; `state` holds its V.
  template <class B, class T, class S>
  static void apply(B& backend, MatrixView<T, S> w, MatrixView<const T, S> o,
                    const MatrixView<T, S>* state, MatrixView<T, S> /*scratch*/,
                    const Options& options) {
    const index_t m = w.rows(), n = w.cols();
    backend.each(Apply<T>(Muon::step(options, m, n), options), w, o,
                 MatrixView<T, S>(state[0].data(), m, n, n, 1));
  }
};

}  // namespace muon::rules
