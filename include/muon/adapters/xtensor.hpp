#pragma once
// xtensor arrays with their own memory (xt::xtensor, xt::xarray, xt::adapt of your buffer, any
// layout) viewed in place by muon::view: 2-D with any strides, 1-D as 1 x n, N-D flattened to
// (shape[0], product of the rest) when the trailing dimensions are dense. Needs xtensor
// (Debian: libxtensor-dev); muon itself does not depend on it.
#include <type_traits>
#include <vector>
#include <xtensor/xexpression.hpp>
#include <xtensor/xutils.hpp>

#include "muon/core/adapter.hpp"

namespace muon {

template <class X>
  requires(xt::is_xexpression<X>::value && xt::has_data_interface<X>::value &&
           xt::has_strides<X>::value)
struct TensorAdapter<X> {
  template <class Y>
  static auto view(Y& x) {
    const std::vector<index_t> shape(x.shape().begin(), x.shape().end());
    std::vector<index_t> strides(x.strides().begin(), x.strides().end());
    // xtensor reports stride 0 for extent-1 dimensions; any stride is right for those.
    for (std::size_t k = 0; k < shape.size(); ++k)
      if (shape[k] == 1 && strides[k] == 0) strides[k] = 1;
    return strided_view(x.data() + x.data_offset(), shape, strides, "xtensor array");
  }
};

}  // namespace muon
