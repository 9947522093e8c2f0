#pragma once
// Eigen objects with direct memory access (Matrix, Array, Map, Ref, Block of those; row- or
// column-major; any strides) viewed in place. Expressions such as `A * B` have no memory to
// view: evaluate them into a Matrix first.
#include <Eigen/Core>
#include <type_traits>

#include "muon/core/adapter.hpp"

namespace muon {

template <class X>
  requires std::is_base_of_v<Eigen::DenseBase<X>, X>
struct TensorAdapter<X> {
  template <class Y>
  static auto view(Y& x) {
    static_assert(bool(X::Flags & Eigen::DirectAccessBit),
                  "muon::view: this Eigen expression has no memory of its own (e.g. A * B or "
                  "A.transpose() of a temporary); evaluate it into an Eigen::Matrix first.");
    using Elem = std::remove_pointer_t<decltype(x.data())>;
    return MatrixView<Elem>(x.data(), x.rows(), x.cols(), x.rowStride(), x.colStride());
  }
};

// Blocks, Maps and Refs view memory owned elsewhere: a temporary one (W.block(...)) may be
// registered.
template <class X, int R, int C, bool Inner>
inline constexpr bool is_view_type<Eigen::Block<X, R, C, Inner>> = true;
template <class X, int Options, class Stride>
inline constexpr bool is_view_type<Eigen::Map<X, Options, Stride>> = true;
template <class X, int Options, class Stride>
inline constexpr bool is_view_type<Eigen::Ref<X, Options, Stride>> = true;

}  // namespace muon
