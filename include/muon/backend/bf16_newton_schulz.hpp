#pragma once
// Internal: included by the library's own headers, not by programs.
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
  static constexpr index_t kBlock = 32;  // conversions go in 32 x 32 blocks, a task a block row
  static constexpr index_t kChunk = 256;  // floats of a row formed on the stack before rounding

  static std::size_t blocks(index_t n) { return static_cast<std::size_t>((n + kBlock - 1) / kBlock); }
  /// Calls f(i, j) for every element of block row `task` of a rows x cols matrix, block by
  /// block, columns outer when `by_columns` (a column-major source or destination).
  template <class F>
  static void each_in_block_row(std::size_t task, index_t rows, index_t cols, bool by_columns, F&& f) {
    const index_t i0 = static_cast<index_t>(task) * kBlock, i1 = std::min(rows, i0 + kBlock);
    for (index_t j0 = 0; j0 < cols; j0 += kBlock) {
      const index_t j1 = std::min(cols, j0 + kBlock);
      if (by_columns) {
        for (index_t j = j0; j < j1; ++j)
          for (index_t i = i0; i < i1; ++i) f(i, j);
      } else {
        for (index_t i = i0; i < i1; ++i)
          for (index_t j = j0; j < j1; ++j) f(i, j);
      }
    }
  }
  /// dst (dense row-major) = bf16(src).
  static void round_into(MatrixView<const float> src, Bits* dst) {
    const index_t n = src.cols();
    auto task = [&](std::size_t t, int) {
      if (src.col_stride() == 1) {
        const index_t i0 = static_cast<index_t>(t) * kBlock;
        for (index_t i = i0; i < std::min(src.rows(), i0 + kBlock); ++i)
          round_row(src.data() + i * src.row_stride(), dst + i * n, n);
        return;
      }
      each_in_block_row(t, src.rows(), n, true,
                        [&](index_t i, index_t j) { dst[i * n + j] = from_float(src(i, j)); });
    };
    detail::for_each_task(blocks(src.rows()), task);
  }
  /// dst = src (same shape, any layouts).
  static void transpose_copy(MatrixView<const float> src, MatrixView<float> dst) {
    auto task = [&](std::size_t t, int) {
      each_in_block_row(t, src.rows(), src.cols(), dst.col_stride() != 1,
                        [&](index_t i, index_t j) { dst(i, j) = src(i, j); });
    };
    detail::for_each_task(blocks(src.rows()), task);
  }
  /// dst (full, dense) = bf16(c t + b s + a I) from the lower triangles of t and s (dense
  /// row-major).
  static void mirror_round(MatrixView<const float> t, MatrixView<const float> s, float c,
                           float b, float a, Bits* dst) {
    const index_t k = t.rows();
    auto task = [&](std::size_t row_block, int) {
      const index_t i0 = static_cast<index_t>(row_block) * kBlock, i1 = std::min(k, i0 + kBlock);
      for (index_t i = i0; i < i1; ++i) {  // row i up to the diagonal, in float32, then rounded
        const float* ti = t.data() + i * k;
        const float* si = s.data() + i * k;
        for (index_t j0 = 0; j0 <= i; j0 += kChunk) {
          const index_t len = std::min(kChunk, i + 1 - j0);
          alignas(64) float v[kChunk];
          if (c == 0) {  // t is not formed
            for (index_t j = 0; j < len; ++j) v[j] = b * si[j0 + j];
          } else {
            for (index_t j = 0; j < len; ++j) v[j] = c * ti[j0 + j] + b * si[j0 + j];
          }
          if (j0 + len == i + 1) v[len - 1] += a;
          round_row(v, dst + i * k + j0, len);
        }
      }
      // The mirror, block by block through a local copy: reading dst's column while writing its
      // row would alias every 4 KB when k is a power of two (loads wait on unrelated stores).
      for (index_t j0 = 0; j0 < i1; j0 += kBlock) {
        const index_t j1 = std::min(i1, j0 + kBlock);
        Bits block[kBlock][kBlock];
        for (index_t i = i0; i < i1; ++i)
          for (index_t j = j0; j < std::min(j1, i + 1); ++j) block[i - i0][j - j0] = dst[i * k + j];
        for (index_t j = j0; j < j1; ++j)
          for (index_t i = std::max(i0, j + 1); i < i1; ++i) dst[j * k + i] = block[i - i0][j - j0];
      }
    };
    detail::for_each_task(blocks(k), task);
  }

  std::vector<Bits> x_, a_, b_;
  std::vector<PackBuffers> packs_;
};

}  // namespace muon::cpu::bf16
