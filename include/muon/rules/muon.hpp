#pragma once
// Muon's update rule (K. Jordan et al. 2024; torch.optim.Muon semantics), per matrix W with
// gradient G and momentum M:
//   M <- mu M + (1 - mu) G                 (MomentumForm::ema; ::sum is M <- mu M + G)
//   U <- (1 - mu) G + mu M  if nesterov    (::sum: U <- G + mu M), else U <- M
//   O <- NewtonSchulz(U)                   (the optimizer's driver runs it, batched)
//   W <- W (1 - lr wd) - lr s(rows, cols) O   (decoupled decay once, unscaled lr; ScaleMode)
// The driver calls accumulate() on whatever piece of M and G this process holds, orthogonalizes
// each matrix of U whole, and calls apply() on each matrix with its own shape.
#include <cstddef>

#include "muon/algorithm/shape_scale.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"

namespace muon::rules {

struct Muon {
  using Options = MuonOptions;
  static constexpr UpdateRule id = UpdateRule::muon;
  static constexpr const char* name = "muon";
  static constexpr std::size_t buffers = 1;      // M
  static constexpr bool orthogonalizes = true;  // U goes through Newton-Schulz before apply()
  static const Options& options(const GroupOptions& g) { return g.muon; }

  /// M, G -> M (in place) and the Newton-Schulz input U, on any piece of the matrix.
  template <class B, class T, class S>
  static void accumulate(B& backend, MatrixView<T, S> m, MatrixView<const T, S> g,
                         MatrixView<T, S> u, const Options& o) {
    backend.momentum(m, g, u, MomentumStep{o.momentum, o.momentum_form, o.nesterov});
  }

  /// W <- decay W - alpha O for one rows x cols matrix.
  struct Step {
    double decay, alpha;
  };
  static Step step(const Options& o, index_t rows, index_t cols) {
    return {1 - o.lr * o.weight_decay, o.lr * shape_scale(o.scale, rows, cols, o.rms_factor)};
  }
  template <class B, class T, class S>
  static void apply(B& backend, MatrixView<T, S> w, MatrixView<const T, S> o,
                    const Options& options) {
    const Step s = step(options, w.rows(), w.cols());
    backend.apply_update(w, o, s.decay, s.alpha);
  }
};

}  // namespace muon::rules
