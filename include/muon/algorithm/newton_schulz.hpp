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
#include <string>
#include <utility>
#include <vector>

#include "muon/core/backend.hpp"

namespace muon {

namespace detail {
/// a = x x^T, both triangles.
template <class B, class T, class S>
void form_gram(B& backend, MatrixView<T, S> x, MatrixView<T, S> a) {
  backend.syrk(T(1), MatrixView<const T, S>(x), T(0), a);
  backend.symmetrize(a);
}
/// b = c A^2 + b A + a I from a = A (both triangles; b's lower triangle is what symm reads).
/// A cubic step (c = 0) skips the product A^2.
template <class B, class T, class S>
void gram_polynomial(B& backend, MatrixView<T, S> a, MatrixView<T, S> b, const Coefficients& p) {
  backend.copy(MatrixView<const T, S>(a), b);
  if (p.c != 0)
    backend.syrk(static_cast<T>(p.c), MatrixView<const T, S>(a), static_cast<T>(p.b), b);
  else
    backend.scale(b, static_cast<T>(p.b));
  backend.add_diagonal(b, static_cast<T>(p.a));
}
/// One plain-loop step once a = x x^T is formed: y = (c A^2 + b A + a I) x, b as scratch; a
/// cubic step is y = b A x + a x, one product fewer.
template <class B, class T, class S>
void step_from_gram(B& backend, MatrixView<T, S> x, MatrixView<T, S> y, MatrixView<T, S> a,
                    MatrixView<T, S> b, const Coefficients& p) {
  using C = MatrixView<const T, S>;
  if (p.c == 0) {
    backend.copy(C(x), y);
    backend.symm(static_cast<T>(p.b), C(a), C(x), static_cast<T>(p.a), y);
    return;
  }
  gram_polynomial(backend, a, b, p);
  backend.symm(T(1), C(b), C(x), T(0), y);
}
}  // namespace detail

/// The steps of the plain loop on a k x n `x` (k <= n; dense, row- or column-major), already
/// normalized, with workspace `y` (k x n, same layout) and `a`, `b` (k x k). Returns the view
/// (x or y) that holds the result.
template <class B, class T, class S>
MatrixView<T, S> newton_schulz_steps(B& backend, MatrixView<T, S> x, MatrixView<T, S> y,
                                     MatrixView<T, S> a, MatrixView<T, S> b,
                                     std::span<const Coefficients> schedule) {
  for (const Coefficients& p : schedule) {
    detail::form_gram(backend, x, a);
    detail::step_from_gram(backend, x, y, a, b, p);
    std::swap(x, y);
  }
  return x;
}

/// What one orthogonalization did, measured on its result O (k = min(m, n)).
struct NewtonSchulzReport {
  double residual = 0;  ///< ||O O^T - I||_F / sqrt(k), in the working precision; 0 for k = 0
  int steps = 0;        ///< steps run: the schedule's plus those the tolerance added
};

/// Whether backend B can measure a result's residual (tolerance, reports): it reads a norm
/// back to the host. EigenBackend can; the CUDA backend, whose steps never wait for the GPU,
/// cannot.
template <class B, class T>
inline constexpr bool measures_residual =
    requires(B& b, MatrixView<const T, typename B::memory_space> v) { b.frobenius_norm(v); };

namespace detail {
/// Refuses a tolerance on a backend that cannot measure it, where the options are chosen.
template <class B, class T>
void check_measurable(const NewtonSchulzOptions& o, const std::string& where) {
  if (o.tolerance > 0 && !measures_residual<B, T>)
    throw InvalidArgument("muon: " + where + ".newton_schulz.tolerance = " +
                          std::to_string(o.tolerance) +
                          ": this backend cannot measure residuals (it has no frobenius_norm(); "
                          "EigenBackend has); leave tolerance at 0");
}
}  // namespace detail

/// Measures the residual of the k x N result `x` and, while it is above `tolerance`, adds
/// textbook steps (at most `max_extra_steps`). The first product of each added step is the
/// measurement's, so a tolerance costs one SYRK beyond the steps it adds. Returns the view
/// (x or y) that holds the result; the backend must read a norm back (frobenius_norm).
template <class B, class T, class S>
MatrixView<T, S> refine_to_tolerance(B& backend, MatrixView<T, S> x, MatrixView<T, S> y,
                                     MatrixView<T, S> a, MatrixView<T, S> b, double tolerance,
                                     int max_extra_steps, NewtonSchulzReport& report) {
  const double root_k = std::sqrt(static_cast<double>(x.rows()));
  for (int extra = 0;; ++extra) {
    detail::form_gram(backend, x, a);
    backend.copy(MatrixView<const T, S>(a), b);
    backend.add_diagonal(b, T(-1));
    report.residual = backend.frobenius_norm(MatrixView<const T, S>(b)) / root_k;
    if (!(report.residual > tolerance) || extra == max_extra_steps) return x;  // NaN ends too
    detail::step_from_gram(backend, x, y, a, b, kTextbookQuintic);
    std::swap(x, y);
    ++report.steps;
  }
}

/// Normalizes `x` and runs the plain loop on it (see newton_schulz_steps).
template <class B, class T, class S>
MatrixView<T, S> newton_schulz_inplace(B& backend, MatrixView<T, S> x, MatrixView<T, S> y,
                                       MatrixView<T, S> a, MatrixView<T, S> b,
                                       std::span<const Coefficients> schedule, double norm_scale,
                                       double eps) {
  backend.normalize(x, norm_scale, eps);
  return newton_schulz_steps(backend, x, y, a, b, schedule);
}

// ---- the Gram form and when it restarts --------------------------------------------------
//
// Gram Newton–Schulz carries A_t = X_t X_t^T from step to step as A_{t+1} = A_t B_t^2 and never
// forms it again from X. The rounding of the first product leaves A_0 with eigenvalues of order
// -u ||A|| (u the unit roundoff) along the directions where X has (numerically) zero singular
// values: rank-deficient and low-rank gradients, zero rows. There B_t(lambda) ~ a_t, so each
// step multiplies that error by about a_t^2 (11.9 for keller), and once it reaches order 0.1
// the quintic runs away (lambda -> c^2 lambda^5): NaN or entries of 1e29 after 8-10 float steps.
// The plain loop forms A = X X^T afresh every step and never drifts. So the Gram form restarts
// (X_t = Q_t X_s, A_t = X_t X_t^T, Q from I) before the drift kappa u prod(a_t^2) could pass
// kGramDriftLimit. kappa = kGramRoundingFactor: measured, -lambda_min(A_t) / (u prod a^2)
// stayed below 3 over ranks 1 to 64 and sizes 32x128 to 1024x4096 in float and double
// (NumPy on OpenBLAS); 8 leaves a margin. Keller in float restarts every 5 steps and in double
// every 12, so the default 5-step float run never restarts and costs what it did. Restarting
// also bounds Q, whose eigenvalues along zero directions grow like prod(a_t) (a^72 overflows
// float).

/// The drift (in units of ||A||) at which the Gram form restarts.
inline constexpr double kGramDriftLimit = 0.1;
/// The measured bound on A's rounding error, in units of the unit roundoff, with a margin.
inline constexpr double kGramRoundingFactor = 8;

namespace detail {
/// How much one step with these coefficients can multiply an eigenvalue |lambda| <=
/// kGramDriftLimit of A: max B(lambda)^2 there.
inline double gram_growth(const Coefficients& p) {
  const double g = std::abs(p.a) + std::abs(p.b) * kGramDriftLimit +
                   std::abs(p.c) * kGramDriftLimit * kGramDriftLimit;
  return g * g;
}
}  // namespace detail

/// The restart plan of the Gram form in a precision of unit roundoff `u`: feed it the steps in
/// order; restart_after(t) says whether step t + 1 starts from a re-formed A.
class GramRestartPlan {
 public:
  explicit GramRestartPlan(double u) : limit_(kGramDriftLimit / (kGramRoundingFactor * u)) {}
  bool restart_after(const Coefficients& step) {
    growth_ *= detail::gram_growth(step);
    if (growth_ <= limit_) return false;
    growth_ = 1;
    return true;
  }

