#pragma once
// MpiCommunicator: the Communicator concept on an MPI communicator the caller owns (borrowed,
// never freed), on host memory. Link muon::mpi (CMake) or your MPI's compiler wrapper.
#include <mpi.h>

#include <climits>
#include <cstdint>
#include <string>

#include "muon/core/error.hpp"
#include "muon/distributed/communicator.hpp"

namespace muon {

class MpiCommunicator {
 public:
  using memory_space = HostSpace;
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  [[nodiscard]] MPI_Comm comm() const noexcept { return comm_; }

  template <class T>
  void all_reduce_sum(T* p, std::size_t n) {
    check(MPI_Allreduce(MPI_IN_PLACE, p, count(n), type<T>(), MPI_SUM, comm_), "MPI_Allreduce");
  }
  template <class T>
  void reduce_scatter_sum(const T* send, T* recv, std::size_t n) {
    check(MPI_Reduce_scatter_block(send, recv, count(n), type<T>(), MPI_SUM, comm_),
          "MPI_Reduce_scatter_block");
  }
  template <class T>
  void all_gather(const T* send, T* recv, std::size_t n) {
    check(MPI_Allgather(send, count(n), type<T>(), recv, count(n), type<T>(), comm_),
          "MPI_Allgather");
  }
  template <class T>
  void broadcast(T* p, std::size_t n, int root) {
    check(MPI_Bcast(p, count(n), type<T>(), root, comm_), "MPI_Bcast");
  }
  std::uint64_t all_reduce_max(std::uint64_t u) {
    std::uint64_t result = 0;
    check(MPI_Allreduce(&u, &result, 1, MPI_UINT64_T, MPI_MAX, comm_), "MPI_Allreduce");
    return result;
  }

 private:
  template <class T>
  static MPI_Datatype type() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "MpiCommunicator: float or double buffers");
    return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
  }
  static int count(std::size_t n) {
    // The same n on every rank, so every rank refuses together and none is left waiting.
    if (n > static_cast<std::size_t>(INT_MAX))
      throw InvalidArgument("muon: MpiCommunicator: " + std::to_string(n) +
                            " elements in one collective exceed MPI's int count");
    return static_cast<int>(n);
  }
  static void check(int rc, const char* what) {
    if (rc != MPI_SUCCESS) throw Error(std::string("muon: ") + what + " failed");
  }
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace muon
