#pragma once
// NAMO (arXiv:2602.17080; NVIDIA Emerging-Optimizers' AdaptiveMuon(moment2_method="namo")
// semantics): Muon whose orthogonalized update is scaled by one adaptive scalar per matrix, the
// ratio of the Newton-Schulz input's Frobenius norm to a running root mean of the raw
// gradient's. Per matrix W (m x n) with gradient G:
//   M, U, O as Muon's (momentum, Nesterov look-ahead, O <- NewtonSchulz(U))
//   v     <- lerp(v, ||G||_F^2, 1 - beta2)   (v: one value per matrix, zero at the start)
//   alpha <- ||U||_F / (sqrt(v) + eps)
//   W     <- W (1 - lr wd) - lr s(m, n) alpha O   (ScaleMode and cautious decay as Muon's)
// ||G||_F is the whole matrix's: the driver sums its squares over the matrix (and, where the
// gradient is sliced over ranks, over the ranks) and hands the sum to observe_gradient_norm.
// Options and defaults are AdaMuon's (the same peer class): EMA momentum without Nesterov, the
// quintic set, Moonlight's RMS alignment.
#include <cstddef>
#include <string>

#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/stage.hpp"
#include "muon/rules/adamuon.hpp"
#include "muon/rules/muon.hpp"

namespace muon {

/// AdaMuon's options: beta2 decays the running ||G||_F^2, moment_eps is added to its root.
struct NamoOptions : AdaMuonOptions {};

inline void validate(const NamoOptions& o, const std::string& where = "NamoOptions") {
  validate(static_cast<const AdaMuonOptions&>(o), where);
}

}  // namespace muon

namespace muon::rules {

struct Namo {
  using Options = NamoOptions;
  static constexpr UpdateRule id{6};
  static constexpr const char* name = "namo";
  static constexpr std::size_t buffers = 1;         // M, per element
  static constexpr std::size_t matrix_buffers = 1;  // v, one per matrix
  static constexpr bool orthogonalizes = true;
  static constexpr bool fixed_update_scale = false;  // the step is also alpha times O
  struct Slot {
    Options namo{};
  };
  template <class Group>
  static auto& options(Group& g) {
    return g.namo;
  }
  template <class O, class F>
  static void fields(O& o, F&& f) {
    AdaMuon::fields(o, f);
  }
  static void validate(const Options& o, const std::string& where) { muon::validate(o, where); }
  static double update_scale(const Options& o, index_t rows, index_t cols) {
    return Muon::update_scale(o, rows, cols);
  }
  static index_t matrix_state_elements(index_t, index_t, const Options&) { return 1; }
  /// apply()'s scratch: ||G||_F^2, ||U||_F^2 (then alpha), and U's row sums of squares.
  static index_t scratch_elements(index_t rows, index_t) { return rows + 2; }

  template <class B, class T, class S>
  static void accumulate(B& backend, MatrixView<T, S> m, MatrixView<const T, S> g,
                         MatrixView<T, S> u, const Options& o) {
    Muon::accumulate(backend, m, g, u, o);
  }
  /// Keeps ||G||_F^2 (1 x 1, in the backend's memory) for apply().
  template <class B, class T, class S>
  static void observe_gradient_norm(B& backend, MatrixView<const T, S> squared,
                                    MatrixView<T, S> scratch, const Options&) {
    backend.copy(squared, MatrixView<T, S>(scratch.data(), 1, 1, 1, 1));
  }
  /// Keeps ||U||_F^2, U the Newton-Schulz input, for apply().
  template <class B, class T, class S>
  static void observe_input(B& backend, MatrixView<const T, S> u, MatrixView<T, S> scratch,
                            const Options&) {
    const MatrixView<T, S> r(scratch.data() + 2, u.rows(), 1, 1, 1);
    backend.reduce_rows(stage::Square{}, r, u);
    backend.reduce_rows(stage::Identity{}, MatrixView<T, S>(scratch.data() + 1, 1, 1, 1, 1),
                        MatrixView<const T, S>(r).transposed());
  }

  /// The stage on (v, ||G||^2, ||U||^2), 1 x 1 each: v's new value, and alpha in place of ||U||^2.
  template <class T>
  struct Alpha {
    T weight, eps;  // weight = 1 - beta2
    explicit Alpha(const Options& o)
        : weight(static_cast<T>(1 - o.beta2)), eps(static_cast<T>(o.moment_eps)) {}
    template <class V, class G, class U>
    MUON_HOST_DEVICE void operator()(V&& v, const G& g, U&& u) const {
      stage::assign_lerp(v, v, g, weight);
      u = stage::sqrt(u) / (stage::sqrt(v) + eps);
    }
  };
  /// W <- decay W - lr s alpha O for one matrix; `state` holds its v.
  template <class B, class T, class S>
  static void apply(B& backend, MatrixView<T, S> w, MatrixView<const T, S> o,
                    const MatrixView<T, S>* state, MatrixView<T, S> scratch,
                    const Options& options) {
    using View = MatrixView<T, S>;
    const View g2(scratch.data(), 1, 1, 1, 1), alpha(scratch.data() + 1, 1, 1, 1, 1);
    backend.each(Alpha<T>(options), state[0], MatrixView<const T, S>(g2), alpha);
    backend.each(Muon::ScaledApply<T>(Muon::step(options, w.rows(), w.cols()), alpha.data()), w, o);
  }
};

}  // namespace muon::rules
