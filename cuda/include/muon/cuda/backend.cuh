#pragma once
// muon::cuda::CudaBackend: the Backend concept on an NVIDIA GPU, with cuBLAS for the products
// and the kernels of kernels.cuh for every elementwise stage. Parameters, gradients and state
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
#include <type_traits>
#include <utility>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/algorithm/schedule.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/error.hpp"
#include "muon/core/options.hpp"
#include "muon/cuda/kernels.cuh"

namespace muon::cuda {

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
  void copy_to_host(MatrixView<const T, DeviceSpace> src, T* dst) const {
    if (src.empty()) return;
    Buffer<T> dense;
    const T* from = dense_source(src, dense);
    check(cudaMemcpyAsync(dst, from, src.size() * sizeof(T), cudaMemcpyDeviceToHost, ctx_->stream),
          "cudaMemcpyAsync");
    synchronize();
  }
  template <class T>
  void copy_from_host(const T* src, MatrixView<T, DeviceSpace> dst) const {
    if (dst.empty()) return;
    Buffer<T> dense;
    resize(dense, dst.size());
    check(cudaMemcpyAsync(dense.data(), src, dst.size() * sizeof(T), cudaMemcpyHostToDevice,
                          ctx_->stream),
          "cudaMemcpyAsync");
    copy(MatrixView<const T, DeviceSpace>(view(dense, dst.rows(), dst.cols())), dst);
    synchronize();  // before `dense` is freed and the caller reuses `src`
  }

  // ---- BLAS-3 on cuBLAS (column-major: a row-major view is the transpose of one) -----------
  template <class T>
  void gemm(T alpha, MatrixView<const T, DeviceSpace> a, MatrixView<const T, DeviceSpace> b,
            T beta, MatrixView<T, DeviceSpace> c) const {
    if (c.empty()) return;
    const Operand oc = operand(c, "gemm output");
    if (oc.op == CUBLAS_OP_T)  // row-major C: C^T = B^T A^T
      return gemm(alpha, b.transposed(), a.transposed(), beta, c.transposed());
    if (a.cols() == 0) return scale(c, beta);
    const Operand oa = operand(a, "gemm operand A"), ob = operand(b, "gemm operand B");
    MathMode mode(*this, std::is_same_v<T, float>);
    blas_gemm(oa.op, ob.op, c.rows(), c.cols(), a.cols(), alpha, a.data(), oa.ld, b.data(),
              ob.ld, beta, c.data(), oc.ld);
  }

  template <class T>
  void syrk(T alpha, MatrixView<const T, DeviceSpace> a, T beta,
            MatrixView<T, DeviceSpace> c) const {
    if (c.empty()) return;
    if (a.cols() == 0) return scale(c, beta);
    const Operand oc = operand(c, "syrk output"), oa = operand(a, "syrk operand");
    // The lower triangle of a row-major C is the upper one of the column-major C^T (= C).
    const cublasFillMode_t uplo = oc.op == CUBLAS_OP_N ? CUBLAS_FILL_MODE_LOWER : CUBLAS_FILL_MODE_UPPER;
    MathMode mode(*this, std::is_same_v<T, float>);
    bind();
    if constexpr (std::is_same_v<T, float>)
      check(cublasSsyrk(ctx_->handle, uplo, oa.op, blas(c.rows()), blas(a.cols()), &alpha,
                        a.data(), oa.ld, &beta, c.data(), oc.ld),
            "cublasSsyrk");
    else
      check(cublasDsyrk(ctx_->handle, uplo, oa.op, blas(c.rows()), blas(a.cols()), &alpha,
                        a.data(), oa.ld, &beta, c.data(), oc.ld),
            "cublasDsyrk");
  }

