#pragma once
// CPU backend on Eigen 3.4. Matrix products go to Eigen's blocked GEMM and to a lower-triangle
// rank-k update for the symmetric products of Newton–Schulz; elementwise stages are Eigen
// array expressions over the (possibly strided) views. State and workspace are std::vectors.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "muon/adapters/eigen.hpp"
#include "muon/core/backend.hpp"

namespace muon {

class EigenBackend {
 public:
  using memory_space = HostSpace;
  template <class T>
  using Buffer = std::vector<T>;

  // ---- storage ---------------------------------------------------------------------------
  template <class T>
  void resize(Buffer<T>& buf, index_t n) const {
    buf.assign(static_cast<std::size_t>(n), T(0));
  }
  template <class T>
  MatrixView<T> view(Buffer<T>& buf, index_t rows, index_t cols) const {
    return row_major_view(buf.data(), rows, cols);
  }
  template <class T>
  void copy_to_host(MatrixView<const T> src, T* dst) const {
    copy(src, row_major_view(dst, src.rows(), src.cols()));
  }
  template <class T>
  void copy_from_host(const T* src, MatrixView<T> dst) const {
    copy(row_major_view(src, dst.rows(), dst.cols()), dst);
  }

  // ---- BLAS-3 ----------------------------------------------------------------------------
  /// C = alpha A B + beta C (C is not read when beta == 0).
  template <class T>
  void gemm(T alpha, MatrixView<const T> a, MatrixView<const T> b, T beta,
            MatrixView<T> c) const {
    if (c.empty()) return;
    with_dense(c, [&](auto C) {
      if (a.cols() == 0) {
        scale_or_zero(C, beta);
        return;
      }
      with_dense(a, [&](auto A) {
        with_dense(b, [&](auto B) {
          if (beta == T(0)) {
            C.noalias() = alpha * (A * B);
          } else {
            if (beta != T(1)) C *= beta;
            C.noalias() += alpha * (A * B);
          }
        });
      });
    });
  }

  /// C = alpha A A^T + beta C for square C; computes the lower triangle only (about half the
  /// flops of a GEMM) and mirrors it.
  template <class T>
  void syrk(T alpha, MatrixView<const T> a, T beta, MatrixView<T> c) const {
    if (c.empty()) return;
    with_dense(c, [&](auto C) {
      if (beta == T(0))
        C.template triangularView<Eigen::Lower>().setZero();
      else if (beta != T(1))
        C.template triangularView<Eigen::Lower>() *= beta;
      if (a.cols() > 0)
        with_dense(a, [&](auto A) {
          C.template selfadjointView<Eigen::Lower>().rankUpdate(A, alpha);
        });
      for (index_t j = 1; j < C.cols(); ++j)
        for (index_t i = 0; i < j; ++i) C(i, j) = C(j, i);
    });
  }

  // ---- elementwise -----------------------------------------------------------------------
  template <class T>
  void copy(MatrixView<const T> src, MatrixView<T> dst) const {
    if (src.is_row_major_contiguous() && dst.is_row_major_contiguous()) {
      std::copy_n(src.data(), src.size(), dst.data());
    } else {
      strided(dst) = strided(src);
    }
  }
  template <class T>
  void fill(MatrixView<T> x, T value) const {
    elementwise([&](auto X) { X.setConstant(value); }, x);
  }
  template <class T>
  void add_diagonal(MatrixView<T> x, T value) const {
    for (index_t i = 0; i < std::min(x.rows(), x.cols()); ++i) x(i, i) += value;
  }

  /// ||x||_F accumulated in double; rescaled by max|x| when the plain sum of squares would
  /// overflow or underflow (only possible for double input).
  template <class T>
  double frobenius_norm(MatrixView<const T> x) const {
    if (x.empty()) return 0.0;
    double ss = 0;
    elementwise([&](auto X) { ss = X.template cast<double>().square().sum(); }, x);
    if (std::isfinite(ss) && ss >= std::numeric_limits<double>::min()) return std::sqrt(ss);
    double amax = 0;
    elementwise([&](auto X) { amax = static_cast<double>(X.abs().maxCoeff()); }, x);
    if (amax == 0 || !std::isfinite(amax)) return amax;
    elementwise([&](auto X) { ss = (X.template cast<double>() / amax).square().sum(); }, x);
    return amax * std::sqrt(ss);
  }

  /// x /= max(norm_scale * ||x||_F, eps), the division done in double so that neither a huge
  /// norm (entries of 1e20 in float) nor a tiny one flushes the result to zero or infinity.
  template <class T>
  void normalize(MatrixView<T> x, double norm_scale, double eps) const {
    const double denom = std::max(norm_scale * frobenius_norm(MatrixView<const T>(x)), eps);
    elementwise([&](auto X) { X = (X.template cast<double>() / denom).template cast<T>(); }, x);
  }

  template <class T>
  bool all_finite(MatrixView<const T> x) const {
    bool ok = true;
    elementwise([&](auto X) { ok = X.allFinite(); }, x);
    return ok;
  }

