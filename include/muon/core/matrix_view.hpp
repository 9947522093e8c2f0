#pragma once
// Non-owning views of matrices that live in someone else's memory (an Eigen matrix, a LibTorch
// tensor, a CUDA allocation). A view is a pointer, two extents and two strides counted in
// elements, so row-major, column-major, transposed and strided sub-blocks are all the same type
// and nothing is ever copied to look at them. The memory space is part of the type: a host
// backend cannot be handed device memory by mistake.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <type_traits>
#include <utility>
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

// Offsets of views near the address space's size, without overflow (a GNU extension of g++ and
// clang; __extension__ keeps -Wpedantic quiet about it).
__extension__ typedef __int128 wide_t;  // NOLINT(modernize-use-using): using cannot take __extension__

inline wide_t floor_div(wide_t a, wide_t b) {
  const wide_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
inline wide_t ceil_div(wide_t a, wide_t b) { return -floor_div(-a, b); }
inline wide_t gcd_wide(wide_t a, wide_t b) {
  if (a < 0) a = -a;
  if (b < 0) b = -b;
  while (b != 0) a = std::exchange(b, a % b);
  return a;
}

/// Is there an integer pair (x, y) with x * p + y * q == d, x in [x0, x1], y in [y0, y1]?
/// (Offsets of two elements of equally strided views differ by such a combination.)
inline bool lattice_hits(wide_t p, wide_t q, wide_t d, wide_t x0, wide_t x1, wide_t y0, wide_t y1) {
  if (x0 > x1 || y0 > y1) return false;
  if (p == 0 && q == 0) return d == 0;
  if (p == 0) return d % q == 0 && d / q >= y0 && d / q <= y1;
  if (q == 0) return d % p == 0 && d / p >= x0 && d / p <= x1;
  // Extended Euclid: u p + v q = g; then x = u d/g + k q/g, y = v d/g - k p/g for every k.
  wide_t r0 = p, r1 = q, u0 = 1, u1 = 0, v0 = 0, v1 = 1;
  while (r1 != 0) {
    const wide_t t = r0 / r1;
    r0 = std::exchange(r1, r0 - t * r1);
    u0 = std::exchange(u1, u0 - t * u1);
    v0 = std::exchange(v1, v0 - t * v1);
  }
  const wide_t g = r0;  // may be negative; the formulas hold with it as it is
  if (d % g != 0) return false;
  const wide_t x = u0 * (d / g), y = v0 * (d / g), sx = q / g, sy = -(p / g);
  // The k with lo <= base + k step <= hi, as [k0, k1].
  const auto range = [](wide_t base, wide_t step, wide_t lo, wide_t hi) {
    return step > 0 ? std::pair{ceil_div(lo - base, step), floor_div(hi - base, step)}
                    : std::pair{ceil_div(hi - base, step), floor_div(lo - base, step)};
  };
  const auto [kx0, kx1] = range(x, sx, x0, x1);
  const auto [ky0, ky1] = range(y, sy, y0, y1);
  return std::max(kx0, ky0) <= std::min(kx1, ky1);
}

/// Whether the view's elements are at distinct addresses, so writing through it never writes
/// one element twice (rows with row_stride 0, or rows shorter than the row stride spans, are
/// not). Exact for any strides.
template <class T, class S>
bool elements_distinct(const MatrixView<T, S>& v) {
  if (v.rows() <= 1 || v.cols() <= 1)
    return v.size() <= 1 || (v.rows() <= 1 ? v.col_stride() != 0 : v.row_stride() != 0);
  // (i, j) and (i', j') collide iff (i - i') rs + (j - j') cs = 0 for some nonzero pair.
  const wide_t rs = v.row_stride(), cs = v.col_stride();
  if (rs == 0 || cs == 0) return false;
  const wide_t g = gcd_wide(rs, cs);
  return !(((cs < 0 ? -cs : cs) / g < v.rows()) && ((rs < 0 ? -rs : rs) / g < v.cols()));
}

/// Whether the view's extents and strides stay inside the address space: the element count and
/// the byte span between its first and last element fit in a ptrdiff_t.
template <class T, class S>
bool fits_address_space(const MatrixView<T, S>& v) {
  constexpr wide_t kMax = std::numeric_limits<index_t>::max();
  if (v.rows() < 0 || v.cols() < 0) return false;
  if (v.empty()) return true;
  const auto abs = [](wide_t x) { return x < 0 ? -x : x; };
  const wide_t span = (wide_t(v.rows()) - 1) * abs(v.row_stride()) +
                      (wide_t(v.cols()) - 1) * abs(v.col_stride()) + 1;
  return wide_t(v.rows()) * v.cols() <= kMax && span * wide_t(sizeof(T)) <= kMax;
}

/// Do two views share at least one element? Exact for views with the same strides and element
/// type (blocks of one matrix, per-head splits of a fused weight, interleaved columns);
/// otherwise conservative: overlapping address ranges count.
template <class T, class U, class S>
bool views_overlap(const MatrixView<T, S>& a, const MatrixView<U, S>& b) {
  const void *a0, *a1, *b0, *b1;
  if (!address_range(a, a0, a1) || !address_range(b, b0, b1)) return false;
  if (a1 < b0 || b1 < a0) return false;
  if constexpr (!std::is_same_v<std::remove_cv_t<T>, std::remove_cv_t<U>>) {
    return true;
  } else {
    if (a.row_stride() != b.row_stride() || a.col_stride() != b.col_stride()) return true;
    const auto bytes = reinterpret_cast<const std::byte*>(b.data()) -
                       reinterpret_cast<const std::byte*>(a.data());
    if (bytes % static_cast<std::ptrdiff_t>(sizeof(T)) != 0) return true;  // misaligned: unknown
    // a(i, j) == b(i', j') iff (i - i') rs + (j - j') cs == d.
    return lattice_hits(a.row_stride(), a.col_stride(), bytes / static_cast<std::ptrdiff_t>(sizeof(T)),
                        -(wide_t(b.rows()) - 1), wide_t(a.rows()) - 1,
                        -(wide_t(b.cols()) - 1), wide_t(a.cols()) - 1);
  }
}

}  // namespace detail
}  // namespace muon
