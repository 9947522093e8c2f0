#pragma once
// muon::cuda::CudaBackend: the Backend concept on an NVIDIA GPU, with cuBLAS for the products
// and the kernels of kernels.cuh for every elementwise stage. This header is host C++: a .cpp
// file compiled by g++ or clang includes it and links muon::cuda, whose library holds the
// member templates compiled for float and double (and the float <-> bf16/fp16 copies of
// MasterWeights). A .cu file may include backend.cuh instead, which adds their definitions,
// for other instantiations. Parameters, gradients and state
// live in device memory (MatrixView<T, DeviceSpace>: a pointer from PyTorch, CuPy or your own
// allocator, viewed without a copy).
//
//   muon::cuda::CudaBackend gpu;                        // its own stream and cuBLAS handle
//   muon::cuda::CudaBackend gpu(stream, handle);        // borrowed: yours, never destroyed
//   muon::Optimizer<muon::cuda::CudaBackend, float> opt(defaults, {}, gpu);
//
// Everything is enqueued on one stream: step() never synchronizes with the host (except the
// NaN/Inf check of NonFinitePolicy::error/skip, which must read a flag) and allocates nothing
// after the first step, so with NonFinitePolicy::unchecked a whole step can be captured in a
// CUDA graph. Scalars (lr, momentum, coefficients) are passed by value: a captured graph
// replays the values it was captured with.
//
// Precision of Newton-Schulz for float parameters (CudaOptions::newton_schulz): native fp32,
// tf32 (cuBLAS's TF32 tensor-op mode), or bf16 / fp16 storage with fp32 accumulation
// (cublasGemmEx). Double always runs in fp64.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/error.hpp"
#include "muon/core/options.hpp"
#include "muon/core/schedule.hpp"

namespace muon::cuda {

namespace detail {
/// Per matrix of a stack: max |x| (as the bits of a non-negative double, which order like
/// unsigned integers, so atomicMax works: a maximum does not depend on the order) and the sum
/// of (x / max)^2 -- the overflow-safe Frobenius norm, amax * sqrt(sum), without a host round
/// trip (kernels.cuh reduces them).
struct NormScratch {
  unsigned long long amax_bits;
  double scaled_sum;
};
}  // namespace detail

inline void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess)
    throw Error(std::string("muon: CUDA: ") + what + " failed: " + cudaGetErrorString(rc));
}
inline void check(cublasStatus_t rc, const char* what) {
  if (rc != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("muon: cuBLAS: ") + what + " failed: " + cublasGetStatusString(rc));
}

/// Whether a CUDA device is visible (the CUDA tests skip without one).
inline bool device_available() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  (void)cudaGetLastError();  // clear the error a machine without a driver leaves behind
  return ok;
}

/// Storage precision of the Newton-Schulz products for float matrices.
enum class Precision { native, tf32, bf16, fp16 };

inline const char* to_string(Precision p) {
  switch (p) {
    case Precision::native: return "native";
    case Precision::tf32: return "tf32";
    case Precision::bf16: return "bf16";
    case Precision::fp16: return "fp16";
  }
  return "?";
}

struct CudaOptions {
  Precision newton_schulz = Precision::native;
  /// bf16 / fp16 Newton-Schulz: a product known to be symmetric (X X^T, A A, and the Gram
  /// form's products of commuting matrices) is computed as the lower blocks of an nb x nb
  /// grid only, nb(nb + 1)/2 of nb^2 GEMMs in one batched call, then mirrored. 1 (the
  /// default) multiplies whole matrices; 0 picks nb from the size (blocks of 512 or more).
  /// nb is used only where it splits k into blocks of a multiple of 64. Experimental: compiled
  /// and covered by the GPU tests, not yet run on a GPU (docs/cuda.md).
  int symmetric_blocks = 1;
};

