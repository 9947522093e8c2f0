#pragma once
// CPU backend on Eigen 3.4. The symmetric products of Newton–Schulz are triangle-only (SYRK,
// SYMM); matrix products run on a CBLAS such as OpenBLAS when MUON_USE_CBLAS is defined (CMake
// does this when it finds one) and on Eigen's own kernels otherwise (or when
// muon::cpu::set_products / MUON_PRODUCTS=eigen asks, in a program that linked them with
// EigenBackend::link_eigen_products(): a CBLAS build leaves them out unless asked, since they
// are most of its compile time); making a backend runs
// muon::cpu::configure() once, which checks that the BLAS's kernels match the CPU's instruction
// set (cpu_dispatch.hpp). Newton-Schulz on float matrices runs its products in bfloat16 on
// CPUs that multiply bf16 in hardware, unless CpuOptions::newton_schulz says float32
// (bf16_newton_schulz.hpp; docs/precision.md). Elementwise stages are
// Eigen array expressions over the (possibly strided) views. State and workspace are
// std::vectors.
#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if MUON_USE_CBLAS
#include <cblas.h>
#endif

#include "muon/backend/bf16_newton_schulz.hpp"
#include "muon/backend/cpu_dispatch.hpp"
#include "muon/backend/worker_pool.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/error.hpp"

namespace muon {

struct CpuOptions {
  /// Storage precision of Newton-Schulz's products for float matrices: `automatic` (bfloat16
  /// where the CPU multiplies bf16 in hardware, float32 elsewhere; MUON_NS_PRECISION may pin
  /// it), `float32`, or `bfloat16` (refused on a CPU without AVX512-BF16). Double matrices
  /// always run in double.
  cpu::Precision newton_schulz = cpu::Precision::automatic;
};

class EigenBackend {
 public:
  using memory_space = HostSpace;
  template <class T>
  using Buffer = std::vector<T>;

  EigenBackend() : EigenBackend(CpuOptions{}) {}
  explicit EigenBackend(CpuOptions options) {
    const cpu::Report& r = cpu::configure();
    if (options.newton_schulz == cpu::Precision::bfloat16 && !r.bf16)
      throw InvalidArgument(
          "muon: CpuOptions::newton_schulz = bfloat16: this CPU does not multiply bf16 in "
          "hardware (no AVX512-BF16); use automatic or float32");
    if (options.newton_schulz != cpu::Precision::automatic &&
        options.newton_schulz != cpu::Precision::float32 &&
        options.newton_schulz != cpu::Precision::bfloat16)
      throw InvalidArgument("muon: CpuOptions::newton_schulz = " +
                            std::to_string(static_cast<int>(options.newton_schulz)) +
                            " is not a cpu::Precision");
    precision_ = options.newton_schulz == cpu::Precision::automatic ? r.automatic
                                                                      : options.newton_schulz;
  }

  /// The CPU, the product engine and its kernels, in one line (for benchmark tables and logs).
  static std::string products() { return cpu::report().summary(); }
  /// The same, with the precision this backend's float Newton-Schulz runs in.
  [[nodiscard]] std::string engine() const {
    return cpu::report().summary(newton_schulz_precision());
  }
  /// Compiles Eigen's product kernels (float and double) into the program that calls it and
  /// lets cpu::set_products(eigen) and MUON_PRODUCTS=eigen choose them. A build with a CBLAS
  /// leaves them out otherwise (products the BLAS cannot take then run as plain loops, which
  /// Newton-Schulz never needs); a build without one always has them. Call it before any
  /// product runs (like set_products). A template only so that a program that never calls it
  /// never compiles the kernels.
  template <class = void>
  static void link_eigen_products() {
#if MUON_USE_CBLAS
    off_blas<float>() = eigen_kernels<float>();
    off_blas<double>() = eigen_kernels<double>();
    cpu::detail::eigen_products_linked() = true;
#endif
  }