  /// M <- lerp(M, G, 1 - mu) (ema) or mu M + G (sum); U <- Nesterov look-ahead or M.
  /// lerp is torch's (a + w (b - a) for w < 0.5, else b - (1 - w)(b - a)) so float runs track
  /// torch.optim.Muon rounding for rounding.
  template <class T>
  void momentum(MatrixView<T> m, MatrixView<const T> g, MatrixView<T> u,
                const MomentumStep& s) const {
    const T mu = static_cast<T>(s.momentum);
    const T w = static_cast<T>(1 - s.momentum);
    if (s.form == MomentumForm::ema) {
      elementwise([&](auto M, auto G) { assign_lerp(M, M, G, w); }, m, g);
      if (s.nesterov)
        elementwise([&](auto U, auto G, auto M) { assign_lerp(U, G, M, mu); }, u, g,
                    MatrixView<const T>(m));
      else
        copy(MatrixView<const T>(m), u);
    } else {
      elementwise([&](auto M, auto G) { M = mu * M + G; }, m, g);
      if (s.nesterov)
        elementwise([&](auto U, auto G, auto M) { U = G + mu * M; }, u, g,
                    MatrixView<const T>(m));
      else
        copy(MatrixView<const T>(m), u);
    }
  }

  /// W <- decay W - alpha O
  template <class T>
  void apply_update(MatrixView<T> w, MatrixView<const T> o, double decay, double alpha) const {
    const T d = static_cast<T>(decay), a = static_cast<T>(alpha);
    elementwise([&](auto W, auto O) { W = W * d - a * O; }, w, o);
  }

  /// One AdamW step in torch's operation order (see AdamWStep).
  template <class T>
  void adamw(MatrixView<T> w, MatrixView<const T> g, MatrixView<T> m, MatrixView<T> v,
             const AdamWStep& s) const {
    const T decay = static_cast<T>(s.decay), w1 = static_cast<T>(1 - s.beta1);
    const T b2 = static_cast<T>(s.beta2), w2 = static_cast<T>(1 - s.beta2);
    const T eps = static_cast<T>(s.eps), step = static_cast<T>(s.step_size);
    const T bias2 = static_cast<T>(s.sqrt_bias2);
    elementwise(
        [&](auto W, auto G, auto M, auto V) {
          W *= decay;
          assign_lerp(M, M, G, w1);
          V = V * b2 + w2 * G * G;
          W = W - step * (M / (V.sqrt() / bias2 + eps));
        },
        w, g, m, v);
  }

 private:
  /// dst = lerp(a, b, weight), branching outside the expression so nothing is materialized.
  template <class D, class A, class B, class T>
  static void assign_lerp(D& dst, const A& a, const B& b, T weight) {
    if (weight < T(0.5))
      dst = a + weight * (b - a);
    else
      dst = b - (T(1) - weight) * (b - a);
  }

  template <class C, class T>
  static void scale_or_zero(C& c, T beta) {
    if (beta == T(0))
      c.setZero();
    else
      c *= beta;
  }

  template <class T>
  using RowMajor = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic,
                                 Eigen::RowMajor>;
  template <class T>
  using ColMajor = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic,
                                 Eigen::ColMajor>;
  template <class M, class T>
  using MaybeConst = std::conditional_t<std::is_const_v<T>, const M, M>;

  /// A strided Eigen map of any view.
  template <class T>
  static auto strided(MatrixView<T> v) {
    using Map = Eigen::Map<MaybeConst<RowMajor<T>, T>, Eigen::Unaligned,
                           Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;
    return Map(v.data(), v.rows(), v.cols(),
               Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(v.row_stride(), v.col_stride()));
  }

  /// Calls f with a unit-inner-stride map (row- or column-major) when the view has one, which
  /// is what Eigen's GEMM kernels need to run without a temporary copy; else a strided map.
  template <class T, class F>
  static void with_dense(MatrixView<T> v, F&& f) {
    using Outer = Eigen::OuterStride<Eigen::Dynamic>;
    if (v.col_stride() == 1 || v.cols() <= 1) {
      Eigen::Map<MaybeConst<RowMajor<T>, T>, Eigen::Unaligned, Outer> m(
          v.data(), v.rows(), v.cols(), Outer(v.rows() <= 1 ? v.cols() : v.row_stride()));
      f(m);
    } else if (v.row_stride() == 1 || v.rows() <= 1) {
      Eigen::Map<MaybeConst<ColMajor<T>, T>, Eigen::Unaligned, Outer> m(
          v.data(), v.rows(), v.cols(), Outer(v.cols() <= 1 ? v.rows() : v.col_stride()));
      f(m);
    } else {
      auto m = strided(v);
      f(m);
    }
  }

  /// Calls f with array maps of same-shape views: flat 1-D arrays when every view is dense
  /// row-major (vectorizes), else strided 2-D arrays.
  template <class F, class... T>
  static void elementwise(F&& f, MatrixView<T>... v) {
    if ((v.is_row_major_contiguous() && ...)) {
      f(Eigen::Map<MaybeConst<Eigen::Array<std::remove_const_t<T>, Eigen::Dynamic, 1>, T>>(
          v.data(), v.size())...);
    } else {
      f(strided(v).array()...);
    }
  }
};

static_assert(Backend<EigenBackend, float> && Backend<EigenBackend, double>);

}  // namespace muon