 private:
  double limit_;
  double growth_ = 1;
};

/// How many segments (1 + restarts) the Gram form runs `schedule` in, at unit roundoff `u`.
inline std::size_t gram_segments(std::span<const Coefficients> schedule, double u) {
  GramRestartPlan plan(u);
  std::size_t segments = 1;
  for (std::size_t t = 0; t + 1 < schedule.size(); ++t) segments += plan.restart_after(schedule[t]);
  return segments;
}

template <class T>
inline constexpr double unit_roundoff = std::numeric_limits<T>::epsilon() / 2;

/// Gram Newton–Schulz: the same iteration carried out on the k x k Gram matrix. Since every
/// B_t is a polynomial in A_s = X_s X_s^T, all of them commute, and within a segment that
/// starts at step s
///   X_t = Q_t X_s with Q_t = B_{t-1} ... B_s,   A_{t+1} = B_t A_t B_t = A_t B_t^2,
/// so X is read twice per segment (A_s = X_s X_s^T and X = Q X_s) instead of twice per step.
/// Segments follow GramRestartPlan (see above). Flops: S segments of T steps in all cost
/// 3 S k^2 N + (6T - 5S) k^3 (gram_flops) against T (3 k^2 N + k^3) for the plain loop.
/// Buffers: x, y, z (k x N; x keeps the normalized input); a, b, w, q, p (k x k). Returns the
/// view (y or z) that holds the result. `plan_unit_roundoff` is the precision the restart plan
/// assumes (tests pass a tiny one to see the run-away it prevents).
template <class B, class T, class S>
MatrixView<T, S> gram_newton_schulz_inplace(B& backend, MatrixView<T, S> x, MatrixView<T, S> y,
                                            MatrixView<T, S> z, MatrixView<T, S> a,
                                            MatrixView<T, S> b, MatrixView<T, S> w,
                                            MatrixView<T, S> q, MatrixView<T, S> p,
                                            std::span<const Coefficients> schedule,
                                            double norm_scale, double eps,
                                            double plan_unit_roundoff = unit_roundoff<T>) {
  using C = MatrixView<const T, S>;
  // Once the iteration has converged, A's deviation from I is cubed at every step and would
  // sink into the subnormal range, where products run ~10x slower (measured). Entries below
  // sqrt(smallest normal) are far under rounding error; zeroing them keeps every product normal.
  const T tiny = std::sqrt(std::numeric_limits<T>::min());
  backend.normalize(x, norm_scale, eps);
  MatrixView<T, S> base = x, spare = y, other = z;  // X_s of this segment; where X goes next
  backend.syrk(T(1), C(base), T(0), a);  // A_0 = X X^T
  backend.symmetrize(a);
  GramRestartPlan plan(plan_unit_roundoff);
  bool fresh = true;  // A was just formed from X; Q starts anew
  for (std::size_t t = 0; t < schedule.size(); ++t) {
    const Coefficients& k = schedule[t];
    detail::gram_polynomial(backend, a, b, k);  // B = c A^2 + b A + a I
    backend.symmetrize(b);
    backend.flush_tiny(b, tiny);
    if (fresh) {
      backend.copy(C(b), q);  // Q = B
    } else {
      backend.symm(T(1), C(b), C(q), T(0), p);  // Q = B Q
      std::swap(q, p);
    }
    if (t + 1 == schedule.size()) break;
    fresh = plan.restart_after(k);
    if (fresh) {  // X_{t+1} = Q X_s, A_{t+1} = X_{t+1} X_{t+1}^T
      backend.gemm(T(1), C(q), C(base), T(0), spare);
      base = spare;
      std::swap(spare, other);
      backend.syrk(T(1), C(base), T(0), a);
      backend.symmetrize(a);
    } else {
      backend.syrk(T(1), C(b), T(0), w);  // W = B B^T = B^2
      backend.symmetrize(w);
      backend.symm(T(1), C(a), C(w), T(0), b);  // A = A B^2 (symmetric up to rounding)
      std::swap(a, b);
      backend.symmetrize(a);
      backend.flush_tiny(a, tiny);
    }
  }
  backend.gemm(T(1), C(q), C(base), T(0), spare);  // X_T = Q X_s
  return spare;
}

/// Flops of the plain loop and of the Gram form (with its restarts) for T steps on a k x N
/// matrix, k <= N.
inline double standard_flops(std::size_t steps, double k, double n) {
  return static_cast<double>(steps) * (3 * k * k * n + k * k * k);
}
inline double gram_flops(std::span<const Coefficients> schedule, double u, double k, double n) {
  const auto s = static_cast<double>(gram_segments(schedule, u));
  return 3 * s * k * k * n + (6 * static_cast<double>(schedule.size()) - 5 * s) * k * k * k;
}

/// `automatic` considers the Gram form from this aspect ratio on (measured: below it the k x k
/// products' lower efficiency eats the saving; see docs/speed.md) ...
inline constexpr double kGramMinAspect = 2.0;
/// ... and takes it when, with its restarts, it needs at most this share of the plain loop's
/// flops (31/35 at aspect 2 for 5 steps without restart).
inline constexpr double kGramMaxFlopShare = 0.9;

/// Whether `method` may run the Gram form on an m x n matrix (what the workspace is sized for).
inline bool may_use_gram(NewtonSchulzMethod method, index_t rows, index_t cols) {
  const auto k = static_cast<double>(std::min(rows, cols));
  const auto n = static_cast<double>(std::max(rows, cols));
  return method == NewtonSchulzMethod::gram ||
         (method == NewtonSchulzMethod::automatic && k > 0 && n >= kGramMinAspect * k);
}

/// Whether `method` runs the Gram form on an m x n matrix with this schedule at unit roundoff
/// `u`: always for gram, never for standard; for automatic, when the aspect ratio reaches
/// kGramMinAspect and the restarts leave it at most kGramMaxFlopShare of the plain loop's flops
/// (so in bf16, where it would restart every step, never).
inline bool uses_gram(NewtonSchulzMethod method, index_t rows, index_t cols,
                      std::span<const Coefficients> schedule, double u) {
  if (method != NewtonSchulzMethod::automatic) return method == NewtonSchulzMethod::gram;
  if (!may_use_gram(method, rows, cols)) return false;
  const auto k = static_cast<double>(std::min(rows, cols));
  const auto n = static_cast<double>(std::max(rows, cols));
  return gram_flops(schedule, u, k, n) <= kGramMaxFlopShare * standard_flops(schedule.size(), k, n);
}

/// A Gram result whose Frobenius norm passes kGramGuard * sqrt(k) (or is not finite) is taken
/// as a run-away and recomputed by the plain loop. Legitimate results stay below
/// sqrt(k) * (the schedule's singular-value bound, about 1.2), so a false alarm costs time,
/// never accuracy.
inline constexpr double kGramGuard = 2.0;

namespace detail {
/// A backend that can run the whole iteration itself, in a precision of its own (EigenBackend
/// in bf16, CudaBackend in bf16 or fp16), names the scratch a workspace keeps for it,
/// NewtonSchulzScratch<T>, and has
///   bool reserve_newton_schulz<T>(scratch, rows, cols, method): sizes the scratch; says
///       whether it will take such matrices (the workspace then skips the Gram buffers),
///   try_newton_schulz<T>(scratch, x, y, a, b, schedule, norm_scale, eps, method): runs the
///       iteration on the k x n short side x (not yet normalized) with a, b (k x k) as
///       scratch, returning the view of the result, or nothing to leave it to the code here.
template <class B, class T>
concept RunsOwnNewtonSchulz = requires { typename B::template NewtonSchulzScratch<T>; };

template <class B, class T>
struct ScratchOf {
  using type = typename B::template NewtonSchulzScratch<T>;
};
}  // namespace detail

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
    bool own = false;  // the backend takes such matrices itself: no Gram form here
    if constexpr (has_scratch)
      own = backend.template reserve_newton_schulz<T>(scratch_, rows, cols, method);
    if (!own && may_use_gram(method, rows, cols)) {
      grow(backend, z_, k * n);
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
    return as_matrix(rows, cols, iterate(backend, rows, cols, schedule, norm_scale, eps, method));
  }

