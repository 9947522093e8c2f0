#pragma once
// Shared by the NCCL tests: NCCL refuses two ranks on one GPU, so each runs at world size 1.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>

/// Runs body(comm) on a world-size-1 communicator on device 0 and returns its failure count
/// as the exit status: 0 when none, 1 otherwise (or when NCCL cannot start), 77 (CTest skip)
/// when no GPU is visible.
template <class Body>
int run_nccl_world1(Body body) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::puts("no CUDA device visible: skipped");
    return 77;
  }
  ncclComm_t comm = nullptr;
  int dev = 0;
  if (ncclCommInitAll(&comm, 1, &dev) != ncclSuccess) return 1;
  const int failures = body(comm);
  ncclCommDestroy(comm);
  return failures == 0 ? 0 : 1;
}
