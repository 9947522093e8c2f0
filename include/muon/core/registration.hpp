#pragma once
// Parameter registration shared by muon::Optimizer and muon::ShardedOptimizer: the ids, add()
// for any rule, its short forms add_muon / add_adamw (views, N-D tensors, adapted types, expert stacks and split
// matrices) and the checks on a new parameter. `params` is the list registered so far; its elements have name, shape, value, grad
// and has_grad members.
#include <algorithm>
#include <concepts>
#include <type_traits>
#include <utility>
#include <cstdint>
#include <string>
#include <vector>

#include "muon/core/adapter.hpp"
#include "muon/core/error.hpp"
#include "muon/core/matrix_view.hpp"
#include "muon/core/parts.hpp"

namespace muon {

struct GroupId {
  std::size_t value = 0;
};
struct ParamId {
  std::size_t value = 0;
};
enum class UpdateRule : std::uint8_t { muon = 0, adamw = 1 };

/// A rule's policy object (muon::rules::Muon, ::AdamW, ...) as registration sees it: its id,
/// and whether it orthogonalizes (which forms of parameter it takes).
template <class R>
concept RulePolicy = requires {
  { R::id } -> std::convertible_to<UpdateRule>;
  { R::orthogonalizes } -> std::convertible_to<bool>;
};

}  // namespace muon

namespace muon::detail {

/// The view of an adapted parameter, checked at compile time against the optimizer's types.
template <class T, class Space, class P>
MatrixView<T, Space> as_param(P& param) {
  auto v = muon::view(param);
  using Elem = typename decltype(v)::element_type;
  static_assert(!std::is_const_v<Elem>,
                "muon: a parameter must be mutable, but this is a view of const elements");
  static_assert(std::is_same_v<Elem, T>,
                "muon: the parameter's element type differs from the optimizer's Scalar");
  static_assert(std::is_same_v<typename decltype(v)::memory_space, Space>,
                "muon: the parameter lives in another memory space than the backend's");
  return v;
}
template <class T, class Space, class G>
MatrixView<const T, Space> as_grad(const G& grad) {
  auto v = muon::view(grad);
  static_assert(std::is_same_v<std::remove_const_t<typename decltype(v)::element_type>, T>,
                "muon: the gradient's element type differs from the optimizer's Scalar");
  return v;
}

inline std::string describe_param(const std::string& name, const std::vector<index_t>& shape) {
  return "muon: parameter '" + name + "' (" + shape_string(shape) + ")";
}

template <class T, class Space>
std::string describe_strides(MatrixView<T, Space> v) {
  return shape_string(v.rows(), v.cols()) + " with strides " + std::to_string(v.row_stride()) +
         ", " + std::to_string(v.col_stride());
}

/// Shape match, no null data, and no memory shared with a parameter (other than `self`).
template <class Params, class T, class Space>
void check_grad(const Params& params, const std::string& name, const std::vector<index_t>& shape,
                MatrixView<T, Space> value, MatrixView<const T, Space> grad, std::size_t self) {
  using ConstView = MatrixView<const T, Space>;
  const std::string what = describe_param(name, shape);
  if (!fits_address_space(grad))
    throw InvalidArgument(what + ": the gradient's view (" + describe_strides(grad) +
                          ") spans more than the address space");
  if (grad.rows() != value.rows() || grad.cols() != value.cols())
    throw InvalidArgument(what + ": gradient has shape " + shape_string(grad.rows(), grad.cols()) +
                          ", expected " + shape_string(value.rows(), value.cols()));
  if (!grad.empty() && grad.data() == nullptr)
    throw InvalidArgument(what + ": gradient data pointer is null");
  if (views_overlap(grad, ConstView(value)))
    throw InvalidArgument(what + ": gradient shares memory with the parameter itself");
  for (std::size_t i = 0; i < params.size(); ++i)
    if (i != self && views_overlap(grad, ConstView(params[i].value)))
      throw InvalidArgument(what + ": gradient shares memory with parameter '" + params[i].name +
                            "', which step() writes");
}

/// A new parameter: a unique non-empty name, no negative extent, data present, and no memory
/// shared with any registered parameter or gradient.
template <class Params, class T, class Space>
void check_new_param(const Params& params, const std::string& name,
                     const std::vector<index_t>& shape, MatrixView<T, Space> value,
                     MatrixView<const T, Space> grad) {
  using ConstView = MatrixView<const T, Space>;
  if (name.empty()) throw InvalidArgument("muon: parameter name must not be empty");
  const std::string what = describe_param(name, shape);
  for (index_t e : shape)
    if (e < 0) throw InvalidArgument(what + ": negative extent");
  if (!value.empty() && value.data() == nullptr)
    throw InvalidArgument(what + ": parameter data pointer is null");
  if (!fits_address_space(value))
    throw InvalidArgument(what + ": the parameter's view (" + describe_strides(value) +
                          ") spans more than the address space");
  if (!elements_distinct(value))
    throw InvalidArgument(what + ": the parameter's view (" + describe_strides(value) +
                          ") reaches some elements twice, so step() would write them twice; "
                          "give it strides that keep its rows and columns apart");
  if (std::any_of(params.begin(), params.end(), [&](const auto& p) { return p.name == name; }))
    throw InvalidArgument(what + ": a parameter named '" + name + "' is already registered");
  for (const auto& p : params) {
    if (views_overlap(ConstView(value), ConstView(p.value)))
      throw InvalidArgument(what + ": shares memory with parameter '" + p.name + "' (" +
                            shape_string(p.shape) + "); is the same parameter registered twice?");
    if (p.has_grad && views_overlap(ConstView(value), p.grad))
      throw InvalidArgument(what + ": shares memory with the gradient of '" + p.name + "'");
  }
  check_grad(params, name, shape, value, grad, params.size());
}

/// The registration overloads of an optimizer; Derived provides
///   template <UpdateRule Id> void use_rule(): readies (and so compiles) rule Id's step
///   ParamId add_param(std::string name, UpdateRule, std::vector<index_t> shape, View, ConstView,
///               GroupId, std::vector<Part> matrices)
/// (befriending this class) and does the common checks there with check_new_param.
template <class Derived, class T, class Space>
class Registrar {
 public:
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;
  /// Adapted types, except the View and ConstView pair the overloads above take as they are
  /// (which the adapted overloads forward to).
  template <class P, class G>
  static constexpr bool Adapted =
      ViewableMatrix<std::remove_reference_t<P>> && ViewableMatrix<std::remove_reference_t<G>> &&
      !(std::is_same_v<std::remove_cvref_t<P>, View> && std::is_same_v<std::remove_cvref_t<G>, ConstView>);

