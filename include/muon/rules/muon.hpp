#pragma once
// Muon's update rule (K. Jordan et al. 2024; torch.optim.Muon semantics), per matrix W with
// gradient G and momentum M:
//   M <- mu M + (1 - mu) G                 (MomentumForm::ema; ::sum is M <- mu M + G)
//   U <- (1 - mu) G + mu M  if nesterov    (::sum: U <- G + mu M), else U <- M
//   O <- NewtonSchulz(U)                   (the optimizer's driver runs it, batched)
//   W <- W (1 - lr wd) - lr s(rows, cols) O   (decoupled decay once, unscaled lr; ScaleMode;
//                                             cautious: decayed only where W O >= 0)
// The driver calls accumulate() on whatever piece of M and G this process holds, orthogonalizes
// each matrix of U whole, and calls apply() on each matrix with its own shape.
#include <cmath>
#include <cstddef>
#include <string>

#include "muon/algorithm/shape_scale.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/stage.hpp"

namespace muon {

struct MuonOptions {
  double lr = 1e-3;
  double weight_decay = 0.1;  ///< decoupled: W <- W (1 - lr * weight_decay), unscaled lr
  double momentum = 0.95;
  bool nesterov = true;
  MomentumForm momentum_form = MomentumForm::ema;
  ScaleMode scale = ScaleMode::original;
  double rms_factor = 0.2;  ///< the target RMS of ScaleMode::match_rms_adamw
  /// Decay only the elements whose update agrees in sign with the weight (arXiv:2510.12402;
  /// dion's cautious_wd): W <- W - lr wd W there, W elsewhere, before the update.
  bool cautious_weight_decay = false;
  NewtonSchulzOptions newton_schulz{};
};

inline void validate(const MuonOptions& o, const std::string& where = "MuonOptions") {
  detail::require_enum(o.momentum_form, where, "momentum_form", MomentumForm::ema, MomentumForm::sum);
  detail::require_enum(o.scale, where, "scale", ScaleMode::original, ScaleMode::match_rms_adamw,
               ScaleMode::spectral, ScaleMode::none);
  detail::require_enum(o.newton_schulz.method, where, "newton_schulz.method",
               NewtonSchulzMethod::standard, NewtonSchulzMethod::gram,
               NewtonSchulzMethod::automatic);
  detail::require(std::isfinite(o.lr) && o.lr >= 0, where, "lr", o.lr, "finite and >= 0");
  detail::require(std::isfinite(o.weight_decay) && o.weight_decay >= 0, where, "weight_decay",
                  o.weight_decay, "finite and >= 0");
  detail::require(o.momentum >= 0 && o.momentum < 1, where, "momentum", o.momentum,
                  "in [0, 1)");
  detail::require(std::isfinite(o.rms_factor) && o.rms_factor > 0, where, "rms_factor",
                  o.rms_factor, "finite and > 0");
  validate(o.newton_schulz, where);
}

}  // namespace muon

namespace muon::rules {

struct Muon {
  using Options = MuonOptions;
  static constexpr UpdateRule id = UpdateRule::muon;
  static constexpr const char* name = "muon";
  static constexpr std::size_t buffers = 1;      // M
  static constexpr bool orthogonalizes = true;  // U goes through Newton-Schulz before apply()
  /// Its member of muon::GroupOptions.
  struct Slot {
    Options muon{};
  };
  template <class Group>
  static auto& options(Group& g) {
    return g.muon;
  }
  /// Every option but the schedule, by name, to f(name, field).
  template <class O, class F>
  static void fields(O& o, F&& f) {
    f("lr", o.lr);
    f("weight_decay", o.weight_decay);
    f("momentum", o.momentum);
    f("nesterov", o.nesterov);
    f("momentum_form", o.momentum_form);
    f("scale", o.scale);
    f("rms_factor", o.rms_factor);
    f("cautious_weight_decay", o.cautious_weight_decay);
    f("ns.steps", o.newton_schulz.steps);
    f("ns.eps", o.newton_schulz.eps);
    f("ns.method", o.newton_schulz.method);
    f("ns.tolerance", o.newton_schulz.tolerance);
    f("ns.max_extra_steps", o.newton_schulz.max_extra_steps);
  }
  static void validate(const Options& o, const std::string& where) { muon::validate(o, where); }
  /// The factor s of the update W <- W - lr s O of a rows x cols matrix.
  static double update_scale(const Options& o, index_t rows, index_t cols) {
    return shape_scale(o.scale, rows, cols, o.rms_factor);
  }

