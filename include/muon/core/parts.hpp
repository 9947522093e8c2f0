#pragma once
// The matrices inside one registered parameter that Newton-Schulz orthogonalizes one by one.
// A plain weight is one matrix. An expert stack (E x m x n, seen flattened as E x (m n)) is E
// matrices, expert e being row e of the flattened matrix read as m x n. A fused matrix split
// along an axis (QKV rows, attention heads) is one matrix per block. Each part is scaled by
// its own shape; the momentum and the parameter's state stay one buffer.
#include <cstddef>
#include <string>
#include <vector>

#include "muon/core/error.hpp"
#include "muon/core/matrix_view.hpp"

namespace muon {

/// A stack of experts in one parameter: each row of the flattened matrix (E x m x n seen as
/// E x (m n)) is one expert's m x n matrix, m = `rows`; 0 takes m from a TensorView's shape[1].
struct Experts {
  index_t rows = 0;
};

/// How a fused Muon matrix splits into the matrices that are orthogonalized on their own:
/// consecutive blocks of `sizes` rows (axis 0) or columns (axis 1) of the flattened matrix,
/// whose sizes add up to that extent.
struct Split {
  int axis = 0;
  std::vector<index_t> sizes;
};

namespace detail {

/// One matrix of a parameter: the block (row0, col0, block_rows x block_cols) of the flattened
/// matrix, read as rows x cols. rows x cols is the block's own shape except for an expert,
/// whose block is one row of rows * cols elements read in row-major order.
struct Part {
  index_t row0 = 0, col0 = 0, block_rows = 0, block_cols = 0;
  index_t rows = 0, cols = 0;
  /// Where its elements start in its rule's buffers per matrix (set at registration).
  index_t state_at = 0;
  [[nodiscard]] bool empty() const { return rows == 0 || cols == 0; }
  [[nodiscard]] index_t size() const { return rows * cols; }
  /// Whether the block lies inside rows [r0, r0 + r) and columns [c0, c0 + c).
  [[nodiscard]] bool inside(index_t r0, index_t c0, index_t r, index_t c) const {
    return row0 >= r0 && col0 >= c0 && row0 + block_rows <= r0 + r && col0 + block_cols <= c0 + c;
  }
};

/// The part as a rows x cols view into `flat`, a view of the flattened matrix (or of a block of
/// it starting at (origin_row, origin_col) that holds the part).
template <class X, class S>
MatrixView<X, S> part_view(MatrixView<X, S> flat, const Part& p, index_t origin_row = 0,
                           index_t origin_col = 0) {
  const MatrixView<X, S> b =
      flat.block(p.row0 - origin_row, p.col0 - origin_col, p.block_rows, p.block_cols);
  if (p.rows == p.block_rows && p.cols == p.block_cols) return b;
  return MatrixView<X, S>(b.data(), p.rows, p.cols, p.cols * b.col_stride(), b.col_stride());
}

/// A plain weight: one part, the whole matrix.
inline std::vector<Part> whole(index_t rows, index_t cols) {
  return {Part{0, 0, rows, cols, rows, cols}};
}

/// An expert stack seen flattened: `count` rows of `row_length` elements, each row one expert
/// of `rows` x (row_length / rows).
inline std::vector<Part> experts(index_t count, index_t row_length, index_t rows,
                                 const std::string& what) {
  if (rows <= 0 || row_length % rows != 0)
    throw InvalidArgument(what + ": experts of " + std::to_string(rows) +
                          " rows do not divide the " + std::to_string(row_length) +
                          " elements of each expert");
  std::vector<Part> parts;
  for (index_t e = 0; e < count; ++e)
    parts.push_back({e, 0, 1, row_length, rows, row_length / rows});
  return parts;
}

/// A rows x cols matrix split along split.axis into blocks of split.sizes.
inline std::vector<Part> split(index_t rows, index_t cols, const Split& s, const std::string& what) {
  if (s.axis != 0 && s.axis != 1)
    throw InvalidArgument(what + ": split axis " + std::to_string(s.axis) +
                          " is neither 0 (rows) nor 1 (columns)");
  const index_t extent = s.axis == 0 ? rows : cols;
  index_t total = 0;
  for (index_t n : s.sizes) {
    if (n < 0) throw InvalidArgument(what + ": split size " + std::to_string(n) + " is negative");
    total += n;
  }
  if (s.sizes.empty() || total != extent)
    throw InvalidArgument(what + ": split sizes add up to " + std::to_string(total) + " but axis " +
                          std::to_string(s.axis) + " has " + std::to_string(extent) +
                          (s.sizes.empty() ? " (no sizes given)" : ""));
  std::vector<Part> parts;
  index_t at = 0;
  for (index_t n : s.sizes) {
    parts.push_back(s.axis == 0 ? Part{at, 0, n, cols, n, cols}
                                : Part{0, at, rows, n, rows, n});
    at += n;
  }
  return parts;
}

}  // namespace detail
}  // namespace muon
