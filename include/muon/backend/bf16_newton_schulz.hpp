#pragma once
// Newton–Schulz with bfloat16 operands on the CPU (bf16_products.hpp): the normalized X, the
// Gram matrix A and the polynomial B are stored in bf16 and multiplied with float32
// accumulation; A, A^2 and B are formed in float32 and each product's float32 result is
// rounded to bf16 once, where the next product reads it. Per step, on the k x N short side:
//   A  = X X^T          lower triangle (half the work), float32
//   Ab = bf16(A)        mirrored
//   T  = Ab Ab^T        lower triangle, float32 (A is symmetric: A A = A A^T)
//   Bb = bf16(c T + b A + a I), mirrored
//   Y  = Bb X           float32; X = bf16(Y) for the next step, Y itself after the last
// torch.optim.Muon's bf16 iteration rounds every intermediate (a X, b A, c A^2 and the sums) to
// bf16 as well; here only the product operands are bf16, which is why this iteration lands
// nearer the exact msign than torch's (docs/precision.md). The plain loop only: the Gram form
// would restart at every step in bf16 (GramRestartPlan at u = 2^-9) and gain nothing.
#include <algorithm>
#include <span>
#include <vector>

#include "muon/backend/bf16_products.hpp"
#include "muon/core/options.hpp"

namespace muon::cpu::bf16 {

/// Workspace and driver of the bf16 iteration for matrices up to a reserved size. reserve()
/// allocates; run() does not.
class NewtonSchulz {
 public:
  /// Makes room for a k x n short side (k <= n).
  void reserve(index_t k, index_t n) {
    if (k * n > static_cast<index_t>(x_.size())) x_.assign(static_cast<std::size_t>(k * n), 0);
    if (k * k > static_cast<index_t>(a_.size())) {
      a_.assign(static_cast<std::size_t>(k * k), 0);
      b_.assign(static_cast<std::size_t>(k * k), 0);
    }
    const auto workers = static_cast<std::size_t>(worker_pool().size());
    if (packs_.size() < workers) packs_.resize(workers);
    for (PackBuffers& p : packs_) p.reserve(k, n);
  }
  [[nodiscard]] bool fits(index_t k, index_t n) const {
    return k * n <= static_cast<index_t>(x_.size()) && k * k <= static_cast<index_t>(a_.size()) &&
           !packs_.empty() && packs_[0].fits(k, n);
  }

  /// Runs `schedule` on the normalized k x n `x` (k <= n, dense row- or column-major), with
  /// float32 scratch `fa`, `fb` (k x k, dense row-major); the result goes to `y` (same layout
  /// as x). `x` is overwritten. The products write row-major: a column-major y (the short side
  /// of a tall matrix) receives the last one through x's storage, transposed in tiles.
  void run(MatrixView<float> x, MatrixView<float> y, MatrixView<float> fa, MatrixView<float> fb,
           std::span<const Coefficients> schedule) {
    const index_t k = x.rows(), n = x.cols();
    round_into(MatrixView<const float>(x), x_.data());
    const MatrixView<float> dense = row_major_view(x.data(), k, n);  // x's storage, reused
    const Operand xs{x_.data(), n, 1};  // X, k x n
    const Operand xt{x_.data(), 1, n};  // X^T
    const Operand as{a_.data(), k, 1};  // Ab (symmetric, full)
    const Operand bs{b_.data(), k, 1};  // Bb (symmetric, full)
    for (std::size_t t = 0; t < schedule.size(); ++t) {
      const Coefficients& p = schedule[t];
      product(k, k, n, xs, xt, fa.data(), k, 1, true, packs_);
      mirror_round(fa, fa, 0, 1, 0, a_.data());
      if (p.c != 0) product(k, k, k, as, as, fb.data(), k, 1, true, packs_);  // c = 0: no A^2
      mirror_round(fb, fa, static_cast<float>(p.c), static_cast<float>(p.b),
                   static_cast<float>(p.a), b_.data());
      const bool last = t + 1 == schedule.size();
      const MatrixView<float> out = last && y.col_stride() == 1 ? y : dense;
      product(k, n, k, bs, xs, out.data(), n, 1, false, packs_);
      if (!last) round_into(MatrixView<const float>(out), x_.data());
    }
    if (schedule.empty()) {  // no step: the normalized input, as the float32 loop returns it
      for (index_t i = 0; i < k * n; ++i) dense.data()[i] = to_float(x_[static_cast<std::size_t>(i)]);
    }
    if (schedule.empty() || y.col_stride() != 1) transpose_copy(dense, y);
  }

 private:
  /// dst (dense row-major) = bf16(src).
  static void round_into(MatrixView<const float> src, Bits* dst) {
    const index_t n = src.cols();
    for (index_t i = 0; i < src.rows(); ++i) {
      const float* row = src.data() + i * src.row_stride();
      const index_t cs = src.col_stride();
      for (index_t j = 0; j < n; ++j) dst[i * n + j] = from_float(row[j * cs]);
    }
  }
  /// dst = src (same shape, any layouts), in 32 x 32 tiles.
  static void transpose_copy(MatrixView<const float> src, MatrixView<float> dst) {
    constexpr index_t tile = 32;
    for (index_t i0 = 0; i0 < src.rows(); i0 += tile)
      for (index_t j0 = 0; j0 < src.cols(); j0 += tile)
        for (index_t j = j0; j < std::min(j0 + tile, src.cols()); ++j)
          for (index_t i = i0; i < std::min(i0 + tile, src.rows()); ++i) dst(i, j) = src(i, j);
  }
  /// dst (full, dense) = bf16(c t + b s + a I) from the lower triangles of t and s.
  static void mirror_round(MatrixView<const float> t, MatrixView<const float> s, float c,
                           float b, float a, Bits* dst) {
    const index_t k = t.rows();
    for (index_t i = 0; i < k; ++i)
      for (index_t j = 0; j <= i; ++j) {
        float v = c == 0 ? 0.0f : c * t(i, j);  // t is not formed when c = 0
        v += b * s(i, j);
        if (i == j) v += a;
        dst[i * k + j] = dst[j * k + i] = from_float(v);
      }
  }

  std::vector<Bits> x_, a_, b_;
  std::vector<PackBuffers> packs_;
};

}  // namespace muon::cpu::bf16
