#pragma once
// Lion (X. Chen et al. 2023, arXiv:2302.06675; microsoft/dion's scalar_opts.py semantics), an
// elementwise rule for the parameters Muon does not take, in place of AdamW. Per parameter W
// with gradient G and momentum M:
//   U <- sign(lerp(M, G, 1 - beta1))      (interpolated momentum; sign(0) = 0)
//   M <- lerp(M, G, 1 - beta2)
//   W <- W (1 - lr wd) - lr U             (decoupled decay, unscaled lr; cautious: decayed
//                                          only where W U >= 0)
// Every element moves by exactly lr (or 0), so its update has RMS 1 per unit lr: Lion takes a
// learning rate about 3-10x smaller than AdamW's (the paper's advice).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/stage.hpp"

namespace muon {

struct LionOptions {
  double lr = 1e-4;
  double beta1 = 0.9;   ///< interpolation of the update's sign
  double beta2 = 0.99;  ///< the momentum's decay
  double weight_decay = 0.0;
  /// Decay only where the update's sign agrees with the weight's (arXiv:2510.12402; dion's
  /// cautious_wd).
  bool cautious_weight_decay = false;
};

inline void validate(const LionOptions& o, const std::string& where = "LionOptions") {
  detail::require(std::isfinite(o.lr) && o.lr >= 0, where, "lr", o.lr, "finite and >= 0");
  detail::require(std::isfinite(o.weight_decay) && o.weight_decay >= 0, where, "weight_decay",
                  o.weight_decay, "finite and >= 0");
  detail::require(o.beta1 >= 0 && o.beta1 <= 1, where, "beta1", o.beta1, "in [0, 1]");
  detail::require(o.beta2 >= 0 && o.beta2 < 1, where, "beta2", o.beta2, "in [0, 1)");
}

}  // namespace muon

namespace muon::rules {

struct Lion {
  using Options = LionOptions;
  static constexpr UpdateRule id{2};
  static constexpr const char* name = "lion";
  static constexpr std::size_t buffers = 1;  // M
  static constexpr bool orthogonalizes = false;
  /// Its member of muon::GroupOptions.
  struct Slot {
    Options lion{};
  };
  template <class Group>
  static auto& options(Group& g) {
    return g.lion;
  }

  template <class O, class F>
  static void fields(O& o, F&& f) {
    f("lr", o.lr);
    f("beta1", o.beta1);
    f("beta2", o.beta2);
    f("weight_decay", o.weight_decay);
    f("cautious_weight_decay", o.cautious_weight_decay);
  }
  static void validate(const Options& o, const std::string& where) { muon::validate(o, where); }

  /// The stage on (W, G, M). The sign of U is taken from torch's two-sided lerp (the branch
  /// is on the coefficient); lr U is exact, so W's new value is rounded once after the decay.
  /// (Cautious: W - (W lr wd) only where W U >= 0.)
  template <class T>
  struct Update {
    T decay, coeff, lr, w1, w2;
    bool cautious;
    explicit Update(const Options& o)
        : decay(static_cast<T>(1 - o.lr * o.weight_decay)),
          coeff(static_cast<T>(o.lr * o.weight_decay)),
          lr(static_cast<T>(o.lr)),
          w1(static_cast<T>(1 - o.beta1)),
          w2(static_cast<T>(1 - o.beta2)),
          cautious(o.cautious_weight_decay && o.weight_decay != 0) {}
    template <class W, class G, class M>
    MUON_HOST_DEVICE void operator()(W&& w, const G& g, M&& m) const {
      if (w1 < T(0.5))
        step(w, stage::sign(m + w1 * (g - m)));
      else
        step(w, stage::sign(g - (T(1) - w1) * (g - m)));
      stage::assign_lerp(m, m, g, w2);
    }
    template <class W, class U>
    MUON_HOST_DEVICE void step(W&& w, const U& u) const {
      if (cautious)
        w = stage::cautious_decay(w, u, coeff);
      else
        w *= decay;
      w = w - lr * u;
    }
  };

  /// The parameter's update on a piece of it: `state` holds M.
  template <class B, class T, class S>
  static void update(B& backend, MatrixView<T, S> w, MatrixView<const T, S> g,
                     const MatrixView<T, S>* state, const Options& o, std::uint64_t) {
    backend.each(Update<T>(o), w, g, state[0]);
  }
};

}  // namespace muon::rules