  /// A parameter of any rule, by its policy object: opt.add(muon::rules::Muon{}, name, W, G),
  /// or any other rule of muon::rules::All. An orthogonalizing rule takes what add_muon takes
  /// (a matrix, an N-D weight, a Split or Experts after the gradient), an elementwise rule what
  /// add_adamw takes; views, TensorViews and adapted types alike.
  template <RulePolicy Rule, class P, class G, class... Layout>
  ParamId add(Rule, std::string name, P&& param, G&& grad, Layout&&... layout_and_group) {
    return add_as<Rule::id, Rule::orthogonalizes>(std::move(name), std::forward<P>(param),
                                                  std::forward<G>(grad),
                                                  std::forward<Layout>(layout_and_group)...);
  }

  // The short forms of the two rules every model uses.
  /// A weight matrix updated by Muon.
  ParamId add_muon(std::string name, View param, ConstView grad, GroupId group = {}) {
    return matrix<UpdateRule::muon>(std::move(name), param, grad, group);
  }
  /// A fused weight matrix (QKV rows, attention heads) whose blocks along split.axis Muon
  /// orthogonalizes and scales as matrices of their own.
  ParamId add_muon(std::string name, View param, ConstView grad, const Split& split,
                   GroupId group = {}) {
    return matrix<UpdateRule::muon>(std::move(name), param, grad, split, group);
  }
  /// A stack of experts (E x m x n seen flattened as E x (m n)): E matrices of m x n, one
  /// momentum buffer and one state record.
  ParamId add_muon(std::string name, View param, ConstView grad, Experts experts,
                   GroupId group = {}) {
    return matrix<UpdateRule::muon>(std::move(name), param, grad, experts, group);
  }
  /// An N-D weight (N >= 2, dense row-major, e.g. a conv kernel out x in x kh x kw), updated
  /// by Muon as the (shape[0], product of the rest) matrix.
  ParamId add_muon(std::string name, TensorView<T, Space> param, TensorView<const T, Space> grad,
                   GroupId group = {}) {
    return matrix<UpdateRule::muon>(std::move(name), param, grad, group);
  }
  /// An expert stack E x m x n (x ...): E matrices of m x (product of the rest).
  ParamId add_muon(std::string name, TensorView<T, Space> param, TensorView<const T, Space> grad,
                   Experts experts, GroupId group = {}) {
    return matrix<UpdateRule::muon>(std::move(name), param, grad, experts, group);
  }
  /// A parameter updated by AdamW (any shape; vectors are 1 x n or n x 1 views).
  ParamId add_adamw(std::string name, View param, ConstView grad, GroupId group = {}) {
    return elementwise<UpdateRule::adamw>(std::move(name), param, grad, group);
  }
  ParamId add_adamw(std::string name, TensorView<T, Space> param,
                    TensorView<const T, Space> grad, GroupId group = {}) {
    return elementwise<UpdateRule::adamw>(std::move(name), param, grad, group);
  }
  /// Any adapted tensor types (Eigen objects, your own through muon::view), optionally with
  /// a Split or Experts. Named objects, or temporaries that only view memory owned elsewhere
  /// (W.block(...), an Eigen::Map).
  template <class P, class G, class... Layout>
    requires Adapted<P, G>
  ParamId add_muon(std::string name, P&& param, G&& grad, Layout&&... layout_and_group) {
    return add_as<UpdateRule::muon, true>(std::move(name), std::forward<P>(param),
                                          std::forward<G>(grad),
                                          std::forward<Layout>(layout_and_group)...);
  }
  template <class P, class G>
    requires Adapted<P, G>
  ParamId add_adamw(std::string name, P&& param, G&& grad, GroupId group = {}) {
    return add_as<UpdateRule::adamw, false>(std::move(name), std::forward<P>(param),
                                            std::forward<G>(grad), group);
  }

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  /// add_param, after the optimizer has readied (and so compiled) the step of rule Id.
  template <UpdateRule Id>
  ParamId add_with_rule(std::string name, std::vector<index_t> shape, View param, ConstView grad,
                        GroupId group, const std::vector<Part>& parts) {
    self().template use_rule<Id>();
    return self().add_param(std::move(name), Id, std::move(shape), param, grad, group, parts);
  }