  template <class T>
  void symm(T alpha, MatrixView<const T, DeviceSpace> a, MatrixView<const T, DeviceSpace> b,
            T beta, MatrixView<T, DeviceSpace> c) const {
    if (c.empty()) return;
    if (a.cols() == 0) return scale(c, beta);
    const Operand oa = operand(a, "symm operand A"), ob = operand(b, "symm operand B"),
                  oc = operand(c, "symm output");
    if (ob.op != oc.op)
      throw InvalidArgument("muon: CudaBackend::symm: B and C must share a layout (both row- "
                            "or both column-major)");
    const cublasFillMode_t uplo = oa.op == CUBLAS_OP_N ? CUBLAS_FILL_MODE_LOWER : CUBLAS_FILL_MODE_UPPER;
    // Column-major C: C = A B (left). Row-major C: C^T = B^T A (right), A symmetric.
    const bool left = oc.op == CUBLAS_OP_N;
    const cublasSideMode_t side = left ? CUBLAS_SIDE_LEFT : CUBLAS_SIDE_RIGHT;
    const int m = blas(left ? c.rows() : c.cols()), n = blas(left ? c.cols() : c.rows());
    MathMode mode(*this, std::is_same_v<T, float>);
    bind();
    if constexpr (std::is_same_v<T, float>)
      check(cublasSsymm(ctx_->handle, side, uplo, m, n, &alpha, a.data(), oa.ld, b.data(), ob.ld,
                        &beta, c.data(), oc.ld),
            "cublasSsymm");
    else
      check(cublasDsymm(ctx_->handle, side, uplo, m, n, &alpha, a.data(), oa.ld, b.data(), ob.ld,
                        &beta, c.data(), oc.ld),
            "cublasDsymm");
  }

  template <class T>
  void symmetrize(MatrixView<T, DeviceSpace> c) const {
    if (c.empty()) return;
    detail::symmetrize_kernel<<<detail::blocks_for(c.size()), detail::kThreads, 0, ctx_->stream>>>(
        c.rows(), detail::strided(c));
    launched("symmetrize");
  }

  // ---- elementwise -----------------------------------------------------------------------
  template <class S, class D>
  void copy(MatrixView<const S, DeviceSpace> src, MatrixView<D, DeviceSpace> dst) const {
    each(dst, detail::Copy{}, dst, src);
  }
  template <class T>
  void add_diagonal(MatrixView<T, DeviceSpace> x, T value) const {
    const index_t n = std::min(x.rows(), x.cols());
    if (n == 0) return;
    detail::add_diagonal_kernel<<<detail::blocks_for(n), detail::kThreads, 0, ctx_->stream>>>(
        n, detail::strided(x), value);
    launched("add_diagonal");
  }
  template <class T>
  void scale(MatrixView<T, DeviceSpace> x, T factor) const {
    each(x, detail::Scale<T>{factor}, x);
  }
  template <class T>
  void flush_tiny(MatrixView<T, DeviceSpace> x, T threshold) const {
    each(x, detail::FlushTiny<T>{threshold}, x);
  }
  /// x /= max(norm_scale ||x||_F, eps): the norm is reduced on the device and read there.
  template <class T>
  void normalize(MatrixView<T, DeviceSpace> x, double norm_scale, double eps) const {
    normalize_batched(MatrixView<const T, DeviceSpace>(x), 0, x, 0, 1, norm_scale, eps);
  }
  /// The unit roundoff of the Newton-Schulz products for T, which the Gram form's restart plan
  /// needs: TF32 tensor-op math keeps 10 of float's 23 mantissa bits.
  template <class T>
  [[nodiscard]] double product_unit_roundoff() const noexcept {
    if (std::is_same_v<T, float> && options_.newton_schulz == Precision::tf32) return 0x1p-11;
    return std::numeric_limits<T>::epsilon() / 2;
  }

