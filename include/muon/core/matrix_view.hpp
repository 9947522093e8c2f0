#pragma once
// Non-owning views of matrices that live in someone else's memory (an Eigen matrix, a LibTorch
// tensor, a CUDA allocation). A view is a pointer, two extents and two strides counted in
// elements, so row-major, column-major, transposed and strided sub-blocks are all the same type
// and nothing is ever copied to look at them. The memory space is part of the type: a host
// backend cannot be handed device memory by mistake.
#include <cstddef>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include "muon/core/error.hpp"

namespace muon {

/// Memory that the CPU can dereference.
struct HostSpace {};
/// Memory on a CUDA device (only backends for that space may touch it).
struct DeviceSpace {};

template <class T, class Space = HostSpace>
class MatrixView {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using memory_space = Space;

  constexpr MatrixView() = default;
  constexpr MatrixView(T* data, index_t rows, index_t cols, index_t row_stride, index_t col_stride)
      : data_(data), rows_(rows), cols_(cols), row_stride_(row_stride), col_stride_(col_stride) {}

  /// A mutable view converts to a read-only one, never the other way round.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  constexpr MatrixView(const MatrixView<U, Space>& other)  // NOLINT(google-explicit-constructor)
      : MatrixView(other.data(), other.rows(), other.cols(), other.row_stride(),
                   other.col_stride()) {}

  [[nodiscard]] constexpr T* data() const noexcept { return data_; }
  [[nodiscard]] constexpr index_t rows() const noexcept { return rows_; }
  [[nodiscard]] constexpr index_t cols() const noexcept { return cols_; }
  [[nodiscard]] constexpr index_t row_stride() const noexcept { return row_stride_; }
  [[nodiscard]] constexpr index_t col_stride() const noexcept { return col_stride_; }
  [[nodiscard]] constexpr index_t size() const noexcept { return rows_ * cols_; }
  [[nodiscard]] constexpr bool empty() const noexcept { return rows_ == 0 || cols_ == 0; }

  /// Dense row-major: element (i, j) at data[i * cols + j].
  [[nodiscard]] constexpr bool is_row_major_contiguous() const noexcept {
    return (col_stride_ == 1 || cols_ <= 1) && (row_stride_ == cols_ || rows_ <= 1);
  }

  /// The transpose, as a view of the same memory.
  [[nodiscard]] constexpr MatrixView transposed() const noexcept {
    return MatrixView(data_, cols_, rows_, col_stride_, row_stride_);
  }

  [[nodiscard]] constexpr MatrixView block(index_t row, index_t col, index_t rows,
                                           index_t cols) const noexcept {
    return MatrixView(data_ + row * row_stride_ + col * col_stride_, rows, cols, row_stride_,
                      col_stride_);
  }

  [[nodiscard]] constexpr T& operator()(index_t i, index_t j) const noexcept
    requires std::is_same_v<Space, HostSpace>
  {
    return data_[i * row_stride_ + j * col_stride_];
  }

 private:
  T* data_ = nullptr;
  index_t rows_ = 0;
  index_t cols_ = 0;
  index_t row_stride_ = 0;
  index_t col_stride_ = 1;
};

template <class Space = HostSpace, class T>
constexpr MatrixView<T, Space> row_major_view(T* data, index_t rows, index_t cols) {
  return {data, rows, cols, cols, 1};
}

template <class Space = HostSpace, class T>
constexpr MatrixView<T, Space> col_major_view(T* data, index_t rows, index_t cols) {
  return {data, rows, cols, 1, rows};
}

/// An N-D strided array (strides in elements, as LibTorch and xtensor report them) seen as
/// Muon sees it: (shape[0], product of the rest); 1-D is 1 x n, 0-D is 1 x 1. Any strides work
/// up to 2-D. Beyond that the trailing dimensions must be one dense row-major block (they are
/// merged into one column index); otherwise this throws InvalidArgument naming `what`, since
/// the view would need a copy.
template <class Space = HostSpace, class T>
MatrixView<T, Space> strided_view(T* data, std::span<const index_t> shape,
                                  std::span<const index_t> strides, const std::string& what) {
  if (shape.size() != strides.size())
    throw InvalidArgument("muon: " + what + " has " + std::to_string(shape.size()) +
                          " extents but " + std::to_string(strides.size()) + " strides");
  switch (shape.size()) {
    case 0: return {data, 1, 1, 1, 1};
    case 1: return {data, 1, shape[0], shape[0] * strides[0], strides[0]};
    case 2: return {data, shape[0], shape[1], strides[0], strides[1]};
    default: break;
  }
  index_t dense = 1;  // the stride dimension k must have for the trailing block to be dense
  for (std::size_t k = shape.size() - 1; k >= 1; --k) {
    if (shape[k] != 1 && strides[k] != dense)
      throw InvalidArgument("muon: " + what + " of shape " + detail::shape_string(shape) +
                            " is not dense in its trailing dimensions (stride " +
                            std::to_string(strides[k]) + " in dimension " + std::to_string(k) +
                            ", expected " + std::to_string(dense) +
                            "): make it contiguous before viewing it");
    dense *= shape[k];
  }
  return {data, shape[0], dense, strides[0], 1};
}

/// A dense row-major N-D tensor (e.g. a conv kernel out x in x kh x kw). Muon sees it flattened
/// to (shape[0], product of the rest), which is also the shape its update scale is computed on.
template <class T, class Space = HostSpace>
struct TensorView {
  T* data = nullptr;
  std::vector<index_t> shape;

