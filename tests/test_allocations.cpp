// step() and Newton-Schulz allocate nothing after the first step. Every heap allocation of the
// process is counted by interposing malloc and friends (glibc), which catches operator new as
// well as the C allocations of Eigen and BLAS. Its own executable, so the hooks touch nothing
// else.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <malloc.h>

#include "test_support.hpp"

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
void count() {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}

/// Allocations made by f().
template <class F>
long allocations_in(F&& f) {
  allocations = 0;
  counting = true;
  f();
  counting = false;
  return allocations.load();
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  count();
  return __libc_malloc(n);
}
void* calloc(std::size_t n, std::size_t size) {
  count();
  return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t n) {
  count();
  return __libc_realloc(p, n);
}
void* memalign(std::size_t alignment, std::size_t n) {
  count();
  return __libc_memalign(alignment, n);
}
void* aligned_alloc(std::size_t alignment, std::size_t n) {
  count();
  return __libc_memalign(alignment, n);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t n) {
  count();
  *out = __libc_memalign(alignment, n);
  return *out ? 0 : ENOMEM;
}
}

using namespace muon_test;

// Two workers, so that step() runs its Newton-Schulz side by side (worker_pool.hpp) while
// counted; set before the first CPU backend reads it (ctest already sets
// OPENBLAS_NUM_THREADS=1, which alone would leave one worker).
const bool two_workers = setenv("MUON_THREADS", "2", 0) == 0;

// Compilers may elide an allocation whose pointer never escapes (clang does); this one escapes.
void* volatile sink = nullptr;

TEST_CASE("the counter sees allocations", "[allocations]") {
  CHECK(allocations_in([] {
          auto* v = new std::vector<float>(1000);
          sink = v->data();
          delete v;
        }) >= 1);
  CHECK(allocations_in([] {
          sink = std::malloc(64);
          std::free(sink);
        }) == 1);
}

TEMPLATE_TEST_CASE("step() allocates nothing after the first step", "[allocations]", float, double) {
  // Muon on square, wide, tall and conv weights (products large enough to need blocking);
  // AdamW on a vector and an embedding.
  Mat<TestType> w1 = gaussian<TestType>(256, 256, 1), w2 = gaussian<TestType>(192, 768, 2);
  Mat<TestType> w3 = gaussian<TestType>(768, 192, 3), conv = gaussian<TestType>(64, 576, 4);
  Mat<TestType> bias = gaussian<TestType>(1, 256, 5), emb = gaussian<TestType>(500, 64, 6);
  const Mat<TestType> g1 = w1, g2 = w2, g3 = w3, gc = conv, gb = bias, ge = emb;
  muon::Optimizer<muon::EigenBackend, TestType> opt;
  CHECK((two_workers && opt.backend().workers() == 2));
  opt.add_muon("w1", w1, g1);
  opt.add_muon("w2", w2, g2);
  opt.add_muon("w3", w3, g3);
  opt.add_muon("conv", muon::TensorView<TestType>{conv.data(), {64, 64, 3, 3}},
               muon::TensorView<const TestType>{gc.data(), {64, 64, 3, 3}});
  opt.add_adamw("bias", bias, gb);
  opt.add_adamw("emb", emb, ge);
  opt.step();  // warm-up: a BLAS may start its threads and buffers here
  const long one = allocations_in([&] { opt.step(); });
  const long three = allocations_in([&] {
    for (int i = 0; i < 3; ++i) opt.step();
  });
  CHECK(three == 3 * one);  // nothing grows from step to step
#if MUON_USE_CBLAS
  // muon and the BLAS allocate nothing. (ctest runs this with OPENBLAS_NUM_THREADS=1: threaded
  // OpenBLAS mallocs a job table inside each SYRK/SYMM call, which is OpenBLAS's own doing.)
  CHECK(one == 0);
#else
  // Eigen's own product kernels allocate their packing buffers for large products; a CBLAS
  // build (MUON_BLAS) is allocation-free.
  WARN("Eigen kernels: " << one << " allocations per step");
#endif
}

TEST_CASE("step() with bf16 Newton-Schulz allocates nothing after the first step",
          "[allocations][bf16]") {
  if (!muon::cpu::has_bf16()) {
    WARN("this CPU has no AVX512-BF16: nothing to check");
    return;
  }
  // side by side (the small ones) and alone, its products split over the workers (big: past
  // EigenBackend::kSideBySideMaxCost); square, wide and tall
  Mat<float> w1 = gaussian<float>(256, 256, 1), w2 = gaussian<float>(192, 768, 2);
  Mat<float> w3 = gaussian<float>(768, 192, 3), big = gaussian<float>(1100, 4000, 4);
  const Mat<float> g1 = w1, g2 = w2, g3 = w3, gb = big;
  muon::Optimizer<muon::EigenBackend, float> opt(
      {}, {}, muon::EigenBackend(muon::CpuOptions{muon::cpu::Precision::bfloat16}));
  opt.add_muon("w1", w1, g1);
  opt.add_muon("w2", w2, g2);
  opt.add_muon("w3", w3, g3);
  opt.add_muon("big", big, gb);
  opt.step();
  CHECK(allocations_in([&] { opt.step(); }) == 0);
}