  /// Synchronizes (a flag must reach the host); NonFinitePolicy::unchecked skips the call.
  template <class T>
  bool all_finite(MatrixView<const T, DeviceSpace> x) const {
    if (x.empty()) return true;
    begin_finite_scan();
    scan_finite(x);
    return end_finite_scan();
  }
  /// Several scans, one verdict: one device flag that every scan may set, and one host read
  /// (a synchronization) in end_finite_scan(). The optimizer checks all gradients this way.
  void begin_finite_scan() const {
    check(cudaMemsetAsync(ctx_->flag, 0, sizeof(int), ctx_->stream), "cudaMemsetAsync");
  }
  template <class T>
  void scan_finite(MatrixView<const T, DeviceSpace> x) const {
    if (x.empty()) return;
    detail::any_non_finite_kernel<<<detail::blocks_for(x.size()), detail::kThreads, 0, ctx_->stream>>>(
        x.rows(), x.cols(), detail::column_order(x), detail::strided(x), ctx_->flag);
    launched("scan_finite");
  }
  [[nodiscard]] bool end_finite_scan() const {
    check(cudaMemcpyAsync(ctx_->host_flag, ctx_->flag, sizeof(int), cudaMemcpyDeviceToHost,
                          ctx_->stream),
          "cudaMemcpyAsync");
    synchronize();
    return *ctx_->host_flag == 0;
  }
  template <class T>
  void momentum(MatrixView<T, DeviceSpace> m, MatrixView<const T, DeviceSpace> g,
                MatrixView<T, DeviceSpace> u, const MomentumStep& s) const {
    each(m,
         detail::Momentum<T>{static_cast<T>(s.momentum), static_cast<T>(1 - s.momentum),
                             s.form == MomentumForm::ema, s.nesterov},
         m, g, u);
  }
  template <class T>
  void apply_update(MatrixView<T, DeviceSpace> w, MatrixView<const T, DeviceSpace> o,
                    double decay, double alpha) const {
    each(w, detail::ApplyUpdate<T>{static_cast<T>(decay), static_cast<T>(alpha)}, w, o);
  }
  template <class T>
  void adamw(MatrixView<T, DeviceSpace> w, MatrixView<const T, DeviceSpace> g,
             MatrixView<T, DeviceSpace> m, MatrixView<T, DeviceSpace> v, const AdamWStep& s) const {
    each(w,
         detail::AdamW<T>{static_cast<T>(s.decay), static_cast<T>(1 - s.beta1),
                          static_cast<T>(s.beta2), static_cast<T>(1 - s.beta2),
                          static_cast<T>(s.eps), static_cast<T>(s.step_size),
                          static_cast<T>(s.sqrt_bias2)},
         w, g, m, v);
  }

  // ---- Newton-Schulz in bf16 / fp16 ------------------------------------------------------
  /// The hook NewtonSchulzWorkspace calls: runs the whole iteration in reduced precision on a
  /// k x n (k <= n) float matrix when CudaOptions::newton_schulz asks for bf16 or fp16, and
  /// returns the view holding the result; otherwise nothing (the generic fp32/fp64 code runs).
  template <class T>
  std::optional<MatrixView<T, DeviceSpace>> try_newton_schulz(
      MatrixView<T, DeviceSpace> x, MatrixView<T, DeviceSpace> y,
      std::span<const Coefficients> schedule, double norm_scale, double eps,
      NewtonSchulzMethod method) const {
    if constexpr (std::is_same_v<T, float>) {
      if (options_.newton_schulz == Precision::bf16 || options_.newton_schulz == Precision::fp16) {
        newton_schulz_batched(MatrixView<const float, DeviceSpace>(x), 0, y, 0, 1, schedule,
                              norm_scale, eps, options_.newton_schulz, method);
        return y;
      }
    }
    return std::nullopt;
  }