  /// The momentum stage on (M, G, U): M <- lerp(M, G, 1 - mu) or mu M + G, then U <- the
  /// Nesterov look-ahead (lerp(G, M, mu) or G + mu M) or M.
  template <class T>
  struct Accumulate {
    T mu, weight;  // weight = 1 - mu, rounded once in T as torch does
    bool ema, nesterov;
    explicit Accumulate(const Options& o)
        : mu(static_cast<T>(o.momentum)),
          weight(static_cast<T>(1 - o.momentum)),
          ema(o.momentum_form == MomentumForm::ema),
          nesterov(o.nesterov) {}
    template <class M, class G, class U>
    MUON_HOST_DEVICE void operator()(M&& m, const G& g, U&& u) const {
      if (ema)
        stage::assign_lerp(m, m, g, weight);
      else
        m = mu * m + g;
      if (!nesterov)
        u = m;
      else if (ema)
        stage::assign_lerp(u, g, m, mu);
      else
        u = g + mu * m;
    }
  };

  /// M, G -> M (in place) and the Newton-Schulz input U, on any piece of the matrix.
  template <class B, class T, class S>
  static void accumulate(B& backend, MatrixView<T, S> m, MatrixView<const T, S> g,
                         MatrixView<T, S> u, const Options& o) {
    backend.each(Accumulate<T>(o), m, g, u);
  }

  /// W <- decay W - alpha O for one rows x cols matrix (cautious: W - (W coeff) where W O >= 0,
  /// then - alpha O).
  struct Step {
    double decay, alpha, coeff;
    bool cautious;
  };
  static Step step(const Options& o, index_t rows, index_t cols) {
    return step(o, update_scale(o, rows, cols));
  }
  /// The same with the factor s given (a rule whose update_scale() is not Muon's).
  static Step step(const Options& o, double scale) {
    return {1 - o.lr * o.weight_decay, o.lr * scale, o.lr * o.weight_decay,
            o.cautious_weight_decay && o.weight_decay != 0};
  }
  /// The update stage on (W, O).
  template <class T>
  struct Apply {
    T decay, alpha, coeff;
    bool cautious;
    explicit Apply(Step s)
        : decay(static_cast<T>(s.decay)), alpha(static_cast<T>(s.alpha)),
          coeff(static_cast<T>(s.coeff)), cautious(s.cautious) {}
    template <class W, class O>
    MUON_HOST_DEVICE void operator()(W&& w, const O& o) const {
      if (cautious)
        w = stage::cautious_decay(w, o, coeff) - alpha * o;
      else
        w = w * decay - alpha * o;
    }
  };
  /// The update stage on (W, O) of a rule whose step is O times a factor that an earlier
  /// stage computed, read where that stage wrote it (PolarGrad's nu, NAMO's alpha).
  template <class T>
  struct ScaledApply {
    Apply<T> muon;
    const T* factor;
    ScaledApply(Step s, const T* factor) : muon(s), factor(factor) {}
    template <class W, class O>
    MUON_HOST_DEVICE void operator()(W&& w, const O& o) const {
      muon(w, o * *factor);
    }
  };
  /// `state` (buffers per matrix) and `scratch` are for other rules (none here).
  template <class B, class T, class S>
  static void apply(B& backend, MatrixView<T, S> w, MatrixView<const T, S> o,
                    const MatrixView<T, S>* /*state*/, MatrixView<T, S> /*scratch*/,
                    const Options& options) {
    backend.each(Apply<T>(step(options, w.rows(), w.cols())), w, o);
  }
};

}  // namespace muon::rules
