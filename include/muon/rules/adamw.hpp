#pragma once
// AdamW's update rule (Loshchilov & Hutter 2019; torch.optim.AdamW semantics) for the
// parameters routed to it. Elementwise: the driver calls update() on whatever piece of the
// parameter this process holds.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"

namespace muon::rules {

struct AdamW {
  using Options = AdamWOptions;
  static constexpr UpdateRule id = UpdateRule::adamw;
  static constexpr const char* name = "adamw";
  static constexpr std::size_t buffers = 2;  // first and second moments m, v
  static constexpr bool orthogonalizes = false;
  static const Options& options(const GroupOptions& g) { return g.adamw; }

  /// The fused stage's coefficients for the `step`-th update (1-based), bias corrections
  /// folded in.
  static AdamWStep step(const Options& o, std::uint64_t step) {
    const auto t = static_cast<double>(step);
    const double bias1 = 1 - std::pow(o.beta1, t), bias2 = 1 - std::pow(o.beta2, t);
    return {1 - o.lr * o.weight_decay, o.beta1, o.beta2, o.eps, o.lr / bias1, std::sqrt(bias2)};
  }

  /// The parameter's `step`-th update (1-based) on a piece of it: `state` holds m and v.
  template <class B, class T, class S>
  static void update(B& backend, MatrixView<T, S> w, MatrixView<const T, S> g,
                     const MatrixView<T, S>* state, const Options& o, std::uint64_t step) {
    backend.adamw(w, g, state[0], state[1], AdamW::step(o, step));
  }
};

}  // namespace muon::rules
