#pragma once
// Internal: included by the library's own headers, not by programs.
// bfloat16 matrix products for the CPU backend's Newton–Schulz: bf16 operands, float32
// accumulation and float32 results, on the VDPBF16PS instruction of AVX512-BF16 (AMD Zen 4 and
// later, Intel Cooper Lake and Sapphire Rapids and later). One instruction multiplies 16 pairs
// of bf16 and adds each pair's two products to a float32 lane, twice the multiplies of a float
// FMA; the register tile runs at about 2.2x OpenBLAS's sgemm on one core of an AMD EPYC
// (Zen 4), and at about 200 GFLOP/s a core inside Newton-Schulz. Written here rather than taken
// from oneDNN (Debian's libdnnl 2.6 is about as fast) because oneDNN allocates on every
// execution (6 allocations per matmul, measured) and step() must not; see docs/precision.md.
//
// The layout is the classic one of GotoBLAS/BLIS (Goto and van de Geijn, "Anatomy of
// high-performance matrix multiplication", 2008): B is packed in KC x NC blocks as pairs of
// consecutive k (what the instruction reads), A in MC x KC blocks, and a 12 x 32 register tile
// accumulates in float32. Every element of C is reduced in one fixed order (KC blocks in turn,
// pairs in turn) by exactly one thread, however the work is split, so a product's bits depend
// on its operands only: the same alone, side by side with others, or on any thread count.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "muon/backend/cpu_dispatch.hpp"
#include "muon/backend/worker_pool.hpp"
#include "muon/core/matrix_view.hpp"

#if MUON_X86
#include <immintrin.h>
#endif

// The register tile's loops over its 12 rows must be unrolled for the accumulators to stay in
// registers (measured: 1.8x slower when not). nvcc's front end does not know the pragma; no
// CUDA translation unit runs these products where speed matters.
#if defined(__CUDACC__)
#define MUON_UNROLL_TILE
#else
#define MUON_UNROLL_TILE _Pragma("GCC unroll 12")
#endif

namespace muon::cpu::bf16 {

/// A bfloat16 value, as its bits.
using Bits = std::uint16_t;

/// float -> bf16, rounding to nearest even (as VCVTNEPS2BF16); NaN stays a (quiet) NaN.
inline Bits from_float(float f) {
  const auto u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<Bits>((u >> 16) | 0x40u);
  return static_cast<Bits>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float to_float(Bits b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }

namespace detail {
#if MUON_X86
/// round_row's first multiple of 16 elements, 16 at a time, with from_float's integer steps.
__attribute__((target("avx512f,avx512bw"))) inline index_t round_row_avx512(const float* src,
                                                                          Bits* dst, index_t n) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  // The maskz forms: GCC 12 warns of the undefined register the unmasked ones start from.
  const __mmask16 all = 0xffff;
  index_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i u = _mm512_loadu_si512(src + j), high = _mm512_maskz_srli_epi32(all, u, 16);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, half), _mm512_and_si512(high, one));
    r = _mm512_maskz_srli_epi32(all, r, 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, magnitude), inf);
    r = _mm512_mask_or_epi32(r, nan, high, quiet);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm512_maskz_cvtepi32_epi16(all, r));
  }
  return j;
}
#endif
}  // namespace detail

/// dst[0, n) = bf16(src[0, n)), the same bits as from_float element by element. Needs
/// cpu::has_bf16() (AVX-512 with it).
inline void round_row(const float* src, Bits* dst, index_t n) {
  index_t j = 0;
#if MUON_X86
  j = detail::round_row_avx512(src, dst, n);
#endif
  for (; j < n; ++j) dst[j] = from_float(src[j]);
}

/// A bf16 operand: element (i, l) at data[i * rs + l * cs].
struct Operand {
  const Bits* data = nullptr;
  index_t rs = 0, cs = 0;
  Bits operator()(index_t i, index_t l) const { return data[i * rs + l * cs]; }
};

inline constexpr index_t kMR = 12;   // rows of the register tile
inline constexpr index_t kNR = 32;   // columns: two 16-lane registers
inline constexpr index_t kKC = 512;  // k per packed block (measured best of 256-1024)
inline constexpr index_t kMC = 96;   // rows per packed A block (96 KB, in L2)
inline constexpr index_t kNC = 2048; // columns per packed B block