  /// float32, bfloat16, or automatic (bf16 CPU: bf16 unless the Gram form is asked for; see
  /// use_bf16): CpuOptions::newton_schulz as this process resolves it.
  [[nodiscard]] cpu::Precision newton_schulz_precision() const { return precision_; }
  /// Whether a float matrix runs in bf16 under Newton-Schulz `method`: always under CpuOptions
  /// bfloat16; under automatic on a bf16 CPU unless `method` asks for the Gram form by name
  /// (bf16 has none: it would restart at every step); never under float32. Measured on an
  /// AVX512-BF16 CPU, the bf16 plain loop beat float32 at squares (about 1.9x) and was level
  /// to 1.25x faster than the float32 Gram form at aspect 4, the distance to msign moving in
  /// its third or fourth digit (docs/precision.md).
  [[nodiscard]] bool use_bf16(NewtonSchulzMethod method) const {
    if (precision_ == cpu::Precision::float32) return false;
    return precision_ == cpu::Precision::bfloat16 || method != NewtonSchulzMethod::gram;
  }

  // ---- Newton-Schulz in bf16 (NewtonSchulzWorkspace's hooks) -----------------------------
  /// The scratch a workspace keeps for the bf16 iteration: none for double.
  template <class T>
  using NewtonSchulzScratch =
      std::conditional_t<std::is_same_v<T, float>, cpu::bf16::NewtonSchulz, std::tuple<>>;
  /// Sizes `scratch` for rows x cols matrices under `method`; whether they will run in bf16.
  template <class T>
  bool reserve_newton_schulz(NewtonSchulzScratch<T>& scratch, index_t rows, index_t cols,
                             NewtonSchulzMethod method) const {
    if constexpr (std::is_same_v<T, float>) {
      if (!use_bf16(method)) return false;
      scratch.reserve(std::min(rows, cols), std::max(rows, cols));
      return true;
    } else {
      return false;
    }
  }
  /// Runs the whole iteration in bf16 on the k x n (k <= n) short side `x` (normalizing it
  /// first) into `y`, with `a`, `b` (k x k) as float scratch, where use_bf16(method) says so;
  /// otherwise returns nothing and the float32 code runs. bf16 always runs the plain loop.
  template <class T>
  std::optional<MatrixView<T>> try_newton_schulz(NewtonSchulzScratch<T>& scratch, MatrixView<T> x,
                                                 MatrixView<T> y, MatrixView<T> a,
                                                 MatrixView<T> b,
                                                 std::span<const Coefficients> schedule,
                                                 double norm_scale, double eps,
                                                 NewtonSchulzMethod method) const {
    if constexpr (std::is_same_v<T, float>) {
      if (!use_bf16(method)) return std::nullopt;
      if (!scratch.fits(x.rows(), x.cols()))
        throw InvalidArgument("muon: bf16 Newton-Schulz workspace was not reserved for " +
                              detail::shape_string(x.rows(), x.cols()));
      normalize(x, norm_scale, eps);
      scratch.run(x, y, a, b, schedule);
      return y;
    } else {
      return std::nullopt;
    }
  }

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
  // With MUON_USE_CBLAS (CMake option MUON_BLAS, OpenBLAS by default when found) the products
  // go to CBLAS whenever the views have a unit stride BLAS can describe, which is always the
  // case inside Newton-Schulz; anything else falls back to Eigen's own kernels.

  /// C = alpha A B + beta C (C is not read when beta == 0).
  template <class T>
  void gemm(T alpha, MatrixView<const T> a, MatrixView<const T> b, T beta,
            MatrixView<T> c) const {
    if (c.empty()) return;
#if MUON_USE_CBLAS
    if (c.col_stride() != 1 && c.row_stride() == 1)  // column-major C: C^T = B^T A^T
      return gemm(alpha, b.transposed(), a.transposed(), beta, c.transposed());
    Blas ba, bb, bc;
    if (on_blas() && a.cols() > 0 && blas_operand(a, ba) && blas_operand(b, bb) && blas_output(c, bc)) {
      const cpu::detail::BlasMode mode(cpu::detail::single_threaded_products);
      cblas::gemm(CblasRowMajor, ba.trans, bb.trans, blas_int(c.rows()), blas_int(c.cols()),
                  blas_int(a.cols()), alpha, a.data(), ba.ld, b.data(), bb.ld, beta, c.data(),
                  bc.ld);
      return;
    }
#endif
    off_blas<T>().gemm(alpha, a, b, beta, c);
  }