  // ---- one registration path per kind of rule, the rule's id given ------------------------
  template <UpdateRule Id>
  ParamId matrix(std::string name, View param, ConstView grad, GroupId group = {}) {
    return add_with_rule<Id>(std::move(name), {param.rows(), param.cols()}, param, grad,
                             group, whole(param.rows(), param.cols()));
  }
  template <UpdateRule Id>
  ParamId matrix(std::string name, View param, ConstView grad, const Split& split,
                 GroupId group = {}) {
    return add_with_rule<Id>(name, {param.rows(), param.cols()}, param, grad, group,
                             detail::split(param.rows(), param.cols(), split,
                                           describe_param(name, {param.rows(), param.cols()})));
  }
  template <UpdateRule Id>
  ParamId matrix(std::string name, View param, ConstView grad, Experts experts,
                 GroupId group = {}) {
    return add_experts<Id>(std::move(name), {param.rows(), param.cols()}, param, grad,
                           experts.rows, group);
  }
  template <UpdateRule Id>
  ParamId matrix(std::string name, TensorView<T, Space> param,
                 TensorView<const T, Space> grad, GroupId group = {}) {
    check_tensor(name, param, grad, 2);
    const View flat = param.flattened();
    return add_with_rule<Id>(std::move(name), param.shape, flat, grad.flattened(), group,
                             whole(flat.rows(), flat.cols()));
  }
  template <UpdateRule Id>
  ParamId matrix(std::string name, TensorView<T, Space> param,
                 TensorView<const T, Space> grad, Experts experts, GroupId group = {}) {
    check_tensor(name, param, grad, 3);
    if (experts.rows == 0) experts.rows = param.shape[1];
    return add_experts<Id>(std::move(name), param.shape, param.flattened(), grad.flattened(),
                           experts.rows, group);
  }
  template <UpdateRule Id>
  ParamId elementwise(std::string name, View param, ConstView grad, GroupId group = {}) {
    return add_with_rule<Id>(std::move(name), {param.rows(), param.cols()}, param, grad,
                             group, {});
  }
  template <UpdateRule Id>
  ParamId elementwise(std::string name, TensorView<T, Space> param,
                      TensorView<const T, Space> grad, GroupId group = {}) {
    check_tensor(name, param, grad, 0);
    return add_with_rule<Id>(std::move(name), param.shape, param.flattened(),
                             grad.flattened(), group, {});
  }
  /// Either kind, from views or adapted types (checked for lifetimes and watched).
  template <UpdateRule Id, bool Orthogonalizes, class P, class G, class... Layout>
  ParamId add_as(std::string name, P&& param, G&& grad, Layout&&... layout_and_group) {
    const auto place = [&](auto&& p, auto&& g) {
      if constexpr (Orthogonalizes)
        return matrix<Id>(std::move(name), p, g, std::forward<Layout>(layout_and_group)...);
      else
        return elementwise<Id>(std::move(name), p, g, std::forward<Layout>(layout_and_group)...);
    };
    if constexpr (Adapted<P, G>) {
      check_lifetimes<P, G>();
      const ParamId id = place(as_param<T, Space>(param), as_grad<T, Space>(grad));
      watch<P, G>(id, param, grad);
      return id;
    } else {
      return place(std::forward<P>(param), std::forward<G>(grad));
    }
  }
  template <class P, class G>
  static constexpr void check_lifetimes() {
    static_assert(std::is_lvalue_reference_v<P> || is_view_type<std::remove_cvref_t<P>>,
                  "muon: this parameter is a temporary that owns its memory, which would be freed "
                  "while the optimizer still updates it: register a named object (or a block or "
                  "Map of one)");
    static_assert(std::is_lvalue_reference_v<G> || is_view_type<std::remove_cvref_t<G>>,
                  "muon: this gradient is a temporary that owns its memory, which would be freed "
                  "while the optimizer still reads it: register a named object (or a block or "
                  "Map of one)");
  }
  /// Named objects are handed to the optimizer's storage watch (OptimizerOptions::watch_storage).
  template <class P, class G>
  void watch(ParamId id, const std::remove_reference_t<P>& param,
             const std::remove_reference_t<G>& grad) {
    if constexpr (std::is_lvalue_reference_v<P>)
      self().watch_object(id, false, &param, &data_of<std::remove_reference_t<P>>);
    if constexpr (std::is_lvalue_reference_v<G>)
      self().watch_object(id, true, &grad, &data_of<std::remove_reference_t<G>>);
  }
  /// The memory an adapted object holds now (X keeps the constness it was registered with).
  template <class X>
  static const void* data_of(const void* object) {
    return muon::view(*static_cast<X*>(const_cast<void*>(object))).data();
  }
  static void check_tensor(const std::string& name, const TensorView<T, Space>& param,
                           const TensorView<const T, Space>& grad, std::size_t min_dims) {
    if (grad.shape != param.shape)
      throw InvalidArgument(describe_param(name, param.shape) + ": gradient has shape " +
                            shape_string(grad.shape));
    if (param.shape.size() < min_dims)
      throw InvalidArgument(describe_param(name, param.shape) + " has fewer than " +
                            std::to_string(min_dims) + " dimensions; " +
                            (min_dims == 2 ? "Muon is for matrices, route it to AdamW with "
                                             "add_adamw()"
                                           : "an expert stack is experts x rows x cols"));
  }
  template <UpdateRule Id>
  ParamId add_experts(std::string name, std::vector<index_t> shape, View param,
                      ConstView grad, index_t rows, GroupId group) {
    std::vector<Part> parts =
        experts(param.rows(), param.cols(), rows, describe_param(name, shape));
    return add_with_rule<Id>(std::move(name), std::move(shape), param, grad, group,
                             std::move(parts));
  }
};

}  // namespace muon::detail
