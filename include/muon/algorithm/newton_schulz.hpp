#pragma once
// Newton–Schulz orthogonalization: O ~ msign(G) = U V^T for G = U S V^T.
//
//   X <- X / max(norm_scale * ||X||_F, eps)          (overflow-safe; 0 stays 0)
//   repeat for each (a, b, c) of the schedule:
//     A = X X^T                     SYRK: lower triangle only, then mirrored (A is an operand)
//     B = c A A + b A + a I         SYRK on A (A A = A A^T); folding a I into B turns
//                                   a X + B X into a single product
//     X = B X                       SYMM: reads B's lower triangle
// Flops per step 3 k^2 N + k^3 (k = min(m, n), N = max(m, n)), against the nominal
// 4 k^2 N + 2 k^3 of the loop written with general products.
//
// Runs on the short side: an m x n input with m > n is iterated as its n x m transpose, so the
// Gram matrix is min(m, n)^2. The transpose is only a view of the same row-major storage (the
// backend's products take either layout), so nothing is ever copied to transpose it.
#include <cmath>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include "muon/core/backend.hpp"

namespace muon {

/// Runs the loop on a k x n `x` (k <= n; dense, row- or column-major) with workspace `y` (k x n,
/// same layout) and `a`, `b` (k x k). Returns the view (x or y) that holds the result.
template <class B, class T, class S>
MatrixView<T, S> newton_schulz_inplace(B& backend, MatrixView<T, S> x, MatrixView<T, S> y,
                                       MatrixView<T, S> a, MatrixView<T, S> b,
                                       std::span<const Coefficients> schedule, double norm_scale,
                                       double eps) {
  backend.normalize(x, norm_scale, eps);
  for (const Coefficients& p : schedule) {
    backend.syrk(T(1), MatrixView<const T, S>(x), T(0), a);
    backend.symmetrize(a);
    backend.copy(MatrixView<const T, S>(a), b);
    backend.syrk(static_cast<T>(p.c), MatrixView<const T, S>(a), static_cast<T>(p.b), b);
    backend.add_diagonal(b, static_cast<T>(p.a));
    backend.symm(T(1), MatrixView<const T, S>(b), MatrixView<const T, S>(x), T(0), y);
    std::swap(x, y);
  }
  return x;
}

/// Gram Newton–Schulz: the same iteration carried out on the k x k Gram matrix only. Since
/// every B_t is a polynomial in A_0 = X_0 X_0^T, all of them commute, and
///   X_t = Q_t X_0 with Q_t = B_t ... B_1,   A_{t+1} = B_t A_t B_t = A_t B_t^2,
/// so X is touched twice (A_0 = X_0 X_0^T and X_T = Q_T X_0) instead of twice per step:
/// 3 k^2 N + (6T - 5) k^3 flops for T steps against T (3 k^2 N + k^3), fewer when N > 5k/3
/// (1.75x at 1:4). Buffers: x, y (k x N); a, b, w, q, p (k x k). Returns y.
template <class B, class T, class S>
MatrixView<T, S> gram_newton_schulz_inplace(B& backend, MatrixView<T, S> x, MatrixView<T, S> y,
                                            MatrixView<T, S> a, MatrixView<T, S> b,
                                            MatrixView<T, S> w, MatrixView<T, S> q,
                                            MatrixView<T, S> p,
                                            std::span<const Coefficients> schedule,
                                            double norm_scale, double eps) {
  using C = MatrixView<const T, S>;
  // Once the iteration has converged, A's deviation from I is cubed at every step and would
  // sink into the subnormal range, where products run ~10x slower (measured). Entries below
  // sqrt(smallest normal) are far under rounding error; zeroing them keeps every product normal.
  const T tiny = std::sqrt(std::numeric_limits<T>::min());
  backend.normalize(x, norm_scale, eps);
  backend.syrk(T(1), C(x), T(0), a);  // A_0 = X X^T
  backend.symmetrize(a);
  for (std::size_t t = 0; t < schedule.size(); ++t) {
    const Coefficients& k = schedule[t];
    backend.copy(C(a), b);  // B = c A^2 + b A + a I
    backend.syrk(static_cast<T>(k.c), C(a), static_cast<T>(k.b), b);
    backend.add_diagonal(b, static_cast<T>(k.a));
    backend.symmetrize(b);
    backend.flush_tiny(b, tiny);
    if (t == 0) {
      backend.copy(C(b), q);  // Q = B
    } else {
      backend.symm(T(1), C(b), C(q), T(0), p);  // Q = B Q
      std::swap(q, p);
    }
    if (t + 1 < schedule.size()) {
      backend.syrk(T(1), C(b), T(0), w);  // W = B B^T = B^2
      backend.symmetrize(w);
      backend.symm(T(1), C(a), C(w), T(0), b);  // A = A B^2 (symmetric up to rounding)
      std::swap(a, b);
      backend.symmetrize(a);
      backend.flush_tiny(a, tiny);
    }
  }
  backend.gemm(T(1), C(q), C(x), T(0), y);  // X_T = Q X_0
  return y;
}

/// Gram Newton–Schulz pays off (fewer flops) from this aspect ratio on; see the measurements in
/// the README before changing it.
inline constexpr double kGramMinAspect = 2.0;

/// Whether `method` runs the Gram form on an m x n matrix.
inline bool uses_gram(NewtonSchulzMethod method, index_t rows, index_t cols) {
  const auto k = static_cast<double>(std::min(rows, cols));
  const auto n = static_cast<double>(std::max(rows, cols));
  return method == NewtonSchulzMethod::gram ||
         (method == NewtonSchulzMethod::automatic && k > 0 && n >= kGramMinAspect * k);
}

/// Reusable workspace for orthogonalizing matrices up to a reserved size. All allocation
/// happens in reserve(); input() and run() never allocate.
template <class B, class T>
class NewtonSchulzWorkspace {
 public:
  using Space = typename B::memory_space;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;