/// Packing space for one thread, for products whose dimensions are at most k rows (m) and n
/// inner and columns (k, n of a Newton-Schulz short side).
struct PackBuffers {
  std::vector<std::uint32_t> a, b;  // pairs of bf16
  static std::size_t a_size(index_t k, index_t n) {
    return static_cast<std::size_t>(std::min(kMC, round_up(k, kMR)) * std::min(kKC, round_up(n, 2)) / 2);
  }
  static std::size_t b_size(index_t n) {
    return static_cast<std::size_t>(std::min(kNC, round_up(n, kNR)) * std::min(kKC, round_up(n, 2)) / 2);
  }
  void reserve(index_t k, index_t n) {
    if (a.size() < a_size(k, n)) a.assign(a_size(k, n), 0);
    if (b.size() < b_size(n)) b.assign(b_size(n), 0);
  }
  [[nodiscard]] bool fits(index_t k, index_t n) const {
    return a.size() >= a_size(k, n) && b.size() >= b_size(n);
  }

 private:
  static index_t round_up(index_t v, index_t to) { return (v + to - 1) / to * to; }
};

namespace detail {

/// Two bf16 as the 32-bit word the instruction reads: `lo` at the lower address.
inline std::uint32_t pair(Bits lo, Bits hi) { return lo | (std::uint32_t{hi} << 16); }
inline std::uint32_t load_pair(const Bits* p) {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// Packs rows [i0, i0 + mc) and k [l0, l0 + kc) of A as micro-panels of kMR rows, each
/// [pair][row] (a pair of consecutive k per 32-bit word); rows and the odd k beyond the matrix
/// are zero.
inline void pack_a(Operand a, index_t i0, index_t mc, index_t l0, index_t kc,
                   std::uint32_t* out) {
  const index_t pairs = (kc + 1) / 2, full = kc / 2;
  for (index_t ir = 0; ir < mc; ir += kMR) {
    std::uint32_t* panel = out + ir * pairs;
    for (index_t r = 0; r < kMR; ++r) {
      if (ir + r >= mc) {
        for (index_t p = 0; p < pairs; ++p) panel[p * kMR + r] = 0;
        continue;
      }
      const index_t i = i0 + ir + r;
      if (a.cs == 1) {  // pairs lie next to each other
        const Bits* row = a.data + i * a.rs + l0;
        for (index_t p = 0; p < full; ++p) panel[p * kMR + r] = load_pair(row + 2 * p);
      } else {
        for (index_t p = 0; p < full; ++p)
          panel[p * kMR + r] = pair(a(i, l0 + 2 * p), a(i, l0 + 2 * p + 1));
      }
      if (full < pairs) panel[full * kMR + r] = pair(a(i, l0 + 2 * full), 0);
    }
  }
}

/// Packs k [l0, l0 + kc) and columns [j0, j0 + nc) of B as micro-panels of kNR columns, each
/// [pair][column]; columns and the odd k beyond the matrix are zero.
inline void pack_b(Operand b, index_t l0, index_t kc, index_t j0, index_t nc,
                   std::uint32_t* out) {
  const index_t pairs = (kc + 1) / 2, full = kc / 2;
  for (index_t jr = 0; jr < nc; jr += kNR) {
    std::uint32_t* panel = out + jr * pairs;
    const index_t width = std::min(kNR, nc - jr);
    if (b.rs == 1) {  // B^T stored row-major: a column's pairs lie next to each other
      for (index_t j = 0; j < width; ++j) {
        const Bits* col = b.data + (j0 + jr + j) * b.cs + l0;
        for (index_t p = 0; p < full; ++p) panel[p * kNR + j] = load_pair(col + 2 * p);
      }
    } else if (b.cs == 1) {  // row-major: interleave rows l and l + 1
      for (index_t p = 0; p < full; ++p) {
        const Bits* r0 = b.data + (l0 + 2 * p) * b.rs + j0 + jr;
        const Bits* r1 = r0 + b.rs;
        std::uint32_t* dst = panel + p * kNR;
        for (index_t j = 0; j < width; ++j) dst[j] = pair(r0[j], r1[j]);
      }
    } else {
      for (index_t p = 0; p < full; ++p)
        for (index_t j = 0; j < width; ++j)
          panel[p * kNR + j] = pair(b(l0 + 2 * p, j0 + jr + j), b(l0 + 2 * p + 1, j0 + jr + j));
    }
    if (full < pairs)
      for (index_t j = 0; j < width; ++j) panel[full * kNR + j] = pair(b(l0 + 2 * full, j0 + jr + j), 0);
    for (index_t p = 0; p < pairs; ++p)
      for (index_t j = width; j < kNR; ++j) panel[p * kNR + j] = 0;
  }
}

#if MUON_X86
/// v's bits as the instruction's operand type (a function: nvcc's front end refuses the cast).
__attribute__((target("avx512f,avx512bf16"))) inline __m512bh as_bf16x32(__m512i v) {
  __m512bh out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}
#endif

/// The float32 tile C[mr x nr] (element (r, j) at c[r * rs + j * cs]) = (accumulate ? C : 0) +
/// sum over `pairs` of A's rows and the packed B micro-panel. A is a packed micro-panel
/// ([pair][row] words), or with kDirect kMR full rows of a row-major bf16 matrix read in place
/// (element (r, l) at a[r * lda + l]): no packing, the broadcasts read the rows themselves.
#if MUON_X86
template <bool kDirect>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void tile(
    index_t pairs, const void* a, index_t lda, const std::uint32_t* b, float* c, index_t rs,
    index_t cs, index_t mr, index_t nr, bool accumulate) {
  __m512 acc[kMR][2];
  const bool dense = cs == 1 && mr == kMR && nr == kNR;
  alignas(64) float spill[kMR][kNR];
  if (accumulate && !dense) {
    for (index_t r = 0; r < kMR; ++r)
      for (index_t j = 0; j < kNR; ++j)
        spill[r][j] = r < mr && j < nr ? c[r * rs + j * cs] : 0.0f;
  }
MUON_UNROLL_TILE
  for (index_t r = 0; r < kMR; ++r) {
    if (!accumulate) {
      acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    } else if (dense) {
      acc[r][0] = _mm512_loadu_ps(c + r * rs);
      acc[r][1] = _mm512_loadu_ps(c + r * rs + 16);
    } else {
      acc[r][0] = _mm512_load_ps(&spill[r][0]);
      acc[r][1] = _mm512_load_ps(&spill[r][16]);
    }
  }
  for (index_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = as_bf16x32(_mm512_loadu_si512(b + p * kNR));
    const __m512bh b1 = as_bf16x32(_mm512_loadu_si512(b + p * kNR + 16));
MUON_UNROLL_TILE
    for (index_t r = 0; r < kMR; ++r) {
      const std::uint32_t word =
          kDirect ? load_pair(static_cast<const Bits*>(a) + r * lda + 2 * p)
                  : static_cast<const std::uint32_t*>(a)[p * kMR + r];
      const __m512bh av = as_bf16x32(_mm512_set1_epi32(static_cast<int>(word)));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  if (dense) {
MUON_UNROLL_TILE
    for (index_t r = 0; r < kMR; ++r) {
      _mm512_storeu_ps(c + r * rs, acc[r][0]);
      _mm512_storeu_ps(c + r * rs + 16, acc[r][1]);
    }
    return;
  }
MUON_UNROLL_TILE
  for (index_t r = 0; r < kMR; ++r) {
    _mm512_store_ps(&spill[r][0], acc[r][0]);
    _mm512_store_ps(&spill[r][16], acc[r][1]);
  }
  for (index_t r = 0; r < mr; ++r)
    for (index_t j = 0; j < nr; ++j) c[r * rs + j * cs] = spill[r][j];
}
#else  // never called: cpu::has_bf16() is false off x86
template <bool kDirect>
inline void tile(index_t, const void*, index_t, const std::uint32_t*, float*, index_t, index_t,
                 index_t, index_t, bool) {}
#endif

/// Runs f(i, worker) for every i < n on the process's workers, or on this thread alone when
/// it is one of them (side-by-side tasks). Tasks are handed out in order of i.
template <class F>
void for_each_task(std::size_t n, F& f) {
  if (::muon::cpu::detail::single_threaded_products || n < 2) {
    for (std::size_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
  worker_pool().run(n, f);
}

/// The part of C += (pc > 0) / = (pc == 0) A[rows, pc:pc+kc] B[pc:pc+kc, jc:jc+nc] that lies in
/// rows [ic, ic + mc), from B's packed block; with `lower`, tiles wholly above the diagonal are
/// skipped.
inline void row_block(Operand a, index_t ic, index_t mc, index_t pc, index_t kc, index_t jc,
                      index_t nc, const std::uint32_t* packed_b, float* c, index_t rs,
                      index_t cs, bool lower, std::uint32_t* packed_a) {
  if (lower && ic + mc <= jc) return;  // the block lies above the diagonal
  const index_t pairs = (kc + 1) / 2;
  // A row-major A with whole pairs is read in place, full tiles at least; the rest is packed.
  // Not when its rows lie a multiple of 4 KB apart: the 12 rows then share one set of the L1
  // cache and evict each other (measured at 2048 x 2048: 12% slower than packing; at
  // 1024 x 1024 reading in place is ~10% faster).
  const bool direct =
      a.cs == 1 && kc % 2 == 0 && (a.rs * static_cast<index_t>(sizeof(Bits))) % 4096 != 0;
  const index_t full_rows = direct ? mc / kMR * kMR : 0;
  if (full_rows < mc) pack_a(a, ic + full_rows, mc - full_rows, pc, kc, packed_a);
  for (index_t jr = 0; jr < nc; jr += kNR)
    for (index_t ir = 0; ir < mc; ir += kMR) {
      if (lower && jc + jr >= ic + ir + kMR) continue;
      float* out = c + (ic + ir) * rs + (jc + jr) * cs;
      const index_t mr = std::min(kMR, mc - ir), nr = std::min(kNR, nc - jr);
      if (ir < full_rows)
        tile<true>(pairs, a.data + (ic + ir) * a.rs + pc, a.rs, packed_b + jr * pairs, out, rs, cs,
                   mr, nr, pc > 0);
      else
        tile<false>(pairs, packed_a + (ir - full_rows) * pairs, 0, packed_b + jr * pairs, out, rs,
                    cs, mr, nr, pc > 0);
    }
}

}  // namespace detail

/// C (m x n float32, element (i, j) at c[i * rs + j * cs]) = A B for bf16 A (m x k) and B
/// (k x n), accumulated in float32 (each pair's products added in turn, as VDPBF16PS does:
/// rounding to nearest even, subnormals flushed to zero). With `lower` (C square), only the
/// lower triangle is guaranteed (tiles wholly above the diagonal are skipped: about half the
/// work). On the process's workers unless this thread is one of them (side-by-side tasks):
/// for each block of B, the workers pack it together, then take blocks of rows, each packing
/// its own rows of A once; `packs` holds one PackBuffers per worker. Needs cpu::has_bf16().
inline void product(index_t m, index_t n, index_t k, Operand a, Operand b, float* c, index_t rs,
                    index_t cs, bool lower, std::vector<PackBuffers>& packs) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) c[i * rs + j * cs] = 0.0f;
    return;
  }
  // Below a few MFLOP, waking the workers costs more than it saves.
  const bool small = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) < 4e6;
  const auto workers = static_cast<std::size_t>(
      small ? 1 : std::min<int>(static_cast<int>(packs.size()), worker_pool().size()));
  std::uint32_t* const shared_b = packs[0].b.data();
  const index_t row_blocks = (m + kMC - 1) / kMC;
  for (index_t jc = 0; jc < n; jc += kNC) {
    const index_t nc = std::min(kNC, n - jc), panels = (nc + kNR - 1) / kNR;
    for (index_t pc = 0; pc < k; pc += kKC) {
      const index_t kc = std::min(kKC, k - pc), pairs = (kc + 1) / 2;
      auto pack = [&](std::size_t part, int) {
        const index_t p0 = panels * static_cast<index_t>(part) / static_cast<index_t>(workers);
        const index_t p1 = panels * static_cast<index_t>(part + 1) / static_cast<index_t>(workers);
        if (p0 < p1)
          detail::pack_b(b, pc, kc, jc + p0 * kNR, std::min(nc, p1 * kNR) - p0 * kNR,
                         shared_b + p0 * kNR * pairs);
      };
      // Each element's sum runs over the k blocks in turn whichever worker computes it, so the
      // bits do not depend on the split.
      auto rows = [&](std::size_t task, int worker) {
        // Under `lower` the bottom blocks carry the most work: they go first.
        const auto block = lower ? row_blocks - 1 - static_cast<index_t>(task) : static_cast<index_t>(task);
        const index_t ic = block * kMC;
        detail::row_block(a, ic, std::min(kMC, m - ic), pc, kc, jc, nc, shared_b, c, rs, cs, lower,
                          packs[static_cast<std::size_t>(worker)].a.data());
      };
      if (workers == 1) {
        pack(0, 0);
        for (index_t t = 0; t < row_blocks; ++t) rows(static_cast<std::size_t>(t), 0);
      } else {
        detail::for_each_task(workers, pack);
        detail::for_each_task(static_cast<std::size_t>(row_blocks), rows);
      }
    }
  }
}

/// The same arithmetic in portable C++, element by element: for each pair of consecutive k in
/// turn (the odd k beyond the matrix counts as 0), add the odd product, then the even one,
/// each rounded to float32 with subnormals flushed to zero (VDPBF16PS as Intel's manual
/// specifies it). Tests compare product() with it bit for bit.
inline void reference_product(index_t m, index_t n, index_t k, Operand a, Operand b, float* c,
                              index_t rs, index_t cs) {
  const auto flush = [](float v) { return std::fpclassify(v) == FP_SUBNORMAL ? 0.0f * v : v; };
  const auto value = [&](Bits v) { return flush(to_float(v)); };
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j) {
      float acc = 0;
      for (index_t p = 0; p < k; p += 2) {
        const float odd = p + 1 < k ? value(a(i, p + 1)) * value(b(p + 1, j)) : 0.0f;
        acc = flush(flush(acc + flush(odd)) + flush(value(a(i, p)) * value(b(p, j))));
      }
      c[i * rs + j * cs] = acc;
    }
}

}  // namespace muon::cpu::bf16
