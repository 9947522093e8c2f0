#pragma once
// The Communicator concept: what the sharded optimizer needs from a process group. Buffers are
// pointers into the communicator's memory space (host for MPI and threads, device for NCCL),
// which must be the backend's. Collectives are issued in the same order on every rank and are
// ordered with the backend's work: synchronous on the host, on the backend's stream for NCCL.
//
//   all_reduce_sum(p, n)             p[0..n) <- sum over ranks, in place
//   reduce_scatter_sum(send, recv, n) recv[0..n) <- sum over ranks of send[rank*n .. rank*n+n)
//   all_gather(send, recv, n)        recv[r*n .. r*n+n) <- rank r's send[0..n)
//   broadcast(p, n, root)            p[0..n) <- root's p
//   all_reduce_max(u)                the largest u over ranks (a host value: agreement and
//                                    validation, e.g. "did any rank see a NaN")
// Implementations: SingleProcessCommunicator (here), ThreadCommunicator (in-process, for tests),
// MpiCommunicator (<muon/distributed/mpi.hpp>), NcclCommunicator (<muon/distributed/nccl.hpp>).
#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "muon/core/matrix_view.hpp"

namespace muon {

template <class C, class T>
concept Communicator = requires(C& c, const C& cc, T* p, const T* cp, std::size_t n, int root,
                                std::uint64_t u) {
  typename C::memory_space;
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  c.all_reduce_sum(p, n);
  c.reduce_scatter_sum(cp, p, n);
  c.all_gather(cp, p, n);
  c.broadcast(p, n, root);
  { c.all_reduce_max(u) } -> std::same_as<std::uint64_t>;
};

/// World size 1: the single-device path is the distributed path with one rank.
template <class Space = HostSpace>
class SingleProcessCommunicator {
 public:
  using memory_space = Space;
  [[nodiscard]] int rank() const noexcept { return 0; }
  [[nodiscard]] int size() const noexcept { return 1; }
  template <class T>
  void all_reduce_sum(T*, std::size_t) {}
  template <class T>
  void reduce_scatter_sum(const T* send, T* recv, std::size_t n) {
    if (send != recv) std::copy_n(send, n, recv);
  }
  template <class T>
  void all_gather(const T* send, T* recv, std::size_t n) {
    if (send != recv) std::copy_n(send, n, recv);
  }
  template <class T>
  void broadcast(T*, std::size_t, int) {}
  std::uint64_t all_reduce_max(std::uint64_t u) { return u; }
  static_assert(std::is_same_v<Space, HostSpace>,
                "SingleProcessCommunicator copies with std::copy_n: host memory only");
};

/// Bytes one rank sends and receives, counted with the ring algorithms' volumes (what NCCL
/// and large-message MPI use): for N ranks and b bytes per rank, reduce-scatter and all-gather
/// move (N-1) b each way, all-reduce of b bytes 2 (N-1)/N b, broadcast b (pipelined ring).
struct CommVolume {
  std::uint64_t sent = 0, received = 0;
};

/// Wraps a communicator and counts its traffic (CommVolume); everything else is forwarded.
template <class C>
class CountingCommunicator {
 public:
  using memory_space = typename C::memory_space;
  explicit CountingCommunicator(C inner) : inner_(std::move(inner)) {}
  [[nodiscard]] int rank() const { return inner_.rank(); }
  [[nodiscard]] int size() const { return inner_.size(); }
  template <class T>
  void all_reduce_sum(T* p, std::size_t n) {
    const auto world = static_cast<std::uint64_t>(size());
    add(2 * (world - 1) * n * sizeof(T) / world, 2 * (world - 1) * n * sizeof(T) / world);
    inner_.all_reduce_sum(p, n);
  }
  template <class T>
  void reduce_scatter_sum(const T* send, T* recv, std::size_t n) {
    const auto other = static_cast<std::uint64_t>(size() - 1);
    add(other * n * sizeof(T), other * n * sizeof(T));
    inner_.reduce_scatter_sum(send, recv, n);
  }
  template <class T>
  void all_gather(const T* send, T* recv, std::size_t n) {
    const auto other = static_cast<std::uint64_t>(size() - 1);
    add(other * n * sizeof(T), other * n * sizeof(T));
    inner_.all_gather(send, recv, n);
  }
  template <class T>
  void broadcast(T* p, std::size_t n, int root) {
    if (size() > 1) {
      const bool last = (root + size() - 1) % size() == rank();  // the ring's end sends nothing
      add(last ? 0 : n * sizeof(T), rank() == root ? 0 : n * sizeof(T));
    }
    inner_.broadcast(p, n, root);
  }
  std::uint64_t all_reduce_max(std::uint64_t u) { return inner_.all_reduce_max(u); }

  [[nodiscard]] const CommVolume& volume() const noexcept { return volume_; }
  void reset_volume() noexcept { volume_ = {}; }
  [[nodiscard]] C& inner() noexcept { return inner_; }

 private:
  void add(std::uint64_t sent, std::uint64_t received) {
    volume_.sent += sent;
    volume_.received += received;
  }
  C inner_;
  CommVolume volume_;
};

}  // namespace muon