  /// Lower triangle of C = alpha A A^T + beta C (square C; the strict upper triangle is left
  /// as it was). About half the flops of the equivalent GEMM.
  template <class T>
  void syrk(T alpha, MatrixView<const T> a, T beta, MatrixView<T> c) const {
    if (c.empty()) return;
#if MUON_USE_CBLAS
    Blas ba, bc;
    if (on_blas() && a.cols() > 0 && blas_operand(a, ba)) {
      const cpu::detail::BlasMode mode(cpu::detail::single_threaded_products);
      // A column-major C's lower triangle is the upper one of the row-major C^T = A A^T.
      const bool row_major = blas_output(c, bc);
      if (row_major || blas_output(c.transposed(), bc)) {
        cblas::syrk(CblasRowMajor, row_major ? CblasLower : CblasUpper, ba.trans,
                    blas_int(c.rows()), blas_int(a.cols()), alpha, a.data(), ba.ld, beta,
                    c.data(), bc.ld);
        return;
      }
    }
#endif
    off_blas<T>().syrk(alpha, a, beta, c);
  }

  /// C = alpha A B + beta C for symmetric A, read from its lower triangle only.
  template <class T>
  void symm(T alpha, MatrixView<const T> a, MatrixView<const T> b, T beta,
            MatrixView<T> c) const {
    if (c.empty()) return;
#if MUON_USE_CBLAS
    Blas ba, bb, bc;
    if (on_blas() && a.cols() > 0 && blas_output(a, ba)) {
      const cpu::detail::BlasMode mode(cpu::detail::single_threaded_products);
      if (blas_output(b, bb) && blas_output(c, bc)) {
        cblas::symm(CblasRowMajor, CblasLeft, CblasLower, blas_int(c.rows()), blas_int(c.cols()),
                    alpha, a.data(), ba.ld, b.data(), bb.ld, beta, c.data(), bc.ld);
        return;
      }
      // Column-major B and C (the short-side view of a tall matrix): C^T = B^T A, A on the right.
      if (blas_output(b.transposed(), bb) && blas_output(c.transposed(), bc)) {
        cblas::symm(CblasRowMajor, CblasRight, CblasLower, blas_int(c.cols()), blas_int(c.rows()),
                    alpha, a.data(), ba.ld, b.data(), bb.ld, beta, c.data(), bc.ld);
        return;
      }
    }
#endif
    off_blas<T>().symm(alpha, a, b, beta, c);
  }

  /// Copies the lower triangle of square C onto its upper triangle, in cache-sized tiles.
  template <class T>
  void symmetrize(MatrixView<T> c) const {
    constexpr index_t tile = 32;
    const index_t n = c.rows();
    for (index_t i0 = 0; i0 < n; i0 += tile)
      for (index_t j0 = i0; j0 < n; j0 += tile)
        for (index_t i = i0; i < std::min(i0 + tile, n); ++i)
          for (index_t j = std::max(j0, i + 1); j < std::min(j0 + tile, n); ++j) c(i, j) = c(j, i);
  }

  // ---- side by side (RunsSideBySide) ---------------------------------------------------
  /// The workers of side_by_side(): the process's cpu::worker_pool().
  [[nodiscard]] int workers() const { return cpu::worker_pool().size(); }

  /// Whether a rows x cols Newton-Schulz runs side by side with others, each on one thread,
  /// rather than alone on the BLAS's threads: for all but the largest matrices, where a
  /// threaded product is as fast and a workspace per worker would cost memory for nothing
  /// (measured by muon_bench's Grouped cases; docs/speed.md).
  [[nodiscard]] static bool side_by_side_fits(index_t rows, index_t cols) {
    const auto k = static_cast<double>(std::min(rows, cols));
    return k * static_cast<double>(rows) * static_cast<double>(cols) <= kSideBySideMaxCost;
  }
  static constexpr double kSideBySideMaxCost = 1024.0 * 1024.0 * 4096.0;  // k^2 N

  /// Calls f(i, worker) for every i < n on the workers (the BLAS on one thread meanwhile).
  template <class F>
  void side_by_side(std::size_t n, F&& f) const {
    cpu::worker_pool().run(n, f);
  }

  // ---- elementwise -----------------------------------------------------------------------
  template <class T>
  void copy(MatrixView<const T> src, MatrixView<T> dst) const {
    if (same_dense_order(src, MatrixView<const T>(dst)))
      std::copy_n(src.data(), src.size(), dst.data());
    else
      each([](auto D, const auto& S) { D = S; }, dst, src);
  }
  /// Converting copy (float <-> Eigen::bfloat16 / Eigen::half for MasterWeights), rounding
  /// to nearest even.
  template <class S, class D>
    requires(!std::is_same_v<S, D>)
  void copy(MatrixView<const S> src, MatrixView<D> dst) const {
    each([](auto To, const auto& From) { To = From.template cast<D>(); }, dst, src);
  }
  template <class T>
  void flush_tiny(MatrixView<T> x, T threshold) const {
    each([&](auto X) { X = (X.abs() < threshold).select(T(0), X); }, x);
  }
  template <class T>
  void scale(MatrixView<T> x, T factor) const {
    each([&](auto X) { X *= factor; }, x);
  }
  template <class T>
  void add_diagonal(MatrixView<T> x, T value) const {
    for (index_t i = 0; i < std::min(x.rows(), x.cols()); ++i) x(i, i) += value;
  }

