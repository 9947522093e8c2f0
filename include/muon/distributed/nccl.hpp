#pragma once
// NcclCommunicator: the Communicator concept on an NCCL communicator and CUDA stream the caller
// owns (borrowed, never destroyed), on device memory. Collectives are enqueued on that stream,
// which must be the stream the backend computes on, so they are ordered with its kernels
// without host synchronization. all_reduce_max (agreement on a host flag) is the exception: it
// synchronizes the stream. Needs the CUDA toolkit and NCCL (target muon::nccl).
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "muon/core/error.hpp"
#include "muon/distributed/communicator.hpp"

namespace muon {

class NcclCommunicator {
 public:
  using memory_space = DeviceSpace;
  NcclCommunicator(ncclComm_t comm, cudaStream_t stream) : comm_(comm), stream_(stream) {
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
    if (cudaMalloc(&flag_, sizeof(std::uint64_t)) != cudaSuccess)
      throw Error("muon: NcclCommunicator: cudaMalloc of 8 bytes failed");
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;
  NcclCommunicator(NcclCommunicator&& o) noexcept
      : comm_(o.comm_), stream_(o.stream_), rank_(o.rank_), size_(o.size_), flag_(o.flag_) {
    o.flag_ = nullptr;
  }
  NcclCommunicator& operator=(NcclCommunicator&&) = delete;
  ~NcclCommunicator() {
    if (flag_ != nullptr) cudaFree(flag_);
  }

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }

  template <class T>
  void all_reduce_sum(T* p, std::size_t n) {
    check(ncclAllReduce(p, p, n, type<T>(), ncclSum, comm_, stream_), "ncclAllReduce");
  }
  template <class T>
  void reduce_scatter_sum(const T* send, T* recv, std::size_t n) {
    check(ncclReduceScatter(send, recv, n, type<T>(), ncclSum, comm_, stream_),
          "ncclReduceScatter");
  }
  template <class T>
  void all_gather(const T* send, T* recv, std::size_t n) {
    check(ncclAllGather(send, recv, n, type<T>(), comm_, stream_), "ncclAllGather");
  }
  template <class T>
  void broadcast(T* p, std::size_t n, int root) {
    check(ncclBroadcast(p, p, n, type<T>(), root, comm_, stream_), "ncclBroadcast");
  }
  std::uint64_t all_reduce_max(std::uint64_t u) {
    std::uint64_t result = 0;
    cuda(cudaMemcpyAsync(flag_, &u, sizeof u, cudaMemcpyHostToDevice, stream_));
    check(ncclAllReduce(flag_, flag_, 1, ncclUint64, ncclMax, comm_, stream_), "ncclAllReduce");
    cuda(cudaMemcpyAsync(&result, flag_, sizeof result, cudaMemcpyDeviceToHost, stream_));
    cuda(cudaStreamSynchronize(stream_));
    return result;
  }

 private:
  template <class T>
  static ncclDataType_t type() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "NcclCommunicator: float or double buffers");
    return std::is_same_v<T, float> ? ncclFloat32 : ncclFloat64;
  }
  static void check(ncclResult_t rc, const char* what) {
    if (rc != ncclSuccess)
      throw Error(std::string("muon: ") + what + " failed: " + ncclGetErrorString(rc));
  }
  static void cuda(cudaError_t rc) {
    if (rc != cudaSuccess)
      throw Error(std::string("muon: NcclCommunicator: ") + cudaGetErrorString(rc));
  }
  ncclComm_t comm_;
  cudaStream_t stream_;
  int rank_ = 0, size_ = 1;
  std::uint64_t* flag_ = nullptr;
};

}  // namespace muon
