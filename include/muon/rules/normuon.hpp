#pragma once
// NorMuon (Z. Li et al. 2025, arXiv:2510.05491; microsoft/dion's dion/normuon.py semantics):
// Muon whose orthogonalized update is normalized per row (per neuron) by a running second
// moment, then rescaled to keep its Frobenius norm. Per matrix W (m x n) with gradient G:
//   M, U, O as Muon's (momentum, Nesterov look-ahead, O <- NewtonSchulz(U))
//   r_i <- sum_j O_ij^2                   (the row's sum of squares)
//   V_i <- lerp(V_i, r_i / n, 1 - beta2)  (V: one value per row, zero at the start)
//   d_i <- sqrt(V_i) + row_eps
//   N   <- O_ij / d_i, times ||O||_F / max(||O / d||_F, 1e-8)
//   W   <- W (1 - lr wd) - lr s(m, n) N   (ScaleMode and cautious decay, as Muon's)
// NVIDIA Emerging-Optimizers' AdaptiveMuon(moment2_method="normuon") differs in three places,
// NorMuonConvention::emerging_optimizers: a wide matrix (m < n) is normalized per column
// (V one value per column, the mean over its rows), d_i = sqrt(max(V_i, row_eps)), and the
// rescale's floor is row_eps.
// Split blocks and experts are matrices of their own: each has its V rows and its rescale.
// Its defaults are dion's NorMuon's (sum momentum, no Nesterov, spectral scale, lr 0.01).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/stage.hpp"
#include "muon/rules/muon.hpp"

namespace muon {

/// Whose NorMuon the rule follows where the public implementations differ.
enum class NorMuonConvention : std::uint8_t {
  dion = 0,                 ///< microsoft/dion: per row; sqrt(V) + row_eps; rescale floor 1e-8
  emerging_optimizers = 1,  ///< per column when wide; sqrt(max(V, row_eps)); floor row_eps
};
inline const char* to_string(NorMuonConvention c) {
  switch (c) {
    case NorMuonConvention::dion: return "dion";
    case NorMuonConvention::emerging_optimizers: return "emerging_optimizers";
  }
  return "?";
}

/// Muon's options (other defaults) and the row normalization's.
struct NorMuonOptions : MuonOptions {
  double beta2 = 0.95;  ///< the row second moment's decay
  double row_eps = 1e-8;  ///< added to its square root (dion), or its floor (emerging_optimizers)
  /// Fixed once a parameter of its group is registered: it sizes the state (rows or columns).
  NorMuonConvention convention = NorMuonConvention::dion;
  NorMuonOptions()
      : MuonOptions{.lr = 0.01,
                    .weight_decay = 0.01,
                    .nesterov = false,
                    .momentum_form = MomentumForm::sum,
                    .scale = ScaleMode::spectral} {}
};

inline void validate(const NorMuonOptions& o, const std::string& where = "NorMuonOptions") {
  validate(static_cast<const MuonOptions&>(o), where);
  detail::require(o.beta2 >= 0 && o.beta2 < 1, where, "beta2", o.beta2, "in [0, 1)");
  detail::require(std::isfinite(o.row_eps) && o.row_eps > 0, where, "row_eps", o.row_eps, "finite and > 0");
  detail::require_enum(o.convention, where, "convention", NorMuonConvention::dion,
                       NorMuonConvention::emerging_optimizers);
}

}  // namespace muon

namespace muon::rules {

struct NorMuon {
  using Options = NorMuonOptions;
  static constexpr UpdateRule id{3};
  static constexpr const char* name = "normuon";
  static constexpr std::size_t buffers = 1;      // M, per element
  static constexpr std::size_t matrix_buffers = 1;  // V, per row (or column) of each matrix
  static index_t matrix_state_elements(index_t rows, index_t cols, const Options& o) {
    return per_column(o, rows, cols) ? cols : rows;
  }
  static constexpr bool orthogonalizes = true;
  struct Slot {
    Options normuon{};
  };
  template <class Group>
  static auto& options(Group& g) {
    return g.normuon;
  }
  template <class O, class F>
  static void fields(O& o, F&& f) {
    Muon::fields(o, f);
    f("beta2", o.beta2);
    f("row_eps", o.row_eps);
    f("convention", o.convention);
  }
  static void validate(const Options& o, const std::string& where) { muon::validate(o, where); }
  static double update_scale(const Options& o, index_t rows, index_t cols) {
    return Muon::update_scale(o, rows, cols);
  }
  /// apply()'s scratch for a rows x cols matrix: r and d (a value per row or column), two sums.
  static index_t scratch_elements(index_t rows, index_t cols) { return 2 * std::max(rows, cols) + 2; }
  /// Whether a rows x cols matrix is normalized per column (Emerging-Optimizers' wide matrices).
  static bool per_column(const Options& o, index_t rows, index_t cols) {
    return o.convention == NorMuonConvention::emerging_optimizers && rows < cols;
  }

