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
#include "muon/core/stage.hpp"

namespace muon::rules {

struct Muon {
  using Options = MuonOptions;
  static constexpr UpdateRule id = UpdateRule::muon;
  static constexpr const char* name = "muon";
  static constexpr std::size_t buffers = 1;      // M
  static constexpr bool orthogonalizes = true;  // U goes through Newton-Schulz before apply()
  static const Options& options(const GroupOptions& g) { return g.muon; }
  static Options& options(GroupOptions& g) { return g.muon; }

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

  /// W <- decay W - alpha O for one rows x cols matrix.
  struct Step {
    double decay, alpha;
  };
  static Step step(const Options& o, index_t rows, index_t cols) {
    return {1 - o.lr * o.weight_decay, o.lr * shape_scale(o.scale, rows, cols, o.rms_factor)};
  }
  /// The update stage on (W, O).
  template <class T>
  struct Apply {
    T decay, alpha;
    explicit Apply(Step s) : decay(static_cast<T>(s.decay)), alpha(static_cast<T>(s.alpha)) {}
    template <class W, class O>
    MUON_HOST_DEVICE void operator()(W&& w, const O& o) const {
      w = w * decay - alpha * o;
    }
  };
  template <class B, class T, class S>
  static void apply(B& backend, MatrixView<T, S> w, MatrixView<const T, S> o,
                    const Options& options) {
    backend.each(Apply<T>(step(options, w.rows(), w.cols())), w, o);
  }
};

}  // namespace muon::rules
