#pragma once
// AdamW's update rule (Loshchilov & Hutter 2019; torch.optim.AdamW semantics) for the
// parameters routed to it. Elementwise: the driver calls update() on whatever piece of the
// parameter this process holds.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/stage.hpp"

namespace muon {

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  /// Decay only where the update m / (sqrt(v) + eps) agrees in sign with the weight
  /// (arXiv:2510.12402; dion's cautious_wd).
  bool cautious_weight_decay = false;
};

inline void validate(const AdamWOptions& o, const std::string& where = "AdamWOptions") {
  detail::require(std::isfinite(o.lr) && o.lr >= 0, where, "lr", o.lr, "finite and >= 0");
  detail::require(std::isfinite(o.weight_decay) && o.weight_decay >= 0, where, "weight_decay",
                  o.weight_decay, "finite and >= 0");
  detail::require(o.beta1 >= 0 && o.beta1 < 1, where, "beta1", o.beta1, "in [0, 1)");
  detail::require(o.beta2 >= 0 && o.beta2 < 1, where, "beta2", o.beta2, "in [0, 1)");
  detail::require(std::isfinite(o.eps) && o.eps > 0, where, "eps", o.eps, "finite and > 0");
}

}  // namespace muon

namespace muon::rules {

struct AdamW {
  using Options = AdamWOptions;
  static constexpr UpdateRule id = UpdateRule::adamw;
  static constexpr const char* name = "adamw";
  static constexpr std::size_t buffers = 2;  // first and second moments m, v
  static constexpr bool orthogonalizes = false;
  /// Its member of muon::GroupOptions.
  struct Slot {
    Options adamw{};
  };
  template <class Group>
  static auto& options(Group& g) {
    return g.adamw;
  }
  template <class O, class F>
  static void fields(O& o, F&& f) {
    f("lr", o.lr);
    f("beta1", o.beta1);
    f("beta2", o.beta2);
    f("eps", o.eps);
    f("weight_decay", o.weight_decay);
    f("cautious_weight_decay", o.cautious_weight_decay);
  }
  static void validate(const Options& o, const std::string& where) { muon::validate(o, where); }

  /// The stage on (W, G, m, v) for the `step`-th update (1-based), in torch's operation order
  /// with the bias corrections folded into its coefficients:
  ///   W *= 1 - lr wd; m = lerp(m, G, 1 - beta1); v = beta2 v + (1 - beta2) G^2;
  ///   W -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
  /// (cautious: W - (W lr wd) only where W m / (sqrt(v) / sqrt(1 - beta2^t) + eps) >= 0).
  template <class T>
  struct Update {
    T decay, coeff, w1, beta2, w2, eps, step_size, sqrt_bias2;
    bool cautious;
    Update(const Options& o, std::uint64_t step) {
      const auto t = static_cast<double>(step);
      const double bias1 = 1 - std::pow(o.beta1, t), bias2 = 1 - std::pow(o.beta2, t);
      decay = static_cast<T>(1 - o.lr * o.weight_decay);
      coeff = static_cast<T>(o.lr * o.weight_decay);
      cautious = o.cautious_weight_decay && o.weight_decay != 0;
      w1 = static_cast<T>(1 - o.beta1);
      beta2 = static_cast<T>(o.beta2);
      w2 = static_cast<T>(1 - o.beta2);
      eps = static_cast<T>(o.eps);
      step_size = static_cast<T>(o.lr / bias1);
      sqrt_bias2 = static_cast<T>(std::sqrt(bias2));
    }
    template <class W, class G, class M, class V>
    MUON_HOST_DEVICE void operator()(W&& w, const G& g, M&& m, V&& v) const {
      stage::assign_lerp(m, m, g, w1);
      v = v * beta2 + w2 * g * g;
      if (cautious)
        w = stage::cautious_decay(w, m / (stage::sqrt(v) / sqrt_bias2 + eps), coeff);
      else
        w *= decay;
      w = w - step_size * (m / (stage::sqrt(v) / sqrt_bias2 + eps));
    }
  };

  /// The parameter's `step`-th update (1-based) on a piece of it: `state` holds m and v.
  template <class B, class T, class S>
  static void update(B& backend, MatrixView<T, S> w, MatrixView<const T, S> g,
                     const MatrixView<T, S>* state, const Options& o, std::uint64_t step) {
    backend.each(Update<T>(o, step), w, g, state[0], state[1]);
  }
};

}  // namespace muon::rules
