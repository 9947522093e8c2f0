#pragma once
// Internal: included by the library's own headers, not by programs.
// The CPU backend's workers: threads that run the tasks of one call side by side, the calling
// thread being worker 0, each task's products on one BLAS thread. One pool per process,
// made when the first CPU backend asks how many workers it has; its size is MUON_THREADS when
// set, else the BLAS's thread count (OPENBLAS_NUM_THREADS), else the hardware's. A call
// allocates nothing. One call at a time: a second caller (another optimizer stepping on another
// thread) runs its tasks itself, one after the other.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "muon/backend/cpu_dispatch.hpp"

namespace muon::cpu {

namespace detail {
// The BLAS's own thread count (OpenBLAS's calls; 0 from the getter when there is none).
#ifdef OPENBLAS_CONFIG_H
inline int blas_threads() { return openblas_get_num_threads(); }
inline void set_blas_threads(int n) { openblas_set_num_threads(n); }
#else
inline int blas_threads() {
  auto* f = blas_symbol<int()>("openblas_get_num_threads");
  return f ? f() : 0;
}
inline void set_blas_threads(int n) {
  if (auto* f = blas_symbol<void(int)>("openblas_set_num_threads")) f(n);
}
#endif

/// Whether this thread's products run on one BLAS thread (inside side-by-side tasks).
inline thread_local bool single_threaded_products = false;

/// OpenBLAS's thread count is one setting for the whole process, and its one-thread and
/// threaded products round differently, so the products of concurrent callers (the ranks of a
/// ThreadGroup, or two optimizers on two threads) take turns by mode: any number may run in
/// the same mode at once, a caller of the other mode waits until they are done and switches.
/// Each product's bits then depend only on its mode, never on what else runs.
class BlasMode {
 public:
  explicit BlasMode(bool single) {
    static const int threaded = std::max(1, blas_threads());  // the process's setting
    if (threaded == 1) return;  // one mode only: nothing to take turns over
    active_ = true;
    const int want = single ? 1 : threaded;
    std::unique_lock lock(state().mutex);
    state().turn.wait(lock, [&] { return state().holders == 0 || state().threads == want; });
    if (state().threads != want) {
      set_blas_threads(want);
      state().threads = want;
    }
    ++state().holders;
  }
  BlasMode(const BlasMode&) = delete;
  BlasMode& operator=(const BlasMode&) = delete;
  ~BlasMode() {
    if (!active_) return;
    std::lock_guard lock(state().mutex);
    if (--state().holders == 0) state().turn.notify_all();
  }

 private:
  struct State {
    std::mutex mutex;
    std::condition_variable turn;
    int threads = 0;  // the mode set last (0: not yet)
    int holders = 0;
  };
  static State& state() {
    static State s;
    return s;
  }
  bool active_ = false;
};

}  // namespace detail

class WorkerPool {
 public:
  using Task = void (*)(void* context, std::size_t index, int worker);

  explicit WorkerPool(int workers) {
    for (int w = 1; w < workers; ++w) threads_.emplace_back([this, w] { serve(w); });
  }
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  ~WorkerPool() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  [[nodiscard]] int size() const noexcept { return static_cast<int>(threads_.size()) + 1; }

  /// Calls task(context, i, worker) for every i < n, spread over the workers, each task's
  /// products on one BLAS thread; returns when all are done and rethrows the first exception a
  /// task threw. While another call is under way, runs the tasks here, as worker 0.
  void run(std::size_t n, Task task, void* context) {
    const bool was = std::exchange(detail::single_threaded_products, true);
    struct Restore {
      bool was;
      ~Restore() { detail::single_threaded_products = was; }
    } restore{was};
    std::unique_lock busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || threads_.empty() || n < 2) {
      for (std::size_t i = 0; i < n; ++i) task(context, i, 0);
      return;
    }
    {
      std::lock_guard lock(mutex_);
      task_ = task;
      context_ = context;
      count_ = n;
      next_.store(0);
      pending_ = threads_.size();
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

  /// run() for any callable f(i, worker), which must outlive the call.
  template <class F>
  void run(std::size_t n, F&& f) {
    using Fn = std::remove_reference_t<F>;
    run(
        n, [](void* c, std::size_t i, int worker) { (*static_cast<Fn*>(c))(i, worker); },
        const_cast<void*>(static_cast<const void*>(&f)));
  }

 private:
  void work(int worker) {
    for (std::size_t i = next_.fetch_add(1); i < count_; i = next_.fetch_add(1)) {
      try {
        task_(context_, i, worker);
      } catch (...) {
        std::lock_guard lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }
  void serve(int worker) {
    detail::single_threaded_products = true;
    std::uint64_t seen = 0;
    std::unique_lock lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      lock.unlock();
      work(worker);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_;   // held for a whole run()
  std::mutex mutex_;  // guards the fields below
  std::condition_variable wake_, done_;
  Task task_ = nullptr;
  void* context_ = nullptr;
  std::size_t count_ = 0;
  std::atomic<std::size_t> next_{0};
  std::size_t pending_ = 0;
  std::uint64_t generation_ = 0;
  std::exception_ptr error_;
  bool stop_ = false;
};

/// MUON_THREADS, else the BLAS's thread count, else the hardware's (at least 1).
inline int default_workers() {
  if (const char* v = detail::env("MUON_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (end == v || *end != '\0' || n < 1 || n > 1024)
      throw std::invalid_argument(std::string("MUON_THREADS=") + v +
                                  ": expected a whole number of threads in [1, 1024]");
    return static_cast<int>(n);
  }
  if (products() == Products::blas && detail::blas_threads() > 0) return detail::blas_threads();
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

/// The process's pool, made on first use.
inline WorkerPool& worker_pool() {
  static WorkerPool pool(default_workers());
  return pool;
}

}  // namespace muon::cpu
