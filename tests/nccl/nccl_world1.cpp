// NcclCommunicator at world size 1 (NCCL refuses two ranks on one GPU): every collective on
// device buffers gives the world-size-1 answer. Exits 77 (ctest SKIP) when no GPU is visible.
#include <cstdio>
#include <vector>

#include "muon/distributed/nccl.hpp"
#include "nccl_world1.hpp"

static_assert(muon::Communicator<muon::NcclCommunicator, float>);
static_assert(muon::Communicator<muon::NcclCommunicator, double>);

int main() {
  return run_nccl_world1([](ncclComm_t comm) {
    cudaStream_t stream = nullptr;
    cudaStreamCreate(&stream);
    int failures = 0;
    {
      muon::NcclCommunicator c(comm, stream);
      const std::vector<float> host = {1.5f, -2.0f, 3.25f, 0.0f};
      float *a = nullptr, *b = nullptr;
      cudaMalloc(&a, 4 * sizeof(float));
      cudaMalloc(&b, 4 * sizeof(float));
      cudaMemcpy(a, host.data(), 4 * sizeof(float), cudaMemcpyHostToDevice);
      c.all_reduce_sum(a, 4);
      c.reduce_scatter_sum(a, b, 4);
      c.all_gather(b, a, 4);
      c.broadcast(a, 4, 0);
      std::vector<float> back(4);
      cudaMemcpyAsync(back.data(), a, 4 * sizeof(float), cudaMemcpyDeviceToHost, stream);
      cudaStreamSynchronize(stream);
      failures += back != host;
      failures += c.all_reduce_max(42) != 42;
      failures += c.rank() != 0 || c.size() != 1;
      cudaFree(a);
      cudaFree(b);
    }
    cudaStreamDestroy(stream);
    std::printf("nccl world 1: %s\n", failures ? "FAILED" : "ok");
    return failures;
  });
}
