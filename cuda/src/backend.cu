// muon::cuda's library: CudaBackend's member templates compiled for float and double, every
// rule's elementwise stages, the float <-> bf16/fp16 copies of MasterWeights, and its
// non-template members. Host C++ that includes muon/cuda/backend.hpp links these.
#include "muon/cuda/backend.cuh"
#include "muon/rules/rules.hpp"

namespace muon::cuda {

// NewtonSchulzWorkspace hands float matrices to the bf16 / fp16 iteration only through this hook.
static_assert(muon::detail::RunsOwnNewtonSchulz<CudaBackend, float>);

void CudaBackend::newton_schulz_batched(MatrixView<const float, DeviceSpace> in, index_t in_stride,
                             MatrixView<float, DeviceSpace> out, index_t out_stride,
                             index_t batch, std::span<const Coefficients> schedule,
                             double norm_scale, double eps, Precision precision,
                             NewtonSchulzMethod method) const {
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
  // Unit roundoffs: bf16 keeps 8 significand bits, fp16 and TF32's products 11, fp32 24.
  switch (precision) {
    case Precision::bf16:
      return lowp_newton_schulz<__nv_bfloat16>(in, in_stride, out, out_stride, batch, schedule,
                                               norm_scale, eps, CUDA_R_16BF, CUBLAS_COMPUTE_32F,
                                               0x1p-8, gram);
    case Precision::fp16:
      return lowp_newton_schulz<__half>(in, in_stride, out, out_stride, batch, schedule,
                                        norm_scale, eps, CUDA_R_16F, CUBLAS_COMPUTE_32F, 0x1p-11,
                                        gram);
    case Precision::tf32:
      return lowp_newton_schulz<float>(in, in_stride, out, out_stride, batch, schedule,
                                       norm_scale, eps, CUDA_R_32F,
                                       CUBLAS_COMPUTE_32F_FAST_TF32, 0x1p-11, gram);
    case Precision::native:
      return lowp_newton_schulz<float>(in, in_stride, out, out_stride, batch, schedule,
                                       norm_scale, eps, CUDA_R_32F, CUBLAS_COMPUTE_32F, 0x1p-24,
                                       gram);
  }
}

#define MUON_CUDA_INSTANTIATE(T) \
  template void CudaBackend::copy_to_host<T>(MatrixView<const T, DeviceSpace>, T*) const; \
  template void CudaBackend::copy_from_host<T>(const T*, MatrixView<T, DeviceSpace>) const; \
  template void CudaBackend::gemm<T>(T, MatrixView<const T, DeviceSpace>, MatrixView<const T, DeviceSpace>, T, MatrixView<T, DeviceSpace>) const; \
  template void CudaBackend::syrk<T>(T, MatrixView<const T, DeviceSpace>, T, MatrixView<T, DeviceSpace>) const; \
  template void CudaBackend::symm<T>(T, MatrixView<const T, DeviceSpace>, MatrixView<const T, DeviceSpace>, T, MatrixView<T, DeviceSpace>) const; \
  template void CudaBackend::symmetrize<T>(MatrixView<T, DeviceSpace>) const; \
  template void CudaBackend::copy<T, T>(MatrixView<const T, DeviceSpace>, MatrixView<T, DeviceSpace>) const; \
  template void CudaBackend::add_diagonal<T>(MatrixView<T, DeviceSpace>, T) const; \
  template void CudaBackend::scale<T>(MatrixView<T, DeviceSpace>, T) const; \
  template void CudaBackend::flush_tiny<T>(MatrixView<T, DeviceSpace>, T) const; \
  template void CudaBackend::normalize<T>(MatrixView<T, DeviceSpace>, double, double) const; \
  template void CudaBackend::scan_finite<T>(MatrixView<const T, DeviceSpace>) const; \
  template bool CudaBackend::all_finite<T>(MatrixView<const T, DeviceSpace>) const; \
  template std::optional<MatrixView<T, DeviceSpace>> CudaBackend::try_newton_schulz<T>( \
      NewtonSchulzScratch<T>&, MatrixView<T, DeviceSpace>, MatrixView<T, DeviceSpace>, \
      MatrixView<T, DeviceSpace>, MatrixView<T, DeviceSpace>, std::span<const Coefficients>, \
      double, double, NewtonSchulzMethod) const;

MUON_CUDA_INSTANTIATE(float)
MUON_CUDA_INSTANTIATE(double)
#undef MUON_CUDA_INSTANTIATE

#define MUON_CUDA_CONVERT(S, D) \
  template void CudaBackend::copy<S, D>(MatrixView<const S, DeviceSpace>, MatrixView<D, DeviceSpace>) const;
MUON_CUDA_CONVERT(float, __nv_bfloat16)
MUON_CUDA_CONVERT(__nv_bfloat16, float)
MUON_CUDA_CONVERT(float, __half)
MUON_CUDA_CONVERT(__half, float)
#undef MUON_CUDA_CONVERT

// The rules' stages, for every rule in rules::All (a new rule needs nothing in this file). The
// driver, compiled by the host compiler, calls CudaBackend::each with each rule's functors;
// this library holds those instantiations. Running each rule's entry points on KeepStages,
// which takes the address of each<F, Views...> for every call, makes the compiler emit them
// out of line (a merely called instantiation may be inlined or cloned and leave none to link).
namespace {
struct KeepStages {
  template <class F, class... Views>
  void each(F, Views...) const {
    using Each = void (CudaBackend::*)(F, Views...) const;
    static constexpr Each kept = &CudaBackend::each<F, Views...>;
    asm volatile("" : : "r"(&kept));
  }
  template <class F, class Out, class... Views>
  void reduce_rows(F, Out, Views...) const {
    using Reduce = void (CudaBackend::*)(F, Out, Views...) const;
    static constexpr Reduce kept = &CudaBackend::reduce_rows<F, Out, Views...>;
    asm volatile("" : : "r"(&kept));
  }
};

template <class Rule, class T>
void keep_stages_of(KeepStages& b) {
  const MatrixView<T, DeviceSpace> x;
  const MatrixView<const T, DeviceSpace> cx;
  const typename Rule::Options options{};
  if constexpr (Rule::orthogonalizes) {
    Rule::accumulate(b, x, cx, x, options);
    const MatrixView<T, DeviceSpace> rows[rules::All::max_matrix_buffers + 1];
    Rule::apply(b, x, cx, rows, x, options);
  } else {
    const MatrixView<T, DeviceSpace> state[Rule::buffers];
    Rule::update(b, x, cx, state, options, 1);
  }
}
template <class... Rule>
void keep_stages(KeepStages& b, rules::RuleList<Rule...>) {
  (keep_stages_of<Rule, float>(b), ...);
  (keep_stages_of<Rule, double>(b), ...);
}
}  // namespace

void keep_rule_stages();  // never called: what it compiles is the point
void keep_rule_stages() {
  KeepStages b;
  keep_stages(b, rules::All{});
}

}  // namespace muon::cuda