  /// ||x||_F accumulated in double; rescaled by max|x| when the plain sum of squares would
  /// overflow or underflow (only possible for double input). The sum's order depends on the
  /// shape only, never on where the matrix lies in memory, so the same matrix in another
  /// buffer (another worker's workspace, a rank's slice) normalizes to the same bits.
  template <class T>
  double frobenius_norm(MatrixView<const T> x) const {
    if (x.empty()) return 0.0;
    const double ss = sum_of_squares(x, 1.0);
    if (std::isfinite(ss) && ss >= std::numeric_limits<double>::min()) return std::sqrt(ss);
    double amax = 0;
    each([&](const auto& X) {  // NaN wins, as it would over the whole matrix
      const auto m = static_cast<double>(X.abs().template maxCoeff<Eigen::PropagateNaN>());
      if (!(m <= amax) && !std::isnan(amax)) amax = m;
    }, x);
    if (amax == 0 || !std::isfinite(amax)) return amax;
    return amax * std::sqrt(sum_of_squares(x, 1.0 / amax));
  }

  /// x /= max(norm_scale * ||x||_F, eps), the scaling done in double so that neither a huge
  /// norm (entries of 1e20 in float) nor a tiny one flushes the result to zero or infinity.
  template <class T>
  void normalize(MatrixView<T> x, double norm_scale, double eps) const {
    const double denom = std::max(norm_scale * frobenius_norm(MatrixView<const T>(x)), eps);
    const double inverse = 1.0 / denom;
    if (inverse >= std::numeric_limits<double>::min())  // a normal reciprocal: multiply
      each([&](auto X) { X = (X.template cast<double>() * inverse).template cast<T>(); }, x);
    else  // a norm beyond 1/DBL_MIN (double entries near DBL_MAX): divide
      each([&](auto X) { X = (X.template cast<double>() / denom).template cast<T>(); }, x);
  }

  template <class T>
  bool all_finite(MatrixView<const T> x) const {
    bool ok = true;
    each([&](const auto& X) { ok = ok && X.allFinite(); }, x);
    return ok;
  }

  /// The generic elementwise primitive: f on corresponding elements of same-shape views,
  /// handed over as flat array blocks of a few thousand elements (one vectorized pass per
  /// stage, the blocks small enough that a stage of several statements reads memory once).
  /// Views that are not all dense in one order are walked in row-major order, a view that is
  /// not dense row-major being copied block by block into a buffer (and back, if written): f
  /// sees flat arrays either way, so a stage is compiled for one kind of block only.
  template <class F, class... T>
  void each(F f, MatrixView<T>... v) const {
    const index_t size = std::get<0>(std::tuple<MatrixView<T>...>(v...)).size();
    if (same_dense_order(v...)) {
      constexpr index_t piece = 8192;  // elements: a few arrays of it stay in L1/L2
      for (index_t at = 0; at < size; at += piece)
        f(flat(v.data() + at, std::min(piece, size - at))...);
      return;
    }
    std::tuple<Gathered<T>...> blocks{Gathered<T>(v)...};
    for (index_t at = 0; at < size; at += kGatheredPiece) {
      const index_t len = std::min(kGatheredPiece, size - at);
      std::apply([&](auto&... b) { f(flat(b.load(at, len), len)...); }, blocks);
      std::apply([&](auto&... b) { (b.store(at, len), ...); }, blocks);
    }
  }

  /// The generic reduction: out(i, 0) = the sum over j of f(v(i, j)...), in double, term by
  /// term in column order (no vectorized partial sums: the same bits wherever the views lie).
  template <class F, class T, class... V>
  void reduce_rows(F f, MatrixView<T> out, MatrixView<V>... v) const {
    const auto first = std::get<0>(std::tuple<MatrixView<V>...>(v...));
    for (index_t i = 0; i < first.rows(); ++i) {
      double sum = 0;
      for (index_t j = 0; j < first.cols(); ++j) sum += static_cast<double>(f(v(i, j)...));
      out(i, 0) = static_cast<T>(sum);
    }
  }

