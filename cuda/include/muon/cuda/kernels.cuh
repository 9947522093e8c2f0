#pragma once
// The CUDA backend's elementwise and reduction kernels. Every stage is one pass over memory:
// a grid-stride loop over a (rows x cols) index space, applying a functor to the elements of
// up to four strided views at once. Functors are plain structs (no extended lambdas needed).
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "muon/core/backend.hpp"
#include "muon/cuda/backend.hpp"

namespace muon::cuda::detail {

/// A strided matrix as a kernel sees it; `batch` offsets to the b-th matrix of a stack.
template <class T>
struct Strided {
  T* data;
  index_t row_stride, col_stride, batch_stride;
  __device__ T& operator()(index_t b, index_t i, index_t j) const {
    return data[b * batch_stride + i * row_stride + j * col_stride];
  }
};

template <class T, class S>
Strided<T> strided(MatrixView<T, S> v, index_t batch_stride = 0) {
  return {v.data(), v.row_stride(), v.col_stride(), batch_stride};
}

/// Visiting order: along the contiguous axis of the first view, so loads coalesce.
template <class T, class S>
bool column_order(MatrixView<T, S> v) {
  return v.row_stride() == 1 && v.col_stride() != 1 && v.rows() > 1;
}

constexpr int kThreads = 256;

inline unsigned blocks_for(index_t n) {
  const index_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 4096 ? b : 4096);  // grid-stride beyond that
}

/// f(b, i, j, v(b, i, j)...) for every (i, j) of a rows x cols matrix, matrix b = blockIdx.y.
template <class F, class... V>
__global__ void for_each_kernel(index_t rows, index_t cols, bool col_order, F f, V... v) {
  const index_t n = rows * cols, b = blockIdx.y;
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < n;
       idx += index_t(gridDim.x) * blockDim.x) {
    const index_t i = col_order ? idx % rows : idx / cols;
    const index_t j = col_order ? idx / rows : idx % cols;
    f(v(b, i, j)...);
  }
}

template <class F, class... V>
void for_each(cudaStream_t stream, index_t rows, index_t cols, bool col_order, index_t batch,
              F f, V... v) {
  if (rows * cols == 0 || batch == 0) return;
  dim3 grid(blocks_for(rows * cols), static_cast<unsigned>(batch));
  for_each_kernel<<<grid, kThreads, 0, stream>>>(rows, cols, col_order, f, v...);
}

/// out(0, i, 0) = sum over j of f(v(0, i, j)...) in double: block i sums row i, each thread a
/// stride of its columns, then a tree in shared memory.
template <class F, class T, class... V>
__global__ void reduce_rows_kernel(index_t cols, F f, Strided<T> out, V... v) {
  __shared__ double partial[kThreads];
  const index_t i = blockIdx.x;
  double sum = 0;
  for (index_t j = threadIdx.x; j < cols; j += blockDim.x) sum += static_cast<double>(f(v(0, i, j)...));
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out(0, i, 0) = static_cast<T>(partial[0]);
}

template <class F, class T, class... V>
void reduce_rows(cudaStream_t stream, index_t rows, index_t cols, F f, Strided<T> out, V... v) {
  if (rows == 0) return;
  reduce_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(cols, f, out, v...);
}

// ---- functors ---------------------------------------------------------------------------
// Conversions between the scalar types (float, double, bf16, fp16); the 16-bit ones go
// through float, their only exact partner.
template <class S>
__device__ double to_double(S x) {
  if constexpr (std::is_same_v<S, double> || std::is_same_v<S, float>)
    return static_cast<double>(x);
  else
    return static_cast<double>(static_cast<float>(x));
}
template <class D>
__device__ D from_double(double x) {
  if constexpr (std::is_same_v<D, double> || std::is_same_v<D, float>)
    return static_cast<D>(x);
  else
    return static_cast<D>(static_cast<float>(x));
}

struct Copy {
  template <class D, class S>
  __device__ void operator()(D& dst, const S& src) const {
    if constexpr (std::is_same_v<D, S>)
      dst = src;
    else
      dst = from_double<D>(to_double(src));
  }
};

template <class T>
struct Scale {  // beta == 0 overwrites (never 0 * NaN), as BLAS does
  T factor;
  __device__ void operator()(T& x) const { x = factor == T(0) ? T(0) : x * factor; }
};

