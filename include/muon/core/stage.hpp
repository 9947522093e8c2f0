#pragma once
// Elementwise stages: a rule's per-element mathematics written once, as a functor, and run by
// every backend through its one generic primitive, backend.each(f, views...), which calls f on
// corresponding elements of same-shape views. A backend chooses what f receives:
//   - single elements (T& or const T&): CudaBackend, one thread per element;
//   - blocks of elements as array expressions (Eigen::Map of an Array): EigenBackend, so that
//     one stage is one vectorized pass.
// So a stage's body uses only what both have: =, +=, *=, +, -, *, / with its scalar
// coefficients, and the helpers below, never ?: between two values or a branch on an element.
// Its coefficients are fixed in its constructor, in the element type, in the order the rule's
// reference implementation rounds them; a coefficient that an earlier stage computes is read
// through a pointer into the backend's memory (so a GPU step never waits on a host read).
#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#define MUON_HOST_DEVICE __host__ __device__
#else
#define MUON_HOST_DEVICE
#endif

namespace muon::stage {

/// dst = lerp(a, b, weight) in torch.lerp's two-sided form (a + w (b - a) for w < 0.5, else
/// b - (1 - w)(b - a)), so float runs round as torch's optimizers do. dst may alias a or b.
template <class D, class A, class B, class T>
MUON_HOST_DEVICE void assign_lerp(D&& dst, const A& a, const B& b, T weight) {
  if (weight < T(0.5))
    dst = a + weight * (b - a);
  else
    dst = b - (T(1) - weight) * (b - a);
}

/// The correctly rounded square root of an element or of each element of a block: never a
/// vectorized estimate (Eigen's fast-math packet sqrt can differ by an ulp), so a result does
/// not depend on alignment, strides or the backend.
template <class X>
MUON_HOST_DEVICE auto sqrt(const X& x) {
  if constexpr (std::is_floating_point_v<X>) {
#if defined(__CUDA_ARCH__)
    return ::sqrt(x);
#else
    return std::sqrt(x);
#endif
  } else {
    return x.unaryExpr([](auto e) { return std::sqrt(e); });
  }
}

/// The larger of an element (or of each element of a block) and a bound, as the element
/// type: max(x, bound) with a NaN x kept.
template <class X>
MUON_HOST_DEVICE auto max(const X& x, double bound) {
  if constexpr (std::is_floating_point_v<X>) {
    return x < static_cast<X>(bound) ? static_cast<X>(bound) : x;
  } else {
    using E = typename X::Scalar;
    return x.unaryExpr([b = static_cast<E>(bound)](E e) { return e < b ? b : e; });
  }
}

/// The sign of an element or of each element of a block: 1, -1, or the value itself for 0,
/// -0 and NaN (torch.sign's results).
template <class E>
MUON_HOST_DEVICE E sign_of(E e) {
  return e > E(0) ? E(1) : e < E(0) ? E(-1) : e;
}
template <class X>
MUON_HOST_DEVICE auto sign(const X& x) {
  if constexpr (std::is_floating_point_v<X>)
    return sign_of(x);
  else
    return x.unaryExpr([](auto e) { return sign_of(e); });
}

/// Terms of backend.reduce_rows(): each element, or its square.
struct Identity {
  template <class X>
  MUON_HOST_DEVICE auto operator()(const X& x) const {
    return x;
  }
};
struct Square {
  template <class X>
  MUON_HOST_DEVICE auto operator()(const X& x) const {
    return x * x;
  }
};

/// Cautious weight decay (L. Chen et al. 2025, arXiv:2510.12402), on an element or on each
/// element of a block: w - (w coeff) where the update u and w agree in sign (w u >= 0), w
/// where they do not, rounded as microsoft/dion's cautious_wd rounds it.
template <class E>
MUON_HOST_DEVICE E cautious_decay_of(E w, E u, E coeff) {
  return w * u >= E(0) ? w - w * coeff : w;
}
template <class W, class U, class T>
MUON_HOST_DEVICE auto cautious_decay(const W& w, const U& u, T coeff) {
  if constexpr (std::is_floating_point_v<W>)
    return cautious_decay_of(w, static_cast<W>(u), static_cast<W>(coeff));
  else
    return w.binaryExpr(u, [coeff](auto x, auto y) { return cautious_decay_of(x, y, decltype(x)(coeff)); });
}

}  // namespace muon::stage