  /// Makes room for an m x n matrix (either orientation) orthogonalized by `method`.
  void reserve(B& backend, index_t rows, index_t cols,
               NewtonSchulzMethod method = NewtonSchulzMethod::automatic) {
    const index_t k = std::min(rows, cols), n = std::max(rows, cols);
    grow(backend, x_, k * n);
    grow(backend, y_, k * n);
    grow(backend, a_, k * k);
    grow(backend, b_, k * k);
    if (uses_gram(method, rows, cols)) {
      grow(backend, w_, k * k);
      grow(backend, q_, k * k);
      grow(backend, p_, k * k);
    }
  }

  /// Where to write the m x n matrix to orthogonalize: a dense row-major view into the
  /// workspace.
  [[nodiscard]] View input(B& backend, index_t rows, index_t cols) {
    check(rows, cols);
    return backend.view(x_, rows, cols);
  }

  /// Orthogonalizes what input(rows, cols) holds; returns the m x n result (a workspace view,
  /// valid until the next call).
  [[nodiscard]] ConstView run(B& backend, index_t rows, index_t cols,
                              std::span<const Coefficients> schedule, double norm_scale,
                              double eps,
                              NewtonSchulzMethod method = NewtonSchulzMethod::automatic) {
    check(rows, cols);
    if (rows == 0 || cols == 0) return backend.view(x_, rows, cols);
    const index_t k = std::min(rows, cols);
    // The k x N short-side view of the row-major m x n storage (column-major when m > n).
    auto short_side = [&](auto& buf) {
      View v = backend.view(buf, rows, cols);
      return rows > cols ? v.transposed() : v;
    };
    View out;
    // A backend may carry out the whole iteration itself (the CUDA backend in bf16 or fp16);
    // it returns an empty optional when it leaves the matrix to the generic code below.
    if constexpr (requires {
                    backend.try_newton_schulz(short_side(x_), short_side(y_), schedule,
                                              norm_scale, eps, method);
                  }) {
      if (auto done = backend.try_newton_schulz(short_side(x_), short_side(y_), schedule,
                                                norm_scale, eps, method))
        return rows > cols ? done->transposed() : *done;
    }
    if (uses_gram(method, rows, cols)) {
      if (static_cast<index_t>(p_.size()) < k * k)
        throw InvalidArgument("muon: Gram Newton-Schulz workspace not reserved for " +
                              detail::shape_string(rows, cols));
      out = gram_newton_schulz_inplace(
          backend, short_side(x_), short_side(y_), backend.view(a_, k, k), backend.view(b_, k, k),
          backend.view(w_, k, k), backend.view(q_, k, k), backend.view(p_, k, k), schedule,
          norm_scale, eps);
    } else {
      out = newton_schulz_inplace(backend, short_side(x_), short_side(y_),
                                  backend.view(a_, k, k), backend.view(b_, k, k), schedule,
                                  norm_scale, eps);
    }
    return rows > cols ? out.transposed() : out;
  }

 private:
  void grow(B& backend, typename B::template Buffer<T>& buf, index_t n) {
    if (static_cast<index_t>(buf.size()) < n) backend.resize(buf, n);
  }
  void check(index_t rows, index_t cols) const {
    if (std::min(rows, cols) * std::max(rows, cols) > static_cast<index_t>(x_.size()))
      throw InvalidArgument("muon: Newton-Schulz workspace holds fewer elements than " +
                            detail::shape_string(rows, cols) + "; call reserve() first");
  }

  typename B::template Buffer<T> x_, y_, a_, b_, w_, q_, p_;
};

/// One-off orthogonalization of `in` into `out` (same shape). Allocates its workspace; for
/// repeated calls keep a NewtonSchulzWorkspace.
template <class B, class T, class S>
void orthogonalize(B& backend, MatrixView<const T, S> in, MatrixView<T, S> out,
                   const NewtonSchulzOptions& options = {}) {
  static_assert(std::is_same_v<S, typename B::memory_space>,
                "muon::orthogonalize: the views live in another memory space than the backend");
  if (in.rows() != out.rows() || in.cols() != out.cols())
    throw InvalidArgument("muon: orthogonalize: output shape " +
                          detail::shape_string(out.rows(), out.cols()) +
                          " differs from input shape " +
                          detail::shape_string(in.rows(), in.cols()));
  validate(options, "NewtonSchulzOptions");
  const std::vector<Coefficients> schedule = options.schedule.resolve(options.steps);
  NewtonSchulzWorkspace<B, T> ws;
  ws.reserve(backend, in.rows(), in.cols(), options.method);
  backend.copy(in, ws.input(backend, in.rows(), in.cols()));
  backend.copy(ws.run(backend, in.rows(), in.cols(), schedule, options.schedule.norm_scale(),
                      options.eps, options.method),
               out);
}

}  // namespace muon