template <class T>
struct FlushTiny {
  T threshold;
  __device__ void operator()(T& x) const {
    if (fabs(x) < threshold) x = T(0);
  }
};

// ---- norms ------------------------------------------------------------------------------
// Per matrix of a stack: max |x| and the sum of (x / max)^2 into a NormScratch (backend.hpp).
// The sum is taken in a fixed order (per-block partials, then one block per matrix adds them),
// not with atomics, so it is the same bits run to run.
template <class V, class Op>
__device__ V block_reduce(V v, Op op) {  // the result is valid in thread 0
  __shared__ V shared[kThreads / 32];
  for (int off = 16; off > 0; off /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? shared[lane] : V(0);
    for (int off = 16; off > 0; off /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
  }
  return v;
}
struct MaxOp {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a > b ? a : b;
  }
};
struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

template <class T>
__global__ void amax_kernel(index_t rows, index_t cols, bool col_order, Strided<const T> x,
                            NormScratch* out) {
  const index_t n = rows * cols, b = blockIdx.y;
  // The bits of |x| as a double: NaN's order above +inf's, so a NaN wins and propagates.
  unsigned long long m = 0;
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < n;
       idx += index_t(gridDim.x) * blockDim.x) {
    const double a = fabs(static_cast<double>(
        x(b, col_order ? idx % rows : idx / cols, col_order ? idx / rows : idx % cols)));
    const auto bits = static_cast<unsigned long long>(__double_as_longlong(a));
    m = bits > m ? bits : m;
  }
  m = block_reduce(m, MaxOp{});
  if (threadIdx.x == 0) atomicMax(&out[b].amax_bits, m);
}

template <class T>
__global__ void scaled_sum_kernel(index_t rows, index_t cols, bool col_order,
                                  Strided<const T> x, const NormScratch* out, double* partials) {
  const index_t n = rows * cols, b = blockIdx.y;
  const double amax = __longlong_as_double(static_cast<long long>(out[b].amax_bits));
  double s = 0;
  if (amax > 0 && isfinite(amax))
    for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < n;
         idx += index_t(gridDim.x) * blockDim.x) {
      const double v = static_cast<double>(
                           x(b, col_order ? idx % rows : idx / cols, col_order ? idx / rows : idx % cols)) /
                       amax;
      s += v * v;
    }
  s = block_reduce(s, SumOp{});
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = s;
}

/// norms[b].scaled_sum = the sum of matrix b's `blocks` partials, in a fixed order.
static __global__ void sum_partials_kernel(const double* partials, unsigned blocks, NormScratch* out) {
  const index_t b = blockIdx.x;
  double s = 0;
  for (unsigned i = threadIdx.x; i < blocks; i += blockDim.x) s += partials[b * blocks + i];
  s = block_reduce(s, SumOp{});
  if (threadIdx.x == 0) out[b].scaled_sum = s;
}

/// ||x||_F from the scratch; 0, Inf and NaN pass through as Eigen's frobenius_norm does.
__device__ inline double frobenius(const NormScratch& s) {
  const double amax = __longlong_as_double(static_cast<long long>(s.amax_bits));
  if (amax == 0 || !isfinite(amax)) return amax;
  return amax * sqrt(s.scaled_sum);
}

/// dst = src / max(norm_scale ||src||_F, eps), per matrix of a stack, converted to D.
struct Normalize {
  double norm_scale, eps;
  template <class D, class S>
  __device__ void operator()(D& dst, const S& src, const NormScratch& norm) const {
    const double denom = fmax(norm_scale * frobenius(norm), eps);
    const double inverse = 1.0 / denom;  // multiply by a normal reciprocal, else divide
    const double x = to_double(src);
    dst = from_double<D>(inverse >= 2.2250738585072014e-308 ? x * inverse : x / denom);
  }
};

/// The per-matrix norm as a third "view" of for_each: the same scratch entry for every (i, j).
struct NormOf {
  const NormScratch* norms;
  __device__ const NormScratch& operator()(index_t b, index_t, index_t) const { return norms[b]; }
};

template <class T>
__global__ void any_non_finite_kernel(index_t rows, index_t cols, bool col_order,
                                      Strided<const T> x, int* flag) {
  const index_t n = rows * cols;
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < n;
       idx += index_t(gridDim.x) * blockDim.x) {
    const T v = x(0, col_order ? idx % rows : idx / cols, col_order ? idx / rows : idx % cols);
    if (!isfinite(v)) {
      *flag = 1;
      return;
    }
  }
}

