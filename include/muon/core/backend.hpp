#pragma once
// The Backend concept: the short list of operations that Newton–Schulz and the update need.
// A backend owns no parameters; it computes on views in its memory space and owns only the
// buffers it is asked for (optimizer state and NS workspace). Backends: muon::EigenBackend
// (CPU, <muon/backend/eigen.hpp>); your own by providing the members below.
//
// The update rules' mathematics is not here: each rule writes its elementwise stages once, as
// functors (rules/), and every backend runs them through each().
//
// Views passed to gemm/syrk may have any layout; the others may be arbitrarily strided.
// Buffers are dense; view(buf, rows, cols) gives a dense row-major view of one.
#include <concepts>
#include <cstddef>
#include <span>

#include "muon/core/matrix_view.hpp"
#include "muon/core/options.hpp"

namespace muon {

namespace detail {
/// Stand for any stage and any term of a row sum in the concept below (a rule's functors;
/// see core/stage.hpp).
struct AnyStage {
  template <class... E>
  void operator()(E&&...) const {}
};
struct AnyTerm {
  template <class E>
  E operator()(const E& e) const {
    return e;
  }
};
}  // namespace detail

template <class B, class T>
concept Backend = requires(B& b, const B& cb, typename B::template Buffer<T>& buf,
                           MatrixView<T, typename B::memory_space> x,
                           MatrixView<const T, typename B::memory_space> cx, T s, double d,
                           index_t n, T* host, const T* const_host) {
  typename B::memory_space;
  // storage
  b.resize(buf, n);
  { b.view(buf, n, n) } -> std::same_as<MatrixView<T, typename B::memory_space>>;
  b.copy_to_host(cx, host);          // dense row-major on the host side
  b.copy_from_host(const_host, x);
  // BLAS-3. gemm: C = alpha A B + beta C.  syrk: lower triangle of C = alpha A A^T + beta C.
  // symm: C = alpha A B + beta C, A symmetric, read from its lower triangle.
  // symmetrize: copy the lower triangle of square C onto the upper one.
  b.gemm(s, cx, cx, s, x);
  b.syrk(s, cx, s, x);
  b.symm(s, cx, cx, s, x);
  b.symmetrize(x);
  // elementwise
  b.copy(cx, x);
  b.add_diagonal(x, s);
  b.scale(x, s);         // x *= s
  b.flush_tiny(x, s);    // entries with |x| < threshold become 0
  b.normalize(x, d, d);  // x /= max(scale * ||x||_F, eps), overflow-safe
  { b.all_finite(cx) } -> std::same_as<bool>;
  // the generic elementwise primitive: a rule's stage f on corresponding elements of
  // same-shape views (core/stage.hpp says what f may receive)
  b.each(detail::AnyStage{}, x, cx, x);
  // the generic reduction: out(i, 0) = sum over j of f(v(i, j)...) for a rows x 1 `out`,
  // summed in double, in an order that depends on the shape only
  b.reduce_rows(detail::AnyTerm{}, x, cx);
};

/// Optional: several finiteness scans with one verdict (on a GPU one device flag and one host
/// read for all of them). The optimizers scan all gradients this way when a backend has it,
/// and call all_finite() once per parameter otherwise.
template <class B, class T>
concept ScansFiniteTogether = requires(B& b, MatrixView<const T, typename B::memory_space> cx) {
  b.begin_finite_scan();
  b.scan_finite(cx);
  { b.end_finite_scan() } -> std::same_as<bool>;
};

/// Optional: independent tasks side by side on the backend's workers, each one's products
/// single-threaded (on the CPU, a threaded BLAS wastes most of its threads on small matrices).
/// workers() is fixed for the backend's life; side_by_side(n, f) calls f(i, worker) once for
/// each i < n, worker in [0, workers()), and returns when all are done; side_by_side_fits says
/// which matrices gain from it. The optimizers run Newton-Schulz this way where a backend can.
template <class B>
concept RunsSideBySide = requires(B& b, index_t n, void (*task)(std::size_t, int)) {
  { b.workers() } -> std::convertible_to<int>;
  { b.side_by_side_fits(n, n) } -> std::same_as<bool>;
  b.side_by_side(std::size_t{1}, task);
};

/// Optional: Newton-Schulz on a stack of `batch` same-shape matrices in one call (matrix b at
/// in + b * in_stride, its result at out + b * out_stride), with the schedule, normalization
/// and method of NewtonSchulzOptions. The optimizers run each group's same-shape matrices
/// this way where a backend can (CudaBackend: strided-batched cuBLAS products, for float).
template <class B, class T>
concept RunsBatched = requires(B& b, MatrixView<const T, typename B::memory_space> in,
                               MatrixView<T, typename B::memory_space> out, index_t n,
                               std::span<const Coefficients> schedule, double d,
                               NewtonSchulzMethod method) {
  b.newton_schulz_stack(in, n, out, n, n, schedule, d, d, method);
};

/// float and double. Other element types (complex, integers) are refused with this message.
template <class T>
concept SupportedScalar = std::same_as<T, float> || std::same_as<T, double>;

}  // namespace muon
