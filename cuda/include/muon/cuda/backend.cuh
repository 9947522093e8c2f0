#pragma once
// The definitions of CudaBackend's member templates, with the kernels they launch
// (kernels.cuh): CUDA C++, for .cu files. muon::cuda's library compiles them for float and
// double (cuda/src/backend.cu); host C++ includes backend.hpp alone.
#include <cuda_runtime.h>

#include <tuple>

#include "muon/cuda/backend.hpp"
#include "muon/cuda/kernels.cuh"

namespace muon::cuda {

template <class T>
void CudaBackend::copy_to_host(MatrixView<const T, DeviceSpace> src, T* dst) const {
  if (src.empty()) return;
  Buffer<T> dense;
  const T* from = dense_source(src, dense);
  check(cudaMemcpyAsync(dst, from, src.size() * sizeof(T), cudaMemcpyDeviceToHost, ctx_->stream),
        "cudaMemcpyAsync");
  synchronize();
}

template <class T>
void CudaBackend::copy_from_host(const T* src, MatrixView<T, DeviceSpace> dst) const {
  if (dst.empty()) return;
  Buffer<T> dense;
  resize(dense, dst.size());
  check(cudaMemcpyAsync(dense.data(), src, dst.size() * sizeof(T), cudaMemcpyHostToDevice,
                        ctx_->stream),
        "cudaMemcpyAsync");
  copy(MatrixView<const T, DeviceSpace>(view(dense, dst.rows(), dst.cols())), dst);
  synchronize();  // before `dense` is freed and the caller reuses `src`
}

template <class T>
void CudaBackend::gemm(T alpha, MatrixView<const T, DeviceSpace> a, MatrixView<const T, DeviceSpace> b,
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
void CudaBackend::syrk(T alpha, MatrixView<const T, DeviceSpace> a, T beta,
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
void CudaBackend::symm(T alpha, MatrixView<const T, DeviceSpace> a, MatrixView<const T, DeviceSpace> b,
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
void CudaBackend::symmetrize(MatrixView<T, DeviceSpace> c) const {
  if (c.empty()) return;
  detail::symmetrize_kernel<<<detail::blocks_for(c.size()), detail::kThreads, 0, ctx_->stream>>>(
      c.rows(), detail::strided(c));
  launched("symmetrize");
}

template <class S, class D>
void CudaBackend::copy(MatrixView<const S, DeviceSpace> src, MatrixView<D, DeviceSpace> dst) const {
  each(detail::Copy{}, dst, src);
}

template <class T>
void CudaBackend::add_diagonal(MatrixView<T, DeviceSpace> x, T value) const {
  const index_t n = std::min(x.rows(), x.cols());
  if (n == 0) return;
  detail::add_diagonal_kernel<<<detail::blocks_for(n), detail::kThreads, 0, ctx_->stream>>>(
      n, detail::strided(x), value);
  launched("add_diagonal");
}

template <class T>
void CudaBackend::scale(MatrixView<T, DeviceSpace> x, T factor) const {
  each(detail::Scale<T>{factor}, x);
}

template <class T>
void CudaBackend::flush_tiny(MatrixView<T, DeviceSpace> x, T threshold) const {
  each(detail::FlushTiny<T>{threshold}, x);
}

template <class T>
void CudaBackend::normalize(MatrixView<T, DeviceSpace> x, double norm_scale, double eps) const {
  normalize_batched(MatrixView<const T, DeviceSpace>(x), 0, x, 0, 1, norm_scale, eps);
}

template <class T>
bool CudaBackend::all_finite(MatrixView<const T, DeviceSpace> x) const {
  if (x.empty()) return true;
  begin_finite_scan();
  scan_finite(x);
  return end_finite_scan();
}

template <class T>
void CudaBackend::scan_finite(MatrixView<const T, DeviceSpace> x) const {
  if (x.empty()) return;
  detail::any_non_finite_kernel<<<detail::blocks_for(x.size()), detail::kThreads, 0, ctx_->stream>>>(
      x.rows(), x.cols(), detail::column_order(x), detail::strided(x), ctx_->flag);
  launched("scan_finite");
}

template <class T>
std::optional<MatrixView<T, DeviceSpace>> CudaBackend::try_newton_schulz(
      NewtonSchulzScratch<T>&, MatrixView<T, DeviceSpace> x, MatrixView<T, DeviceSpace> y,
      MatrixView<T, DeviceSpace>, MatrixView<T, DeviceSpace>,
      std::span<const Coefficients> schedule, double norm_scale, double eps,
      NewtonSchulzMethod method) const {
  if constexpr (std::is_same_v<T, float>) {
    if (reduced_precision_newton_schulz()) {
      newton_schulz_batched(MatrixView<const float, DeviceSpace>(x), 0, y, 0, 1, schedule,
                            norm_scale, eps, options_.newton_schulz, method);
      return y;
    }
  }
  return std::nullopt;
}

template <class F, class... Views>
void CudaBackend::each(F f, Views... views) const {
  const auto shape = std::get<0>(std::tuple<Views...>(views...));
  detail::for_each(ctx_->stream, shape.rows(), shape.cols(), detail::column_order(shape), 1, f,
                   detail::strided(views)...);
  launched("elementwise kernel");
}

template <class F, class Out, class... Views>
void CudaBackend::reduce_rows(F f, Out out, Views... views) const {
  const auto shape = std::get<0>(std::tuple<Views...>(views...));
  detail::reduce_rows(ctx_->stream, shape.rows(), shape.cols(), f, detail::strided(out),
                      detail::strided(views)...);
  launched("row reduction kernel");
}

template <class T>
const T* CudaBackend::dense_source(MatrixView<const T, DeviceSpace> src, Buffer<T>& scratch) const {
  if (src.is_row_major_contiguous()) return src.data();
  resize(scratch, src.size());
  copy(src, view(scratch, src.rows(), src.cols()));
  return scratch.data();
}

template <class S, class D>
void CudaBackend::normalize_batched(MatrixView<const S, DeviceSpace> in, index_t in_stride,
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

template <class L>
void CudaBackend::lowp_gemm(const LowpRun& run, cublasOperation_t tb, index_t m, index_t nn, index_t depth,
                 const L* a, index_t sa, const L* b, index_t ldb, index_t sb, L* c, index_t sc,
                 float alpha, float beta) const {
  check(cublasGemmStridedBatchedEx(ctx_->handle, CUBLAS_OP_N, tb, blas(m), blas(nn),
                                   blas(depth), &alpha, a, run.type, blas(m), sa, b, run.type,
                                   blas(ldb), sb, &beta, c, run.type, blas(m), sc,
                                   blas(run.batch), run.compute, CUBLAS_GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx");
}

template <class L>
void CudaBackend::lowp_symmetric(const LowpRun& run, const L* p, const L* r, bool r_transposed, L* out,
                      float alpha, const L* s, float beta,
                      float gamma) const {
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
                              run.compute, CUBLAS_GEMM_DEFAULT),
          "cublasGemmBatchedEx");
  }
  const auto tiles = static_cast<unsigned>((k + detail::kTile - 1) / detail::kTile);
  detail::symmetric_from_lower_kernel<<<dim3(tiles, tiles, static_cast<unsigned>(run.batch)),
                                        dim3(detail::kTile, 8), 0, ctx_->stream>>>(
      k, out, s, kk, alpha, beta, gamma);
  launched("symmetric_from_lower");
}

template <class L>
void CudaBackend::lowp_polynomial(const LowpRun& run, const Coefficients& p, const L* a, L* out) const {
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

template <class L>
void CudaBackend::lowp_newton_schulz(MatrixView<const float, DeviceSpace> in, index_t in_stride,
                          MatrixView<float, DeviceSpace> out, index_t out_stride, index_t batch,
                          std::span<const Coefficients> schedule, double norm_scale, double eps,
                          cudaDataType_t type, cublasComputeType_t compute, double unit_roundoff,
                          bool gram) const {
  const LowpRun run{type, in.rows(), in.cols(), batch, symmetric_blocks(in.rows()), compute,
                    unit_roundoff};
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

template <class L>
L* CudaBackend::lowp_gram_newton_schulz(const LowpRun& run, std::span<const Coefficients> schedule, L* x,
                               L* y, L* r, L* b, L* w, L* q) const {
  muon::GramRestartPlan plan(run.unit_roundoff);
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

}  // namespace muon::cuda
