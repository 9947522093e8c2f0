#pragma once
// LibTorch tensors viewed in place. A torch::Tensor's element type and device are known only at
// run time, so the view is asked for with the element type and checked:
//
//   opt.add_muon("fc1.weight", muon::libtorch::param<float>(fc1->weight),
//                muon::libtorch::grad<float>(fc1->weight));
//
// The optimizer keeps these views, so the gradient's storage must outlive them. Autograd
// accumulates into an existing .grad() in place; grad() creates it (zeros) if backward() has
// not run yet. Clear gradients with zero_grad(/*set_to_none=*/false) or grad().zero_(): setting
// them to None (the default of zero_grad in LibTorch 2.x) makes backward() allocate new ones,
// which a view cannot see; muon::libtorch::Muon (libtorch_optimizer.hpp) follows them.
// Needs LibTorch (Debian: libtorch-dev); muon itself does not depend on it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/ScalarType.h>
#include <string>
#include <type_traits>
#include <vector>

#include "muon/core/matrix_view.hpp"

namespace muon::libtorch {

/// A view of `t` as Muon sees it (2-D with any strides, 1-D as 1 x n, N-D flattened to
/// (size(0), numel / size(0)) when dense in its trailing dimensions). T may be const.
template <class T, class Space = HostSpace>
MatrixView<T, Space> view(const at::Tensor& t, const std::string& what = "tensor") {
  using Element = std::remove_const_t<T>;
  static_assert(std::is_same_v<Element, float> || std::is_same_v<Element, double>,
                "muon::libtorch::view: T must be float or double");
  if (!t.defined()) throw InvalidArgument("muon: " + what + " is an undefined tensor");
  const auto expected = c10::CppTypeToScalarType<Element>::value;
  if (t.scalar_type() != expected)
    throw InvalidArgument("muon: " + what + " has dtype " +
                          std::string(c10::toString(t.scalar_type())) + ", expected " +
                          c10::toString(expected));
  const bool on_device = std::is_same_v<Space, DeviceSpace>;
  if (on_device ? !t.is_cuda() : !t.is_cpu())
    throw InvalidArgument("muon: " + what + " is on " + t.device().str() + ", expected " +
                          (on_device ? "a CUDA device" : "the CPU"));
  const std::vector<index_t> shape(t.sizes().begin(), t.sizes().end());
  const std::vector<index_t> strides(t.strides().begin(), t.strides().end());
  return strided_view<Space>(static_cast<T*>(t.data_ptr()), shape, strides, what);
}

/// A parameter's data, for the optimizer to update in place.
template <class T, class Space = HostSpace>
MatrixView<T, Space> param(const at::Tensor& p) {
  return view<T, Space>(p, "parameter");
}

/// A parameter's gradient, created as zeros if autograd has not made it yet.
template <class T, class Space = HostSpace>
MatrixView<const T, Space> grad(const at::Tensor& p) {
  if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
  return view<const T, Space>(p.grad(), "gradient");
}

}  // namespace muon::libtorch