  [[nodiscard]] index_t numel() const {
    return std::accumulate(shape.begin(), shape.end(), index_t{1}, std::multiplies<>());
  }
  /// (shape[0], prod(shape[1:])); a 1-D tensor becomes 1 x n.
  [[nodiscard]] MatrixView<T, Space> flattened() const {
    if (shape.empty()) return {data, 1, 1, 1, 1};
    const index_t rows = shape.size() == 1 ? 1 : shape[0];
    const index_t cols = rows == 0 ? 0 : numel() / rows;
    return {data, rows, cols, cols, 1};
  }
};

namespace detail {

/// Address range [first, last] touched by a view (inclusive); empty views touch nothing.
template <class T, class S>
bool address_range(const MatrixView<T, S>& v, const void*& first, const void*& last) {
  if (v.empty()) return false;
  auto* base = reinterpret_cast<const std::byte*>(v.data());
  index_t lo = 0, hi = 0;
  for (index_t off : {(v.rows() - 1) * v.row_stride(), (v.cols() - 1) * v.col_stride()}) {
    (off < 0 ? lo : hi) += off;
  }
  first = base + lo * index_t(sizeof(T));
  last = base + hi * index_t(sizeof(T)) + index_t(sizeof(T)) - 1;
  return true;
}

/// Do two views share at least one element? Exact for views with a unit stride along the same
/// axis and equal outer strides (column blocks of one matrix, such as per-head splits of a fused
/// QKV weight, are disjoint); otherwise conservative: overlapping address ranges count.
template <class T, class U, class S>
bool views_overlap(const MatrixView<T, S>& a, const MatrixView<U, S>& b) {
  const void *a0, *a1, *b0, *b1;
  if (!address_range(a, a0, a1) || !address_range(b, b0, b1)) return false;
  if (a1 < b0 || b1 < a0) return false;
  if constexpr (!std::is_same_v<std::remove_cv_t<T>, std::remove_cv_t<U>>) {
    return true;
  } else {
    // Normalize both to (outer, inner) with inner stride 1.
    struct Rect {
      index_t outer, inner, stride;
    };
    auto as_rect = [](auto v, bool row_major) {
      return row_major ? Rect{v.rows(), v.cols(), v.row_stride()}
                       : Rect{v.cols(), v.rows(), v.col_stride()};
    };
    bool row_major;
    if (a.col_stride() == 1 && b.col_stride() == 1 && a.row_stride() == b.row_stride())
      row_major = true;
    else if (a.row_stride() == 1 && b.row_stride() == 1 && a.col_stride() == b.col_stride())
      row_major = false;
    else
      return true;
    const Rect ra = as_rect(a, row_major), rb = as_rect(b, row_major);
    const index_t s = ra.stride;
    if (s <= 0 || ra.inner > s || rb.inner > s) return true;
    index_t d = b.data() - reinterpret_cast<const std::remove_cv_t<T>*>(a.data());
    index_t q = d >= 0 ? d / s : -((-d + s - 1) / s);
    index_t r = d - q * s;  // 0 <= r < s
    auto hits = [&](index_t row0, index_t row1, index_t col0, index_t col1) {
      // rows [row0,row1) x cols [col0,col1) of the grid against a's [0,outer) x [0,inner)
      return row0 < ra.outer && row1 > 0 && col0 < ra.inner && col1 > 0 && row0 < row1 &&
             col0 < col1;
    };
    const index_t end = r + rb.inner;
    if (hits(q, q + rb.outer, r, end < s ? end : s)) return true;
    return end > s && hits(q + 1, q + 1 + rb.outer, 0, end - s);
  }
}

}  // namespace detail
}  // namespace muon
