#pragma once
// How foreign tensor types become MatrixViews, without copies.
//
// muon::view(x) looks, in order, for
//   1. x already being a MatrixView;
//   2. a specialization muon::TensorAdapter<X> with `static auto view(X&)` (for types you do
//      not own, e.g. a third-party tensor);
//   3. a free function `muon_view(X&)` found by argument-dependent lookup in X's namespace
//      (for your own types).
// Either must return a MatrixView<T, Space> (const T for read-only data). A const object gives
// a view of const elements, which step() accepts as a gradient but never as a parameter.
#include <type_traits>
#include <utility>

#include "muon/core/matrix_view.hpp"

namespace muon {

/// Specialize for a type you do not own: `static MatrixView<T, Space> view(X& x)`.
template <class X>
struct TensorAdapter;

namespace detail {

template <class X>
struct is_matrix_view : std::false_type {};
template <class T, class S>
struct is_matrix_view<MatrixView<T, S>> : std::true_type {};

template <class>
inline constexpr bool dependent_false = false;

void muon_view() = delete;  // makes the unqualified call below an ADL-only lookup

template <class X>
concept Adaptable =
    is_matrix_view<std::remove_cvref_t<X>>::value ||
    requires(X& x) { TensorAdapter<std::remove_cvref_t<X>>::view(x); } ||
    requires(X& x) { muon_view(x); };

struct ViewFn {
  template <class X>
    requires Adaptable<X>
  constexpr auto operator()(X&& x) const {
    using Bare = std::remove_cvref_t<X>;
    if constexpr (is_matrix_view<Bare>::value) {
      return Bare(x);
    } else if constexpr (requires { TensorAdapter<Bare>::view(x); }) {
      return TensorAdapter<Bare>::view(x);
    } else {
      return muon_view(x);
    }
  }
  // Chosen only for types without an adapter, to say what to do instead of a wall of errors.
  template <class X>
    requires(!Adaptable<X>)
  void operator()(X&&) const {
    static_assert(dependent_false<X>,
                  "muon::view: this type has no adapter. Define `muon_view(T&)` returning a "
                  "muon::MatrixView in T's namespace, or specialize muon::TensorAdapter<T>. "
                  "For Eigen types include <muon/adapters/eigen.hpp>.");
  }
};

}  // namespace detail

/// Non-owning MatrixView of any adapted tensor type (see the file comment).
inline constexpr detail::ViewFn view{};

/// Whether X only looks at memory it does not own (a MatrixView, an Eigen Block, Map or Ref),
/// so that a temporary X may be registered: the memory outlives it. Adapters of such types
/// specialize it; a temporary of any other type is refused at compile time, since the view
/// would outlive the memory.
template <class X>
inline constexpr bool is_view_type = detail::is_matrix_view<X>::value;

/// Types muon::view accepts.
template <class X>
concept ViewableMatrix = detail::Adaptable<X>;

}  // namespace muon