  /// Orthogonalizes a stack of `batch` same-shape float matrices (mixture-of-experts weights,
  /// per-head splits): matrix b is `in` offset by b * in_stride elements, its result goes to
  /// `out` offset by b * out_stride. Any shape and layout (m > n runs on the transpose).
  /// Storage precision `precision` (bf16 or fp16; products accumulate in fp32 on batched
  /// cublasGemmEx). `method`: NewtonSchulzMethod::gram runs the Gram form with the restarts
  /// its drift needs in 16 bits (lowp_gram_newton_schulz);
  /// experimental, not yet run on a GPU. `automatic` runs the standard loop here until the
  /// 16-bit Gram form has been measured. The workspace grows on first use and is kept.
  void newton_schulz_batched(MatrixView<const float, DeviceSpace> in, index_t in_stride,
                             MatrixView<float, DeviceSpace> out, index_t out_stride,
                             index_t batch, std::span<const Coefficients> schedule,
                             double norm_scale, double eps, Precision precision,
                             NewtonSchulzMethod method = NewtonSchulzMethod::standard) const {
    if (in.rows() != out.rows() || in.cols() != out.cols())
      throw InvalidArgument("muon: newton_schulz_batched: output shape " +
                            muon::detail::shape_string(out.rows(), out.cols()) +
                            " differs from input shape " +
                            muon::detail::shape_string(in.rows(), in.cols()));
    if (batch < 0)
      throw InvalidArgument("muon: newton_schulz_batched: batch " + std::to_string(batch) +
                            " is negative");
    if (in.empty() || batch == 0) return;
    if (in.rows() > in.cols())  // iterate on the short side
      return newton_schulz_batched(in.transposed(), in_stride, out.transposed(), out_stride,
                                   batch, schedule, norm_scale, eps, precision, method);
    const bool gram = method == NewtonSchulzMethod::gram;
    switch (precision) {
      case Precision::bf16:
        return lowp_newton_schulz<__nv_bfloat16>(in, in_stride, out, out_stride, batch,
                                                 schedule, norm_scale, eps, CUDA_R_16BF, gram);
      case Precision::fp16:
        return lowp_newton_schulz<__half>(in, in_stride, out, out_stride, batch, schedule,
                                          norm_scale, eps, CUDA_R_16F, gram);
      default:
        throw InvalidArgument(std::string("muon: newton_schulz_batched: precision ") +
                              to_string(precision) + " is not bf16 or fp16");
    }
  }

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

  /// f over the elements of `shape`'s index space, in the order its layout stores them.
  template <class V, class F, class... Views>
  void each(V shape, F f, Views... views) const {
    detail::for_each(ctx_->stream, shape.rows(), shape.cols(), detail::column_order(shape), 1, f,
                     detail::strided(views)...);
    launched("elementwise kernel");
  }

  template <class T>
  const T* dense_source(MatrixView<const T, DeviceSpace> src, Buffer<T>& scratch) const {
    if (src.is_row_major_contiguous()) return src.data();
    resize(scratch, src.size());
    copy(src, view(scratch, src.rows(), src.cols()));
    return scratch.data();
  }

  /// out_b = in_b / max(norm_scale ||in_b||_F, eps) for a stack; D may be a 16-bit type.
  template <class S, class D>
  void normalize_batched(MatrixView<const S, DeviceSpace> in, index_t in_stride,
                         MatrixView<D, DeviceSpace> out, index_t out_stride, index_t batch,
                         double norm_scale, double eps) const {
    if (in.empty() || batch == 0) return;
    if (ctx_->norms.size() < static_cast<std::size_t>(batch))
      ctx_->norms.resize_zero(static_cast<std::size_t>(batch), ctx_->stream);
    detail::NormScratch* norms = ctx_->norms.data();
    check(cudaMemsetAsync(norms, 0, batch * sizeof(detail::NormScratch), ctx_->stream),
          "cudaMemsetAsync");
    const bool order = detail::column_order(in);
    const dim3 grid(detail::blocks_for(in.size()), static_cast<unsigned>(batch));
    detail::amax_kernel<<<grid, detail::kThreads, 0, ctx_->stream>>>(
        in.rows(), in.cols(), order, detail::strided(in, in_stride), norms);
    const std::size_t partials = static_cast<std::size_t>(grid.x) * static_cast<std::size_t>(batch);
    if (ctx_->norm_partials.size() < partials) ctx_->norm_partials.resize_zero(partials, ctx_->stream);
    detail::scaled_sum_kernel<<<grid, detail::kThreads, 0, ctx_->stream>>>(
        in.rows(), in.cols(), order, detail::strided(in, in_stride), norms,
        ctx_->norm_partials.data());
    detail::sum_partials_kernel<<<static_cast<unsigned>(batch), detail::kThreads, 0, ctx_->stream>>>(
        ctx_->norm_partials.data(), grid.x, norms);
    launched("Frobenius norm");
    detail::for_each(ctx_->stream, in.rows(), in.cols(), detail::column_order(out), batch,
                     detail::Normalize{norm_scale, eps}, detail::strided(out, out_stride),
                     detail::strided(in, in_stride), detail::NormOf{norms});
    launched("normalize");
  }

