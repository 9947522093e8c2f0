#pragma once
// muon::libtorch::CudaMuon<T>: muon::libtorch::Muon on CUDA tensors, updated in place by the
// CUDA backend on torch's current CUDA stream and cuBLAS handle (borrowed, as they are when
// the optimizer is made), so its work is ordered with the model's. Host C++: a .cpp compiled
// by g++ includes this, and links muon::cuda and a CUDA build of LibTorch.
//
//   auto routed = muon::libtorch::route(model->named_parameters());   // model->to(torch::kCUDA)
//   muon::libtorch::CudaMuon<float> opt(routed);
#include <ATen/cuda/CUDAContext.h>

#include <utility>

#include "muon/adapters/libtorch_optimizer.hpp"
#include "muon/cuda/backend.hpp"

namespace muon::libtorch {

/// The CUDA backend on torch's current stream and cuBLAS handle.
inline cuda::CudaBackend torch_cuda_backend(cuda::CudaOptions options = {}) {
  return cuda::CudaBackend(at::cuda::getCurrentCUDAStream().stream(),
                           at::cuda::getCurrentCUDABlasHandle(), options);
}

template <class T = float>
class CudaMuon : public Muon<T, cuda::CudaBackend> {
 public:
  explicit CudaMuon(const Routing& routing, OptimizerOptions engine = {},
                    cuda::CudaOptions options = {})
      : Muon<T, cuda::CudaBackend>(routing, engine, torch_cuda_backend(options)) {}
};

}  // namespace muon::libtorch