/// A dense device allocation (cudaMalloc), zero-filled by resize. Move-only.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }

  /// n zeros; the old contents are dropped. Allocates (and may synchronize): not for step().
  void resize_zero(std::size_t n, cudaStream_t stream) {
    if (n != size_) {
      T* fresh = nullptr;
      if (n > 0) check(cudaMalloc(&fresh, n * sizeof(T)), "cudaMalloc");
      release();
      data_ = fresh;
      size_ = n;
    }
    if (n > 0) check(cudaMemsetAsync(data_, 0, n * sizeof(T), stream), "cudaMemsetAsync");
  }

 private:
  void release() noexcept {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

class CudaBackend {
 public:
  using memory_space = DeviceSpace;
  template <class T>
  using Buffer = DeviceBuffer<T>;

  /// A stream and cuBLAS handle of its own on the current device.
  explicit CudaBackend(CudaOptions options = {}) : ctx_(std::make_shared<Context>()), options_(options) {
    validate(options);
    check(cudaStreamCreateWithFlags(&ctx_->stream, cudaStreamNonBlocking), "cudaStreamCreate");
    ctx_->owns_stream = true;
    check(cublasCreate(&ctx_->handle), "cublasCreate");
    ctx_->owns_handle = true;
    ctx_->init();
  }
  /// The caller's stream and cuBLAS handle, borrowed (never destroyed). The handle's stream
  /// is set to `stream` for each product.
  CudaBackend(cudaStream_t stream, cublasHandle_t handle, CudaOptions options = {})
      : ctx_(std::make_shared<Context>()), options_(options) {
    validate(options);
    if (handle == nullptr) throw InvalidArgument("muon: CudaBackend: the cuBLAS handle is null");
    ctx_->stream = stream;
    ctx_->handle = handle;
    ctx_->init();
  }

  [[nodiscard]] cudaStream_t stream() const noexcept { return ctx_->stream; }
  [[nodiscard]] cublasHandle_t handle() const noexcept { return ctx_->handle; }
  [[nodiscard]] const CudaOptions& options() const noexcept { return options_; }
  void synchronize() const { check(cudaStreamSynchronize(ctx_->stream), "cudaStreamSynchronize"); }

  // ---- storage ---------------------------------------------------------------------------
  template <class T>
  void resize(Buffer<T>& buf, index_t n) const {
    buf.resize_zero(static_cast<std::size_t>(n), ctx_->stream);
  }
  template <class T>
  MatrixView<T, DeviceSpace> view(Buffer<T>& buf, index_t rows, index_t cols) const {
    return row_major_view<DeviceSpace>(buf.data(), rows, cols);
  }
  /// Dense row-major host memory from/to any device view; synchronizes (state files only).
  template <class T>
  void copy_to_host(MatrixView<const T, DeviceSpace> src, T* dst) const;
  template <class T>
  void copy_from_host(const T* src, MatrixView<T, DeviceSpace> dst) const;

  // ---- BLAS-3 on cuBLAS (column-major: a row-major view is the transpose of one) -----------
  template <class T>
  void gemm(T alpha, MatrixView<const T, DeviceSpace> a, MatrixView<const T, DeviceSpace> b,
            T beta, MatrixView<T, DeviceSpace> c) const;

  template <class T>
  void syrk(T alpha, MatrixView<const T, DeviceSpace> a, T beta,
            MatrixView<T, DeviceSpace> c) const;

  template <class T>
  void symm(T alpha, MatrixView<const T, DeviceSpace> a, MatrixView<const T, DeviceSpace> b,
            T beta, MatrixView<T, DeviceSpace> c) const;

  template <class T>
  void symmetrize(MatrixView<T, DeviceSpace> c) const;

  // ---- elementwise -----------------------------------------------------------------------
  template <class S, class D>
  void copy(MatrixView<const S, DeviceSpace> src, MatrixView<D, DeviceSpace> dst) const;
  template <class T>
  void add_diagonal(MatrixView<T, DeviceSpace> x, T value) const;
  template <class T>
  void scale(MatrixView<T, DeviceSpace> x, T factor) const;
  template <class T>
  void flush_tiny(MatrixView<T, DeviceSpace> x, T threshold) const;
  /// x /= max(norm_scale ||x||_F, eps): the norm is reduced on the device and read there.
  template <class T>
  void normalize(MatrixView<T, DeviceSpace> x, double norm_scale, double eps) const;
  /// The unit roundoff of the Newton-Schulz products for T, which the Gram form's restart plan
  /// needs: TF32 tensor-op math keeps 10 of float's 23 mantissa bits.
  template <class T>
  [[nodiscard]] double product_unit_roundoff() const noexcept {
    if (std::is_same_v<T, float> && options_.newton_schulz == Precision::tf32) return 0x1p-11;
    return std::numeric_limits<T>::epsilon() / 2;
  }

  /// Synchronizes (a flag must reach the host); NonFinitePolicy::unchecked skips the call.
  template <class T>
  bool all_finite(MatrixView<const T, DeviceSpace> x) const;
  /// Several scans, one verdict: one device flag that every scan may set, and one host read
  /// (a synchronization) in end_finite_scan(). The optimizer checks all gradients this way.
  void begin_finite_scan() const {
    check(cudaMemsetAsync(ctx_->flag, 0, sizeof(int), ctx_->stream), "cudaMemsetAsync");
  }
  template <class T>
  void scan_finite(MatrixView<const T, DeviceSpace> x) const;
  [[nodiscard]] bool end_finite_scan() const {
    check(cudaMemcpyAsync(ctx_->host_flag, ctx_->flag, sizeof(int), cudaMemcpyDeviceToHost,
                          ctx_->stream),
          "cudaMemcpyAsync");
    synchronize();
    return *ctx_->host_flag == 0;
  }
  /// The generic elementwise primitive: f on corresponding elements of same-shape views, one
  /// thread an element, in the order the first view stores them (loads coalesce). Defined in
  /// backend.cuh: host C++ calls the instantiations muon::cuda's library holds, which are the
  /// stages of every rule in rules::All (backend.cu).
  template <class F, class... Views>
  void each(F f, Views... views) const;
  /// The generic reduction: out(i, 0) = the sum over j of f(v(i, j)...), in double, one
  /// thread block a row (backend.cuh; instantiated for every rule in rules::All as each is).
  template <class F, class Out, class... Views>
  void reduce_rows(F f, Out out, Views... views) const;

  // ---- Newton-Schulz in bf16 / fp16 ------------------------------------------------------
  // The hooks NewtonSchulzWorkspace calls (muon::detail::RunsOwnNewtonSchulz). The reduced
  // precision iteration keeps its buffers in the backend: the workspace holds no scratch.
  template <class T>
  using NewtonSchulzScratch = std::tuple<>;
  /// Whether float matrices run in bf16 or fp16 (CudaOptions::newton_schulz).
  [[nodiscard]] bool reduced_precision_newton_schulz() const {
    return options_.newton_schulz == Precision::bf16 || options_.newton_schulz == Precision::fp16;
  }
  /// Nothing to size (the buffers are the backend's); says whether this backend runs the
  /// iteration of a T matrix itself.
  template <class T>
  bool reserve_newton_schulz(NewtonSchulzScratch<T>&, index_t, index_t, NewtonSchulzMethod) const {
    return std::is_same_v<T, float> && reduced_precision_newton_schulz();
  }
  /// Runs the whole iteration in reduced precision on a k x n (k <= n) float matrix when
  /// CudaOptions::newton_schulz asks for bf16 or fp16, and returns the view holding the
  /// result; otherwise nothing (the generic fp32/fp64 code runs).
  template <class T>
  std::optional<MatrixView<T, DeviceSpace>> try_newton_schulz(
      NewtonSchulzScratch<T>& scratch, MatrixView<T, DeviceSpace> x, MatrixView<T, DeviceSpace> y,
      MatrixView<T, DeviceSpace> a, MatrixView<T, DeviceSpace> b,
      std::span<const Coefficients> schedule, double norm_scale, double eps,
      NewtonSchulzMethod method) const;

  /// Orthogonalizes a stack of `batch` same-shape float matrices (mixture-of-experts weights,
  /// per-head splits): matrix b is `in` offset by b * in_stride elements, its result goes to
  /// `out` offset by b * out_stride. Any shape and layout (m > n runs on the transpose).
  /// Storage precision `precision` (fp32, TF32 products, or bf16 / fp16 storage; products
  /// accumulate in fp32 on strided-batched cublasGemmEx). `method`: NewtonSchulzMethod::gram
  /// runs the Gram form with the restarts its drift needs in that precision
  /// (lowp_gram_newton_schulz); experimental, not yet run on a GPU. `automatic` runs the
  /// standard loop here until the batched Gram form has been measured. The workspace grows on
  /// first use and is kept.
  /// The optimizers' batched Newton-Schulz (RunsBatched): newton_schulz_batched in the
  /// precision of CudaOptions::newton_schulz.
  void newton_schulz_stack(MatrixView<const float, DeviceSpace> in, index_t in_stride,
                           MatrixView<float, DeviceSpace> out, index_t out_stride, index_t batch,
                           std::span<const Coefficients> schedule, double norm_scale, double eps,
                           NewtonSchulzMethod method) const {
    newton_schulz_batched(in, in_stride, out, out_stride, batch, schedule, norm_scale, eps,
                          options_.newton_schulz, method);
  }

  void newton_schulz_batched(MatrixView<const float, DeviceSpace> in, index_t in_stride,
                             MatrixView<float, DeviceSpace> out, index_t out_stride,
                             index_t batch, std::span<const Coefficients> schedule,
                             double norm_scale, double eps, Precision precision,
                             NewtonSchulzMethod method = NewtonSchulzMethod::standard) const;

 private:
  static void validate(const CudaOptions& o) {
    if (o.symmetric_blocks < 0)
      throw InvalidArgument("muon: CudaOptions::symmetric_blocks must be >= 0 (0 = by size), got " +
                            std::to_string(o.symmetric_blocks));
  }

  struct Context {
    cudaStream_t stream = nullptr;
    cublasHandle_t handle = nullptr;
    bool owns_stream = false, owns_handle = false;
    int* flag = nullptr;       // device: all_finite's verdict
    int* host_flag = nullptr;  // pinned host copy of it
    DeviceBuffer<detail::NormScratch> norms;
    DeviceBuffer<double> norm_partials;  // per-block sums of squares, added in a fixed order
    DeviceBuffer<std::byte> lowp;  // reduced-precision Newton-Schulz workspace
    DeviceBuffer<void*> blocks;    // operand pointers of the blocked symmetric products

    void init() {
      check(cudaMalloc(&flag, sizeof(int)), "cudaMalloc");
      check(cudaMallocHost(&host_flag, sizeof(int)), "cudaMallocHost");
      norms.resize_zero(1, stream);
    }
    Context() = default;
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;
    ~Context() {
      if (stream != nullptr) cudaStreamSynchronize(stream);
      if (flag != nullptr) cudaFree(flag);
      if (host_flag != nullptr) cudaFreeHost(host_flag);
      if (owns_handle) cublasDestroy(handle);
      if (owns_stream) cudaStreamDestroy(stream);
    }
  };

  struct Operand {
    cublasOperation_t op;
    int ld;
  };
  static int blas(index_t v) {
    if (v > index_t(std::numeric_limits<int>::max()))
      throw InvalidArgument("muon: CudaBackend: extent " + std::to_string(v) +
                            " exceeds cuBLAS's 32-bit int");
    return static_cast<int>(v);
  }
  /// The view as a column-major cuBLAS operand: itself (N) when its columns are contiguous,
  /// else the transpose of its column-major storage (T). A single row or column has no real
  /// leading dimension; it gets a valid one (>= max(1, rows)), since cuBLAS rejects ld < rows.
  template <class T>
  static Operand operand(MatrixView<T, DeviceSpace> v, const char* what) {
    const auto need = [](index_t e) { return std::max<index_t>(1, e); };
    if (v.row_stride() == 1 || v.rows() <= 1) {
      const index_t ld = v.cols() <= 1 ? need(v.rows()) : v.col_stride();
      if (ld >= need(v.rows())) return {CUBLAS_OP_N, blas(ld)};
    }
    if (v.col_stride() == 1 || v.cols() <= 1) {
      const index_t ld = v.rows() <= 1 ? need(v.cols()) : v.row_stride();
      if (ld >= need(v.cols())) return {CUBLAS_OP_T, blas(ld)};
    }
    throw InvalidArgument(std::string("muon: CudaBackend: the ") + what + " (" +
                          muon::detail::shape_string(v.rows(), v.cols()) + ", strides " +
                          std::to_string(v.row_stride()) + ", " + std::to_string(v.col_stride()) +
                          ") is neither row- nor column-major; cuBLAS cannot read it");
  }

  /// TF32 tensor-op math on the handle for the duration of one float product, if asked for.
  struct MathMode {
    MathMode(const CudaBackend& b, bool is_float)
        : handle(b.ctx_->handle), active(is_float && b.options_.newton_schulz == Precision::tf32) {
      if (!active) return;
      check(cublasGetMathMode(handle, &saved), "cublasGetMathMode");
      check(cublasSetMathMode(handle, CUBLAS_TF32_TENSOR_OP_MATH), "cublasSetMathMode");
    }
    ~MathMode() {
      if (active) cublasSetMathMode(handle, saved);
    }
    MathMode(const MathMode&) = delete;
    MathMode& operator=(const MathMode&) = delete;
    cublasHandle_t handle;
    bool active;
    cublasMath_t saved = CUBLAS_DEFAULT_MATH;
  };

  void bind() const { check(cublasSetStream(ctx_->handle, ctx_->stream), "cublasSetStream"); }
  void launched(const char* what) const { check(cudaGetLastError(), what); }

  template <class T>
  void blas_gemm(cublasOperation_t ta, cublasOperation_t tb, index_t m, index_t n, index_t k,
                 T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c, int ldc) const {
    bind();
    if constexpr (std::is_same_v<T, float>)
      check(cublasSgemm(ctx_->handle, ta, tb, blas(m), blas(n), blas(k), &alpha, a, lda, b, ldb,
                        &beta, c, ldc),
            "cublasSgemm");
    else
      check(cublasDgemm(ctx_->handle, ta, tb, blas(m), blas(n), blas(k), &alpha, a, lda, b, ldb,
                        &beta, c, ldc),
            "cublasDgemm");
  }

  template <class T>
  const T* dense_source(MatrixView<const T, DeviceSpace> src, Buffer<T>& scratch) const;

  /// out_b = in_b / max(norm_scale ||in_b||_F, eps) for a stack; D may be a 16-bit type.
  template <class S, class D>
  void normalize_batched(MatrixView<const S, DeviceSpace> in, index_t in_stride,
                         MatrixView<D, DeviceSpace> out, index_t out_stride, index_t batch,
                         double norm_scale, double eps) const;

  /// One reduced-precision Newton-Schulz run on a stack of `batch` k x n matrices (k <= n),
  /// each stored column-major (ld k) in the workspace: X, Y (k x n) and k x k matrices.
  struct LowpRun {
    cudaDataType_t type;
    index_t k, n, batch, blocks;
    cublasComputeType_t compute;  // fp32 accumulation; TF32 tensor ops for Precision::tf32
    double unit_roundoff;         // of the products, for the Gram form's restart plan
  };

  /// The symmetric-block count for k (CudaOptions::symmetric_blocks).
  index_t symmetric_blocks(index_t k) const {
    const auto fits = [k](index_t nb) { return k % nb == 0 && (k / nb) % 64 == 0; };
    if (options_.symmetric_blocks > 0)
      return fits(options_.symmetric_blocks) ? options_.symmetric_blocks : 1;
    for (index_t nb : {8, 4, 2})
      if (fits(nb) && k / nb >= 512) return nb;
    return 1;
  }

  /// C = alpha A op(B) + beta C on each matrix of the stacks (column-major, ld = rows).
  template <class L>
  void lowp_gemm(const LowpRun& run, cublasOperation_t tb, index_t m, index_t nn, index_t depth,
                 const L* a, index_t sa, const L* b, index_t ldb, index_t sb, L* c, index_t sc,
                 float alpha = 1, float beta = 0) const;

  /// out = alpha P R + beta S + gamma I for a product P R known to be symmetric: X X^T
  /// (P = X, R = X^T: r_transposed, depth n) or a product of commuting symmetric k x k
  /// matrices (depth k). Only the lower blocks are multiplied; the kernel mirrors them.
  template <class L>
  void lowp_symmetric(const LowpRun& run, const L* p, const L* r, bool r_transposed, L* out,
                      float alpha = 1, const L* s = nullptr, float beta = 0,
                      float gamma = 0) const;

  /// B = c A A + b A + a I from A (symmetric), into `out`. Unblocked, as measured on the H100:
  /// B = A, then B = c A A + b B in one GEMM, then the diagonal.
  template <class L>
  void lowp_polynomial(const LowpRun& run, const Coefficients& p, const L* a, L* out) const;

  /// Newton-Schulz on stacks of k x n matrices, k <= n, stored in L (bf16 or fp16):
  ///   X = G / ||G||;  per (a, b, c):  A = X X^T;  B = c A A + b A + a I;  X = B X
  /// (the reference loop of Jordan et al.; folding a I into B makes X = a X + B X one product),
  /// or its Gram form (lowp_gram_newton_schulz). The result is cast back into `out`.
  template <class L>
  void lowp_newton_schulz(MatrixView<const float, DeviceSpace> in, index_t in_stride,
                          MatrixView<float, DeviceSpace> out, index_t out_stride, index_t batch,
                          std::span<const Coefficients> schedule, double norm_scale, double eps,
                          cudaDataType_t type, cublasComputeType_t compute, double unit_roundoff,
                          bool gram) const;

  /// The Gram form (algorithm/newton_schulz.hpp) in half precision: with R = X_0 X_0^T and
  /// every B_t a polynomial in it, X_T = Q X_0 for Q = B_T ... B_1, and R_{t+1} = B_t R_t B_t.
  /// Every k x k product is symmetric (its factors commute), so all of them run blocked.
  /// The iterated R drifts (spurious negative eigenvalues multiplied by about a_t^2 a step), so
  /// it restarts (X <- Q X, R <- X X^T, Q <- I) where GramRestartPlan says for the storage's unit
  /// roundoff: in bf16 before every step (then it is the standard loop), in fp16 every second.
  /// Dao-AILab's gram-newton-schulz (Zhang, Amsel, Chen, Dao 2026) restarts at a fixed step.
  /// Returns the result: x or y.
  template <class L>
  L* lowp_gram_newton_schulz(const LowpRun& run, std::span<const Coefficients> schedule, L* x,
                               L* y, L* r, L* b, L* w, L* q) const;

  std::shared_ptr<Context> ctx_;
  CudaOptions options_;
};

}  // namespace muon::cuda