  /// As above with every option of `options` (`schedule` is options.schedule resolved, which
  /// the caller keeps so run() never allocates), including its tolerance; `report`, if given,
  /// receives the residual of the result and the steps run. The residual costs one SYRK (k^2 N
  /// flops, about 1/16 of five steps on a wide matrix) and one host read; it needs a backend
  /// with frobenius_norm() (EigenBackend), and other backends refuse it.
  [[nodiscard]] ConstView run(B& backend, index_t rows, index_t cols,
                              std::span<const Coefficients> schedule,
                              const NewtonSchulzOptions& options,
                              NewtonSchulzReport* report = nullptr) {
    View out = iterate(backend, rows, cols, schedule, options.schedule.norm_scale(), options.eps,
                       options.method);
    if (report == nullptr && options.tolerance == 0) return as_matrix(rows, cols, out);
    NewtonSchulzReport measured{0, static_cast<int>(schedule.size())};
    if (rows != 0 && cols != 0) {
      if constexpr (measures_residual<B, T>) {
        const index_t k = std::min(rows, cols);
        // the k x N buffer that does not hold the result (x_ keeps the Gram form's input)
        auto& spare = out.data() == backend.view(x_, rows, cols).data() ? y_ : x_;
        out = refine_to_tolerance(backend, out, short_side(backend, spare, rows, cols),
                                  backend.view(a_, k, k),
                                  backend.view(b_, k, k), options.tolerance,
                                  options.tolerance > 0 ? options.max_extra_steps : 0, measured);
      } else {
        throw InvalidArgument(
            "muon: Newton-Schulz tolerance and residual reports need a backend that reads a "
            "norm back to the host (frobenius_norm(), as EigenBackend has); this one has none");
      }
    }
    if (report != nullptr) *report = measured;
    return as_matrix(rows, cols, out);
  }