  template <class B, class T, class S>
  static void accumulate(B& backend, MatrixView<T, S> m, MatrixView<const T, S> g,
                         MatrixView<T, S> u, const Options& o) {
    Muon::accumulate(backend, m, g, u, o);
  }

  /// The row stage on (V, r, d): V's new value and d from r; r becomes r / d^2, the row's
  /// sum of squares after the division.
  template <class T>
  struct Rows {
    T inverse_cols, weight, eps;  // weight = 1 - beta2
    bool floor;                   // eps floors V (Emerging-Optimizers) or is added to sqrt(V)
    Rows(const Options& o, index_t cols)
        : inverse_cols(T(1) / static_cast<T>(cols)),
          weight(static_cast<T>(1 - o.beta2)),
          eps(static_cast<T>(o.row_eps)),
          floor(o.convention == NorMuonConvention::emerging_optimizers) {}
    template <class V, class R, class D>
    MUON_HOST_DEVICE void operator()(V&& v, R&& r, D&& d) const {
      stage::assign_lerp(v, v, r * inverse_cols, weight);
      if (floor)
        d = stage::sqrt(stage::max(v, eps));
      else
        d = stage::sqrt(v) + eps;
      r = r / (d * d);
    }
  };
  /// The stage on the two sums (1 x 1 each): the first becomes the rescale
  /// ||O||_F / max(||O / d||_F, floor), on the backend's side (no read by the host).
  struct Rescale {
    double floor;
    template <class A, class B>
    MUON_HOST_DEVICE void operator()(A&& before, const B& after) const {
      before = stage::sqrt(before) / stage::max(stage::sqrt(after), floor);
    }
  };
  /// The update stage on (W, O, d broadcast along the row); the rescale is read where
  /// Rescale wrote it, in the backend's memory.
  template <class T>
  struct Apply {
    Muon::Apply<T> muon;
    const T* rescale;
    Apply(Muon::Step s, const T* rescale) : muon(s), rescale(rescale) {}
    template <class W, class O, class D>
    MUON_HOST_DEVICE void operator()(W&& w, const O& o, const D& d) const {
      muon(w, (o / d) * *rescale);
    }
  };

  /// W <- decay W - alpha N for one matrix; `state` holds its V (rows x 1, or cols x 1). A
  /// matrix normalized per column is normalized per row as its transpose, with its own step.
  template <class B, class T, class S>
  static void apply(B& backend, MatrixView<T, S> w, MatrixView<const T, S> o,
                    const MatrixView<T, S>* state, MatrixView<T, S> scratch, const Options& options) {
    const Muon::Step step = Muon::step(options, w.rows(), w.cols());
    if (per_column(options, w.rows(), w.cols()))
      normalize_rows(backend, w.transposed(), o.transposed(), state[0], scratch, options, step);
    else
      normalize_rows(backend, w, o, state[0], scratch, options, step);
  }
  template <class B, class T, class S>
  static void normalize_rows(B& backend, MatrixView<T, S> w, MatrixView<const T, S> o,
                             MatrixView<T, S> v, MatrixView<T, S> scratch, const Options& options,
                             Muon::Step step) {
    using View = MatrixView<T, S>;
    using ConstView = MatrixView<const T, S>;
    const index_t m = w.rows(), n = w.cols();
    T* at = scratch.data();
    const View r(at, m, 1, 1, 1), d(at + m, m, 1, 1, 1), before(at + 2 * m, 1, 1, 1, 1),
        after(at + 2 * m + 1, 1, 1, 1, 1);
    backend.reduce_rows(stage::Square{}, r, o);
    backend.reduce_rows(stage::Identity{}, before, ConstView(r).transposed());
    backend.each(Rows<T>(options, n), v, r, d);
    backend.reduce_rows(stage::Identity{}, after, ConstView(r).transposed());
    const bool floor_eps = options.convention == NorMuonConvention::emerging_optimizers;
    backend.each(Rescale{floor_eps ? options.row_eps : 1e-8}, before, ConstView(after));
    backend.each(Apply<T>(step, before.data()), w, o, ConstView(d.data(), m, n, 1, 0));
  }
};

}  // namespace muon::rules