/// Copies the lower triangle of each square matrix of a stack onto its upper one.
template <class T>
__global__ void symmetrize_kernel(index_t n, Strided<T> x) {
  const index_t total = n * n, b = blockIdx.y;
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < total;
       idx += index_t(gridDim.x) * blockDim.x) {
    const index_t i = idx / n, j = idx % n;
    if (j > i) x(b, i, j) = x(b, j, i);
  }
}

template <class T, class V>
__global__ void add_diagonal_kernel(index_t n, Strided<T> x, V value) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const index_t b = blockIdx.y;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x)
    x(b, i, i) = static_cast<T>(static_cast<Acc>(x(b, i, i)) + static_cast<Acc>(value));
}


// ---- symmetric products in reduced precision ----------------------------------------------
/// Operand pointers of the lower blocks (i >= j) of C = P R, blocks s x s, for a stack of
/// column-major k x k outputs: P's row panel i (ld k), R's column panel j (or, when R is the
/// transpose of a k x depth matrix, that matrix's row panel j), C's block (i, j). Entry e of
/// the three arrays (out, out + count, out + 2 count) is matrix e / pairs, block e % pairs.
template <class L>
__global__ void block_pointers_kernel(index_t k, index_t s, int blocks, index_t count,
                                      const L* p, index_t p_stride, const L* r, index_t r_stride,
                                      bool r_transposed, L* c, index_t c_stride, void** out) {
  const index_t pairs = index_t(blocks) * (blocks + 1) / 2;
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < count;
       e += index_t(gridDim.x) * blockDim.x) {
    const index_t b = e / pairs;
    index_t t = e % pairs, i = 0;
    while (t > i) t -= ++i;  // the t-th pair (i, j), j <= i, in row order
    const index_t j = t;
    out[e] = const_cast<L*>(p + b * p_stride + i * s);
    out[count + e] = const_cast<L*>(r + b * r_stride + (r_transposed ? j * s : j * s * k));
    out[2 * count + e] = c + b * c_stride + i * s + j * s * k;
  }
}

/// For each column-major k x k matrix of a stack, from its lower triangle only (the upper one
/// is not read): out = alpha out + beta S + gamma I, written to both triangles so the result
/// is exactly symmetric (S symmetric, may be null). A block handles one 32 x 32 lower tile and
/// its mirror image through shared memory, so both the reads and the writes coalesce.
constexpr int kTile = 32;
template <class L>
__global__ void symmetric_from_lower_kernel(index_t k, L* out, const L* s, index_t stride,
                                            float alpha, float beta, float gamma) {
  const index_t ti = blockIdx.y, tj = blockIdx.x;
  if (ti < tj) return;
  __shared__ float tile[kTile][kTile + 1];  // tile[c][r]: element (r, c) of the lower tile
  out += blockIdx.z * stride;
  if (s != nullptr) s += blockIdx.z * stride;
  const int tx = static_cast<int>(threadIdx.x);
  const index_t r = ti * kTile + tx;
  for (int cc = static_cast<int>(threadIdx.y); cc < kTile; cc += static_cast<int>(blockDim.y)) {
    const index_t c = tj * kTile + cc;
    if (r < k && c < k) {
      float v = alpha * static_cast<float>(out[r + c * k]);
      if (s != nullptr) v += beta * static_cast<float>(s[r + c * k]);
      if (r == c) v += gamma;
      tile[cc][tx] = v;
    }
  }
  __syncthreads();
  for (int cc = static_cast<int>(threadIdx.y); cc < kTile; cc += static_cast<int>(blockDim.y)) {
    const index_t c = tj * kTile + cc;
    // On a diagonal tile the upper half takes the lower half's values.
    if (r < k && c < k) out[r + c * k] = L(ti == tj && tx < cc ? tile[tx][cc] : tile[cc][tx]);
    const index_t mr = tj * kTile + tx, mc = ti * kTile + cc;  // the mirror tile
    if (ti != tj && mr < k && mc < k) out[mr + mc * k] = L(tile[tx][cc]);
  }
}

}  // namespace muon::cuda::detail