  /// One reduced-precision Newton-Schulz run on a stack of `batch` k x n matrices (k <= n),
  /// each stored column-major (ld k) in the workspace: X, Y (k x n) and k x k matrices.
  struct LowpRun {
    cudaDataType_t type;
    index_t k, n, batch, blocks;
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
                 float alpha = 1, float beta = 0) const {
    check(cublasGemmStridedBatchedEx(ctx_->handle, CUBLAS_OP_N, tb, blas(m), blas(nn),
                                     blas(depth), &alpha, a, run.type, blas(m), sa, b, run.type,
                                     blas(ldb), sb, &beta, c, run.type, blas(m), sc,
                                     blas(run.batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmStridedBatchedEx");
  }

  /// out = alpha P R + beta S + gamma I for a product P R known to be symmetric: X X^T
  /// (P = X, R = X^T: r_transposed, depth n) or a product of commuting symmetric k x k
  /// matrices (depth k). Only the lower blocks are multiplied; the kernel mirrors them.
  template <class L>
  void lowp_symmetric(const LowpRun& run, const L* p, const L* r, bool r_transposed, L* out,
                      float alpha = 1, const L* s = nullptr, float beta = 0,
                      float gamma = 0) const {
    const index_t k = run.k, depth = r_transposed ? run.n : run.k, kk = k * k;
    const cublasOperation_t tb = r_transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (run.blocks == 1) {
      lowp_gemm(run, tb, k, k, depth, p, k * depth, r, k, k * depth, out, kk);
      if (alpha == 1 && s == nullptr && gamma == 0) return;  // already whole
    } else {
      const index_t nb = run.blocks, bs = k / nb, count = run.batch * nb * (nb + 1) / 2;
      void** ptrs = ctx_->blocks.data();
      detail::block_pointers_kernel<<<detail::blocks_for(count), detail::kThreads, 0,
                                      ctx_->stream>>>(k, bs, static_cast<int>(nb), count, p,
                                                      k * depth, r, k * depth, r_transposed, out,
                                                      kk, ptrs);
      launched("block pointers");
      const float one = 1, zero = 0;
      check(cublasGemmBatchedEx(ctx_->handle, CUBLAS_OP_N, tb, blas(bs), blas(bs), blas(depth),
                                &one, ptrs, run.type, blas(k), ptrs + count, run.type, blas(k),
                                &zero, ptrs + 2 * count, run.type, blas(k), blas(count),
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "cublasGemmBatchedEx");
    }
    const auto tiles = static_cast<unsigned>((k + detail::kTile - 1) / detail::kTile);
    detail::symmetric_from_lower_kernel<<<dim3(tiles, tiles, static_cast<unsigned>(run.batch)),
                                          dim3(detail::kTile, 8), 0, ctx_->stream>>>(
        k, out, s, kk, alpha, beta, gamma);
    launched("symmetric_from_lower");
  }

  /// B = c A A + b A + a I from A (symmetric), into `out`. Unblocked, as measured on the H100:
  /// B = A, then B = c A A + b B in one GEMM, then the diagonal.
  template <class L>
  void lowp_polynomial(const LowpRun& run, const Coefficients& p, const L* a, L* out) const {
    if (run.blocks > 1)
      return lowp_symmetric(run, a, a, false, out, static_cast<float>(p.c), a,
                            static_cast<float>(p.b), static_cast<float>(p.a));
    const index_t k = run.k, kk = k * k;
    check(cudaMemcpyAsync(out, a, run.batch * kk * sizeof(L), cudaMemcpyDeviceToDevice,
                          ctx_->stream),
          "cudaMemcpyAsync");
    lowp_gemm(run, CUBLAS_OP_N, k, k, k, a, kk, a, k, kk, out, kk, static_cast<float>(p.c),
              static_cast<float>(p.b));
    detail::add_diagonal_kernel<<<dim3(detail::blocks_for(k), static_cast<unsigned>(run.batch)),
                                  detail::kThreads, 0, ctx_->stream>>>(
        k, detail::strided(col_major_view<DeviceSpace>(out, k, k), kk), static_cast<float>(p.a));
    launched("add_diagonal");
  }

  /// Newton-Schulz on stacks of k x n matrices, k <= n, stored in L (bf16 or fp16):
  ///   X = G / ||G||;  per (a, b, c):  A = X X^T;  B = c A A + b A + a I;  X = B X
  /// (the reference loop of Jordan et al.; folding a I into B makes X = a X + B X one product),
  /// or its Gram form (lowp_gram_newton_schulz). The result is cast back into `out`.
  template <class L>
  void lowp_newton_schulz(MatrixView<const float, DeviceSpace> in, index_t in_stride,
                          MatrixView<float, DeviceSpace> out, index_t out_stride, index_t batch,
                          std::span<const Coefficients> schedule, double norm_scale, double eps,
                          cudaDataType_t type, bool gram) const {
    const LowpRun run{type, in.rows(), in.cols(), batch, symmetric_blocks(in.rows())};
    const index_t k = run.k, n = run.n, kn = k * n, kk = k * k;
    const std::size_t need =
        static_cast<std::size_t>(batch * (2 * kn + (gram ? 4 : 2) * kk)) * sizeof(L);
    if (ctx_->lowp.size() < need) ctx_->lowp.resize_zero(need, ctx_->stream);
    const auto pointers = static_cast<std::size_t>(3 * batch * run.blocks * (run.blocks + 1) / 2);
    if (run.blocks > 1 && ctx_->blocks.size() < pointers)
      ctx_->blocks.resize_zero(pointers, ctx_->stream);
    L* x = reinterpret_cast<L*>(ctx_->lowp.data());
    L* y = x + batch * kn;
    L* a = y + batch * kn;
    L* b = a + batch * kk;
    normalize_batched(in, in_stride, col_major_view<DeviceSpace>(x, k, n), kn, batch, norm_scale,
                      eps);
    bind();
    if (gram) {
      x = lowp_gram_newton_schulz(run, schedule, x, y, a, b, b + batch * kk, b + 2 * batch * kk);
    } else {
      for (const Coefficients& p : schedule) {
        lowp_symmetric(run, x, x, true, a);  // A = X X^T
        lowp_polynomial(run, p, a, b);       // B = c A A + b A + a I
        lowp_gemm(run, CUBLAS_OP_N, k, n, k, b, kk, x, k, kn, y, kn);  // Y = B X
        std::swap(x, y);
      }
    }
    detail::for_each(ctx_->stream, k, n, detail::column_order(out), batch, detail::Copy{},
                     detail::strided(out, out_stride),
                     detail::strided(MatrixView<const L, DeviceSpace>(
                                         col_major_view<DeviceSpace>(x, k, n)),
                                     kn));
    launched("cast back");
  }

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
                               L* y, L* r, L* b, L* w, L* q) const {
    constexpr double u = std::is_same_v<L, __half> ? 0x1p-11 : 0x1p-8;  // fp16, bf16
    muon::GramRestartPlan plan(u);
    const index_t k = run.k, n = run.n, kn = k * n, kk = k * k;
    lowp_symmetric(run, x, x, true, r);  // R = X X^T
    bool q_is_identity = true, restart = false;
    for (std::size_t t = 0; t < schedule.size(); ++t) {
      if (restart) {
        lowp_gemm(run, CUBLAS_OP_N, k, n, k, q, kk, x, k, kn, y, kn);  // X = Q X
        std::swap(x, y);
        lowp_symmetric(run, x, x, true, r);  // R = X X^T
        q_is_identity = true;
      }
      lowp_polynomial(run, schedule[t], r, b);  // B = c R R + b R + a I
      restart = t + 1 < schedule.size() && plan.restart_after(schedule[t]);
      if (t + 1 < schedule.size() && !restart) {
        lowp_symmetric(run, r, b, false, w);  // W = R B
        lowp_symmetric(run, b, w, false, r);  // R = B R B
      }
      if (q_is_identity) {
        std::swap(q, b);  // Q = B
        q_is_identity = false;
      } else {
        lowp_symmetric(run, b, q, false, w);  // Q = B Q
        std::swap(q, w);
      }
    }
    if (q_is_identity) return x;  // no step at all
    lowp_gemm(run, CUBLAS_OP_N, k, n, k, q, kk, x, k, kn, y, kn);  // Y = Q X
    return y;
  }

  std::shared_ptr<Context> ctx_;
  CudaOptions options_;
};

}  // namespace muon::cuda