 private:
  /// The k x N short-side view of a buffer holding a row-major m x n matrix (column-major
  /// when m > n), and back: the result as the m x n matrix.
  static View short_side(B& backend, typename B::template Buffer<T>& buf, index_t rows,
                         index_t cols) {
    const View v = backend.view(buf, rows, cols);
    return rows > cols ? v.transposed() : v;
  }
  static ConstView as_matrix(index_t rows, index_t cols, View out) {
    return rows > cols ? out.transposed() : out;
  }

  /// The iteration on the k x N short side; returns the view holding the result.
  View iterate(B& backend, index_t rows, index_t cols, std::span<const Coefficients> schedule,
               double norm_scale, double eps, NewtonSchulzMethod method) {
    check(rows, cols);
    if (rows == 0 || cols == 0) return short_side(backend, x_, rows, cols);
    const index_t k = std::min(rows, cols);
    const auto side = [&](auto& buf) { return short_side(backend, buf, rows, cols); };
    const auto square = [&](auto& buf) { return backend.view(buf, k, k); };
    View out;
    // A backend may run the whole iteration in another precision, with scratch of its own that
    // the workspace keeps (detail::RunsOwnNewtonSchulz); nothing when it leaves the matrix to
    // the code below.
    if constexpr (has_scratch) {
      if (auto done = backend.template try_newton_schulz<T>(scratch_, side(x_), side(y_),
                                                            square(a_), square(b_), schedule,
                                                            norm_scale, eps, method))
        return *done;
    }
    // the precision of the products (a backend may multiply in less than T: TF32 on a GPU)
    double u = unit_roundoff<T>;
    if constexpr (requires { backend.template product_unit_roundoff<T>(); })
      u = backend.template product_unit_roundoff<T>();
    if (uses_gram(method, rows, cols, schedule, u)) {
      if (static_cast<index_t>(p_.size()) < k * k)
        throw InvalidArgument("muon: Gram Newton-Schulz workspace not reserved for " +
                              detail::shape_string(rows, cols));
      out = gram_newton_schulz_inplace(backend, side(x_), side(y_), side(z_),
                                       square(a_), square(b_), square(w_), square(q_),
                                       square(p_), schedule, norm_scale, eps, u);
      if (!gram_result_plausible(backend, ConstView(out), k))  // x_ still holds the input
        out = newton_schulz_steps(backend, side(x_), side(y_), square(a_),
                                  square(b_), schedule);
    } else {
      out = newton_schulz_inplace(backend, side(x_), side(y_), square(a_),
                                  square(b_), schedule, norm_scale, eps);
    }
    return out;
  }

