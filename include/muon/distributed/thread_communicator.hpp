#pragma once
// An in-process communicator: N threads of one process form a group. It runs the sharded
// optimizer's tests without MPI. Sums are taken in rank order, so every rank gets the same bits
// and a run is reproducible. Every rank must call the same collectives in the same order (as
// with MPI); a rank that stops calling leaves the others waiting.
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "muon/core/error.hpp"
#include "muon/distributed/communicator.hpp"

namespace muon {

class ThreadGroup;

class ThreadCommunicator {
 public:
  using memory_space = HostSpace;
  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept;

  template <class T>
  void all_reduce_sum(T* p, std::size_t n);
  template <class T>
  void reduce_scatter_sum(const T* send, T* recv, std::size_t n);
  template <class T>
  void all_gather(const T* send, T* recv, std::size_t n);
  template <class T>
  void broadcast(T* p, std::size_t n, int root);
  std::uint64_t all_reduce_max(std::uint64_t u);

 private:
  friend class ThreadGroup;
  ThreadCommunicator(ThreadGroup* group, int rank) : group_(group), rank_(rank) {}
  ThreadGroup* group_;
  int rank_;
};

class ThreadGroup {
 public:
  explicit ThreadGroup(int size)
      : size_(size), slots_(static_cast<std::size_t>(size)),
        values_(static_cast<std::size_t>(size)) {
    if (size < 1)
      throw InvalidArgument("muon: ThreadGroup: size = " + std::to_string(size) +
                            " must be at least 1");
  }
  ThreadCommunicator communicator(int rank) {
    if (rank < 0 || rank >= size_)
      throw InvalidArgument("muon: ThreadGroup: rank " + std::to_string(rank) +
                            " outside [0, " + std::to_string(size_) + ")");
    return {this, rank};
  }
  [[nodiscard]] int size() const noexcept { return size_; }

  /// Runs body(communicator) on `size` threads and waits; rethrows the first exception (a rank
  /// that throws aborts the group, so the others stop at their next collective).
  template <class Body>
  static void run(int size, Body body) {
    ThreadGroup group(size);
    std::vector<std::thread> threads;
    std::exception_ptr error;
    std::mutex error_mutex;
    for (int r = 0; r < size; ++r)
      threads.emplace_back([&, r] {
        try {
          body(group.communicator(r));
        } catch (...) {
          {
            const std::lock_guard lock(error_mutex);
            if (!error) error = std::current_exception();
          }
          group.abort();
        }
      });
    for (auto& t : threads) t.join();
    if (error) std::rethrow_exception(error);
  }

 private:
  friend class ThreadCommunicator;
  /// Every rank arrives before any leaves; throws once the group is aborted.
  void sync() {
    std::unique_lock lock(mutex_);
    const std::uint64_t generation = generation_;
    if (!aborted_ && ++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      arrived_all_.notify_all();
      return;
    }
    arrived_all_.wait(lock, [&] { return generation_ != generation || aborted_; });
    if (generation_ == generation)
      throw Error("muon: ThreadGroup: another rank failed; this collective was abandoned");
  }
  void abort() {
    const std::lock_guard lock(mutex_);
    aborted_ = true;
    arrived_all_.notify_all();
  }
  int size_;
  std::mutex mutex_;
  std::condition_variable arrived_all_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  bool aborted_ = false;
  std::vector<const void*> slots_;   // each rank's published buffer for the current collective
  std::vector<std::uint64_t> values_;
};

inline int ThreadCommunicator::size() const noexcept { return group_->size(); }

template <class T>
void ThreadCommunicator::all_reduce_sum(T* p, std::size_t n) {
  auto& g = *group_;
  g.slots_[rank_] = p;
  g.sync();
  std::vector<T> sum(n, T(0));
  for (int r = 0; r < g.size_; ++r) {
    const T* src = static_cast<const T*>(g.slots_[r]);
    for (std::size_t i = 0; i < n; ++i) sum[i] += src[i];
  }
  g.sync();  // every rank has read every input before anyone overwrites its own
  std::copy(sum.begin(), sum.end(), p);
  g.sync();
}

template <class T>
void ThreadCommunicator::reduce_scatter_sum(const T* send, T* recv, std::size_t n) {
  auto& g = *group_;
  g.slots_[rank_] = send;
  g.sync();
  const std::size_t at = static_cast<std::size_t>(rank_) * n;
  for (std::size_t i = 0; i < n; ++i) {
    T s = T(0);
    for (int r = 0; r < g.size_; ++r) s += static_cast<const T*>(g.slots_[r])[at + i];
    recv[i] = s;
  }
  g.sync();
}

template <class T>
void ThreadCommunicator::all_gather(const T* send, T* recv, std::size_t n) {
  auto& g = *group_;
  g.slots_[rank_] = send;
  g.sync();
  for (int r = 0; r < g.size_; ++r)
    std::copy_n(static_cast<const T*>(g.slots_[r]), n, recv + static_cast<std::size_t>(r) * n);
  g.sync();
}

template <class T>
void ThreadCommunicator::broadcast(T* p, std::size_t n, int root) {
  auto& g = *group_;
  g.slots_[rank_] = p;
  g.sync();
  if (rank_ != root) std::copy_n(static_cast<const T*>(g.slots_[root]), n, p);
  g.sync();
}

inline std::uint64_t ThreadCommunicator::all_reduce_max(std::uint64_t u) {
  auto& g = *group_;
  g.values_[rank_] = u;
  g.sync();
  const std::uint64_t result = *std::max_element(g.values_.begin(), g.values_.end());
  g.sync();
  return result;
}

}  // namespace muon
