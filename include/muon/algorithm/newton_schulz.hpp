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
// Gram matrix is min(m, n)^2.
#include <span>
#include <utility>
#include <vector>

#include "muon/core/backend.hpp"

namespace muon {

/// Runs the loop on a k x n dense row-major `x` (k <= n) with workspace `y` (k x n) and
/// `a`, `b` (k x k). Returns the view (x or y) that holds the result.
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

/// Reusable workspace for orthogonalizing matrices up to a reserved size. All allocation
/// happens in reserve(); input() and run() never allocate.
template <class B, class T>
class NewtonSchulzWorkspace {
 public:
  using Space = typename B::memory_space;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;

  /// Makes room for an m x n matrix (either orientation).
  void reserve(B& backend, index_t rows, index_t cols) {
    const index_t k = std::min(rows, cols), n = std::max(rows, cols);
    grow(backend, x_, k * n);
    grow(backend, y_, k * n);
    grow(backend, a_, k * k);
    grow(backend, b_, k * k);
  }

  /// Where to write the m x n matrix to orthogonalize: a view into the workspace, stored
  /// transposed when m > n so the loop runs on the short side.
  [[nodiscard]] View input(B& backend, index_t rows, index_t cols) {
    check(rows, cols);
    return rows > cols ? backend.view(x_, cols, rows).transposed() : backend.view(x_, rows, cols);
  }

  /// Orthogonalizes what input(rows, cols) holds; returns the m x n result (a workspace view,
  /// valid until the next call).
  [[nodiscard]] ConstView run(B& backend, index_t rows, index_t cols,
                              std::span<const Coefficients> schedule, double norm_scale,
                              double eps) {
    check(rows, cols);
    if (rows == 0 || cols == 0) return backend.view(x_, rows, cols);
    const index_t k = std::min(rows, cols), n = std::max(rows, cols);
    View out = newton_schulz_inplace(backend, backend.view(x_, k, n), backend.view(y_, k, n),
                                     backend.view(a_, k, k), backend.view(b_, k, k), schedule,
                                     norm_scale, eps);
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

  typename B::template Buffer<T> x_, y_, a_, b_;
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
  ws.reserve(backend, in.rows(), in.cols());
  backend.copy(in, ws.input(backend, in.rows(), in.cols()));
  backend.copy(ws.run(backend, in.rows(), in.cols(), schedule, options.schedule.norm_scale(),
                      options.eps),
               out);
}

}  // namespace muon