  void grow(B& backend, typename B::template Buffer<T>& buf, index_t n) {
    if (static_cast<index_t>(buf.size()) < n) backend.resize(buf, n);
  }
  void check(index_t rows, index_t cols) const {
    const index_t k = std::min(rows, cols), n = std::max(rows, cols);
    if (rows < 0 || cols < 0 || k * n > static_cast<index_t>(x_.size()) ||
        k * k > static_cast<index_t>(a_.size()))
      throw InvalidArgument("muon: Newton-Schulz workspace was not reserved for a " +
                            detail::shape_string(rows, cols) +
                            " matrix; call reserve() with that shape first");
  }
  /// kGramGuard's test, where the backend can read a norm back cheaply (the CPU); a backend
  /// without frobenius_norm() relies on the restart plan alone.
  static bool gram_result_plausible(B& backend, ConstView out, index_t k) {
    if constexpr (requires { backend.frobenius_norm(out); }) {
      const double norm = backend.frobenius_norm(out);
      return norm <= kGramGuard * std::sqrt(static_cast<double>(k));  // false for NaN
    } else {
      return true;
    }
  }

  static constexpr bool has_scratch = detail::RunsOwnNewtonSchulz<B, T>;
  struct NoScratch {};
  using Scratch = typename std::conditional_t<has_scratch, detail::ScratchOf<B, T>,
                                              std::type_identity<NoScratch>>::type;

  typename B::template Buffer<T> x_, y_, z_, a_, b_, w_, q_, p_;
  Scratch scratch_;
};

/// One-off orthogonalization of `in` into `out` (same shape), with every option of `options`;
/// `report` receives the result's residual and the steps run. Allocates its workspace; for
/// repeated calls keep a NewtonSchulzWorkspace.
template <class B, class T, class S>
void orthogonalize(B& backend, MatrixView<const T, S> in, MatrixView<T, S> out,
                   const NewtonSchulzOptions& options = {},
                   NewtonSchulzReport* report = nullptr) {
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
  backend.copy(ws.run(backend, in.rows(), in.cols(), schedule, options, report), out);
}

}  // namespace muon