 private:
#if MUON_USE_CBLAS
  static bool on_blas() { return cpu::products() == cpu::Products::blas; }
  struct Blas {
    CBLAS_TRANSPOSE trans = CblasNoTrans;
    blasint ld = 0;
  };
  static blasint blas_int(index_t v) { return static_cast<blasint>(v); }
  /// Describes an operand as op(row-major storage) with a leading dimension, if it can be.
  template <class T>
  static bool blas_operand(MatrixView<T> v, Blas& out) {
    if (v.col_stride() == 1 && v.row_stride() >= std::max<index_t>(1, v.cols())) {
      out = {CblasNoTrans, blas_int(v.row_stride())};
      return true;
    }
    if (v.row_stride() == 1 && v.col_stride() >= std::max<index_t>(1, v.rows())) {
      out = {CblasTrans, blas_int(v.col_stride())};
      return true;
    }
    return false;
  }
  /// Outputs must be row-major with a valid leading dimension.
  template <class T>
  static bool blas_output(MatrixView<T> v, Blas& out) {
    return blas_operand(v, out) && out.trans == CblasNoTrans;
  }
  struct cblas {
    static void gemm(CBLAS_ORDER o, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n,
                     blasint k, float alpha, const float* a, blasint lda, const float* b,
                     blasint ldb, float beta, float* c, blasint ldc) {
      cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    static void gemm(CBLAS_ORDER o, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n,
                     blasint k, double alpha, const double* a, blasint lda, const double* b,
                     blasint ldb, double beta, double* c, blasint ldc) {
      cblas_dgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    static void syrk(CBLAS_ORDER o, CBLAS_UPLO u, CBLAS_TRANSPOSE t, blasint n, blasint k,
                     float alpha, const float* a, blasint lda, float beta, float* c, blasint ldc) {
      cblas_ssyrk(o, u, t, n, k, alpha, a, lda, beta, c, ldc);
    }
    static void syrk(CBLAS_ORDER o, CBLAS_UPLO u, CBLAS_TRANSPOSE t, blasint n, blasint k,
                     double alpha, const double* a, blasint lda, double beta, double* c,
                     blasint ldc) {
      cblas_dsyrk(o, u, t, n, k, alpha, a, lda, beta, c, ldc);
    }
    static void symm(CBLAS_ORDER o, CBLAS_SIDE s, CBLAS_UPLO u, blasint m, blasint n, float alpha,
                     const float* a, blasint lda, const float* b, blasint ldb, float beta,
                     float* c, blasint ldc) {
      cblas_ssymm(o, s, u, m, n, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    static void symm(CBLAS_ORDER o, CBLAS_SIDE s, CBLAS_UPLO u, blasint m, blasint n,
                     double alpha, const double* a, blasint lda, const double* b, blasint ldb,
                     double beta, double* c, blasint ldc) {
      cblas_dsymm(o, s, u, m, n, alpha, a, lda, b, ldb, beta, c, ldc);
    }
  };
#endif

  /// The sum of (scale x)^2 in double: eight running sums over the elements in index order
  /// (row by row, or along memory for a dense column-major view), added at the end.
  template <class T>
  static double sum_of_squares(MatrixView<const T> x, double scale) {
    double acc[8] = {};
    index_t lane = 0;
    const auto run = [&](const T* p, index_t n, index_t stride) {
      index_t i = 0;
      for (; lane != 0 && i < n; ++i, lane = (lane + 1) % 8) {
        const double v = scale * static_cast<double>(p[i * stride]);
        acc[lane] += v * v;
      }
      if (stride == 1)
        for (; i + 8 <= n; i += 8)
          for (int l = 0; l < 8; ++l) {
            const double v = scale * static_cast<double>(p[i + l]);
            acc[l] += v * v;
          }
      for (; i < n; ++i, lane = (lane + 1) % 8) {
        const double v = scale * static_cast<double>(p[i * stride]);
        acc[lane] += v * v;
      }
    };
    if (x.is_row_major_contiguous() || x.transposed().is_row_major_contiguous()) {
      run(x.data(), x.size(), 1);
    } else {
      for (index_t i = 0; i < x.rows(); ++i) run(x.data() + i * x.row_stride(), x.cols(), x.col_stride());
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }

  /// How a product reads its left operand: whole, or as the symmetric matrix its lower
  /// triangle describes.
  enum class Operand { general, symmetric_lower };

  /// C = alpha product(A, B) + beta C on Eigen's own kernels (C not read when beta == 0), for
  /// views with a unit stride; the others (never Newton-Schulz's, whose workspaces are dense)
  /// by loop_product, which keeps Eigen's product code to the few layouts that need it.
  template <class T, class Product>
  static void eigen_product(T alpha, MatrixView<const T> a, MatrixView<const T> b, T beta,
                            MatrixView<T> c, Operand left, Product product) {
    if (!has_unit_stride(a) || !has_unit_stride(b) || !has_unit_stride(c))
      return loop_product(alpha, a, b, beta, c, left, false);
    with_dense(c, [&](auto C) {
      if (beta == T(0))
        C.setZero();
      else if (beta != T(1))
        C *= beta;
      if (a.cols() == 0) return;
      with_dense(a, [&](auto A) {
        with_dense(b, [&](auto B) { C.noalias() += alpha * product(A, B); });
      });
    });
  }

  template <class T>
  using RowMajor = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic,
                                 Eigen::RowMajor>;
  template <class T>
  using ColMajor = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic,
                                 Eigen::ColMajor>;
  template <class M, class T>
  using MaybeConst = std::conditional_t<std::is_const_v<T>, const M, M>;

  /// A flat array map of n elements at p: the one kind of block each() hands a stage.
  template <class T>
  static auto flat(T* p, index_t n) {
    return Eigen::Map<MaybeConst<Eigen::Array<std::remove_const_t<T>, Eigen::Dynamic, 1>, T>>(p, n);
  }

  static constexpr index_t kGatheredPiece = 1024;  // elements: each()'s buffers are on the stack
  /// One view's elements [at, at + len) in row-major order, for each(): in place where the view
  /// is dense row-major, else copied into a buffer by load() and, for a writable view, back by
  /// store().
  template <class T>
  class Gathered {
   public:
    explicit Gathered(MatrixView<T> v) : v_(v), in_place_(v.is_row_major_contiguous()) {}
    T* load(index_t at, index_t len) {
      if (in_place_) return v_.data() + at;
      walk(at, len, [&](index_t k, T& e) { buffer_[k] = e; });
      return buffer_.data();
    }
    void store(index_t at, index_t len) {
      if constexpr (!std::is_const_v<T>)
        if (!in_place_) walk(at, len, [&](index_t k, T& e) { e = buffer_[k]; });
    }

   private:
    template <class F>
    void walk(index_t at, index_t len, F f) const {
      const index_t cols = v_.cols();
      index_t i = at / cols, j = at % cols;
      for (index_t k = 0; k < len; ++k) {
        f(k, v_(i, j));
        if (++j == cols) j = 0, ++i;
      }
    }
    MatrixView<T> v_;
    bool in_place_;
    std::array<std::remove_const_t<T>, kGatheredPiece> buffer_;
  };

  /// The kernels of the products a CBLAS does not run (all of them in a build without one):
  /// Eigen's, or plain loops in a CBLAS build that did not link Eigen's (link_eigen_products).
  template <class T>
  struct Kernels {
    void (*gemm)(T, MatrixView<const T>, MatrixView<const T>, T, MatrixView<T>);
    void (*syrk)(T, MatrixView<const T>, T, MatrixView<T>);
    void (*symm)(T, MatrixView<const T>, MatrixView<const T>, T, MatrixView<T>);
  };
  template <class T>
  static Kernels<T> eigen_kernels() {
    return {&eigen_gemm<T>, &eigen_syrk<T>, &eigen_symm<T>};
  }
#if MUON_USE_CBLAS
  template <class T>
  static Kernels<T>& off_blas() {
    static Kernels<T> kernels{&loop_gemm<T>, &loop_syrk<T>, &loop_symm<T>};
    return kernels;
  }
#else
  template <class T>
  static Kernels<T> off_blas() {
    return eigen_kernels<T>();
  }
#endif
  template <class T>
  static void loop_gemm(T alpha, MatrixView<const T> a, MatrixView<const T> b, T beta,
                        MatrixView<T> c) {
    loop_product(alpha, a, b, beta, c, Operand::general, false);
  }
  template <class T>
  static void loop_syrk(T alpha, MatrixView<const T> a, T beta, MatrixView<T> c) {
    loop_product(alpha, a, a.transposed(), beta, c, Operand::general, true);
  }
  template <class T>
  static void loop_symm(T alpha, MatrixView<const T> a, MatrixView<const T> b, T beta,
                        MatrixView<T> c) {
    loop_product(alpha, a, b, beta, c, Operand::symmetric_lower, false);
  }
  template <class T>
  static void eigen_gemm(T alpha, MatrixView<const T> a, MatrixView<const T> b, T beta,
                         MatrixView<T> c) {
    eigen_product(alpha, a, b, beta, c, Operand::general,
                  [](const auto& A, const auto& B) { return A * B; });
  }
  template <class T>
  static void eigen_symm(T alpha, MatrixView<const T> a, MatrixView<const T> b, T beta,
                         MatrixView<T> c) {
    eigen_product(alpha, a, b, beta, c, Operand::symmetric_lower, [](const auto& A, const auto& B) {
      return A.template selfadjointView<Eigen::Lower>() * B;
    });
  }
  template <class T>
  static void eigen_syrk(T alpha, MatrixView<const T> a, T beta, MatrixView<T> c) {
    if (!has_unit_stride(a) || !has_unit_stride(c)) return loop_syrk(alpha, a, beta, c);
    with_dense(c, [&](auto C) {
      if (beta == T(0))
        C.template triangularView<Eigen::Lower>().setZero();
      else if (beta != T(1))
        C.template triangularView<Eigen::Lower>() *= beta;
      if (a.cols() > 0)
        with_dense(a, [&](auto A) {
          C.template selfadjointView<Eigen::Lower>().rankUpdate(A, alpha);
        });
    });
  }

  /// Whether a view is row- or column-major with a unit inner stride, as Eigen's GEMM kernels
  /// need to run without a temporary copy.
  template <class T>
  static bool has_unit_stride(MatrixView<T> v) {
    return v.col_stride() == 1 || v.cols() <= 1 || v.row_stride() == 1 || v.rows() <= 1;
  }
  /// Calls f with the unit-inner-stride map (row- or column-major) of a view that has one.
  template <class T, class F>
  static void with_dense(MatrixView<T> v, F&& f) {
    using Outer = Eigen::OuterStride<Eigen::Dynamic>;
    if (v.col_stride() == 1 || v.cols() <= 1) {
      Eigen::Map<MaybeConst<RowMajor<T>, T>, Eigen::Unaligned, Outer> m(
          v.data(), v.rows(), v.cols(), Outer(v.rows() <= 1 ? v.cols() : v.row_stride()));
      f(m);
    } else {
      Eigen::Map<MaybeConst<ColMajor<T>, T>, Eigen::Unaligned, Outer> m(
          v.data(), v.rows(), v.cols(), Outer(v.cols() <= 1 ? v.rows() : v.col_stride()));
      f(m);
    }
  }
  /// C = alpha op(A) B + beta C by plain loops, each entry summed in order (C not read when
  /// beta == 0); op(A) is A, or the symmetric matrix of A's lower triangle. `lower_only`
  /// writes C's lower triangle only (syrk).
  template <class T>
  static void loop_product(T alpha, MatrixView<const T> a, MatrixView<const T> b, T beta,
                           MatrixView<T> c, Operand left, bool lower_only) {
    for (index_t i = 0; i < c.rows(); ++i)
      for (index_t j = 0; j < (lower_only ? i + 1 : c.cols()); ++j) {
        T sum(0);
        for (index_t k = 0; k < a.cols(); ++k)
          sum += (left == Operand::symmetric_lower && k > i ? a(k, i) : a(i, k)) * b(k, j);
        c(i, j) = beta == T(0) ? alpha * sum : alpha * sum + beta * c(i, j);
      }
  }

  /// True when all views are dense with their elements in the same memory order (all
  /// row-major or all column-major), so they can be walked as flat arrays side by side.
  template <class... T>
  static bool same_dense_order(MatrixView<T>... v) {
    return (v.is_row_major_contiguous() && ...) ||
           (v.transposed().is_row_major_contiguous() && ...);
  }

  // CpuOptions::newton_schulz as resolved (newton_schulz_precision())
  cpu::Precision precision_ = cpu::Precision::float32;
};

static_assert(Backend<EigenBackend, float> && Backend<EigenBackend, double> &&
              RunsSideBySide<EigenBackend>);

}  // namespace muon
