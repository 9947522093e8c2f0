#pragma once
// What the CPU can run and what the CPU backend's products actually run on.
//
// A BLAS that dispatches by CPU model (OpenBLAS's DYNAMIC_ARCH builds do) falls back to its
// oldest x86-64 kernels on a model it does not know, which is what virtual machines and newer
// CPUs often are: Debian's OpenBLAS 0.3.21 runs its Prescott (SSE3) kernels on an AVX-512 Xeon
// whose model postdates it, 4-6x below the machine's speed. Here the instruction set is read
// from cpuid (features the CPU and the OS both enable, not model numbers), compared with the
// kernel the BLAS reports, and, where the BLAS runs below the CPU and can be re-pointed, its
// dispatch is redone once for the kernel family the features support (OpenBLAS's own
// OPENBLAS_CORETYPE mechanism, applied from inside the process). Where it cannot, a one-time
// warning says so. Environment:
//   OPENBLAS_CORETYPE=<name>  the user's choice of OpenBLAS kernel: respected, never redone;
//   MUON_BLAS_DISPATCH=keep   leave the BLAS's own choice (the warning still tells); `auto`
//                             (the default) redoes it;
//   MUON_PRODUCTS=eigen       run the products on Eigen's kernels instead of the BLAS (`blas`,
//                             the default, where the build has one; a CBLAS build must have
//                             called EigenBackend::link_eigen_products() first);
//   MUON_NS_PRECISION=<p>     what CpuOptions' automatic Newton-Schulz precision means:
//                             `auto` (the default: bfloat16 where the CPU multiplies bf16 in
//                             hardware, float32 elsewhere), `float32` or `bfloat16`.
// Any other value is refused (std::invalid_argument naming the variable) when the first CPU
// backend is made.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define MUON_X86 1
#else
#define MUON_X86 0
#endif
#if MUON_USE_CBLAS
#include <cblas.h>  // OpenBLAS's declares openblas_get_config() and openblas_get_corename()
#endif
#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#define MUON_HAVE_DLSYM 1
#else
#define MUON_HAVE_DLSYM 0
#endif

namespace muon::cpu {

/// x86-64 instruction-set levels that matter for GEMM kernels, in increasing order.
/// `avx2` means AVX2 with FMA; `avx512` means AVX-512 F, DQ, BW and VL (what the SkylakeX
/// family of kernels uses). `none` is a CPU that is not x86 (no claim is made there).
enum class Isa { none, baseline, avx, avx2, avx512 };

inline const char* name(Isa isa) {
  switch (isa) {
    case Isa::baseline: return "SSE2-SSE4";
    case Isa::avx: return "AVX";
    case Isa::avx2: return "AVX2+FMA";
    case Isa::avx512: return "AVX-512";
    case Isa::none: break;
  }
  return "not x86";
}

/// The highest level the CPU supports and the OS has enabled (XSAVE state for the vector
/// registers: a CPU with AVX-512 under an OS that does not save zmm registers cannot use it).
inline Isa cpu_isa() {
#if MUON_X86
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return Isa::baseline;
  const bool osxsave = (ecx >> 27) & 1u, avx = (ecx >> 28) & 1u, fma = (ecx >> 12) & 1u;
  if (!osxsave || !avx) return Isa::baseline;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const unsigned long long xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  if ((xcr0 & 0x6u) != 0x6u) return Isa::baseline;  // xmm and ymm state
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return Isa::avx;
  const bool avx2 = (ebx >> 5) & 1u;
  const bool avx512 = ((ebx >> 16) & 1u) && ((ebx >> 17) & 1u) && ((ebx >> 30) & 1u) &&
                      ((ebx >> 31) & 1u);                  // F, DQ, BW, VL
  const bool zmm_state = (xcr0 & 0xE0u) == 0xE0u;       // opmask, zmm0-15 high, zmm16-31
  if (avx2 && fma && avx512 && zmm_state) return Isa::avx512;
  if (avx2 && fma) return Isa::avx2;
  return Isa::avx;
#else
  return Isa::none;
#endif
}

/// Whether the CPU multiplies bfloat16 in hardware: AVX512-BF16 (VDPBF16PS), with AVX-512
/// enabled by the OS. AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later.
inline bool has_bf16() {
#if MUON_X86
  if (cpu_isa() != Isa::avx512) return false;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return ((eax >> 5) & 1u) != 0;  // CPUID.(EAX=7,ECX=1):EAX[5]
#else
  return false;
#endif
}

/// The storage precision of the CPU backend's Newton-Schulz products for float matrices
/// (double matrices always run in double). `automatic`: bfloat16 where the CPU multiplies bf16
/// in hardware (has_bf16), float32 elsewhere, unless MUON_NS_PRECISION says otherwise.
enum class Precision { automatic, float32, bfloat16 };

inline const char* name(Precision p) {
  switch (p) {
    case Precision::automatic: return "auto";
    case Precision::float32: return "float32";
    case Precision::bfloat16: return "bfloat16";
  }
  return "?";
}

/// The level an OpenBLAS kernel family needs (`openblas_get_corename()`'s names, any case);
/// `none` for a name this table does not know.
inline Isa openblas_kernel_isa(std::string_view core) {
  std::string n(core);
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (const char* k : {"skylakex", "cooperlake", "sapphirerapids"})
    if (n == k) return Isa::avx512;
  for (const char* k : {"haswell", "zen", "skylake"})
    if (n == k) return Isa::avx2;
  for (const char* k : {"sandybridge", "bulldozer", "piledriver", "steamroller", "excavator"})
    if (n == k) return Isa::avx;
  for (const char* k : {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "nano",
                        "opteron", "opteron_sse3", "barcelona", "bobcat", "katmai",
                        "coppermine", "northwood", "banias", "athlon"})
    if (n == k) return Isa::baseline;
  return Isa::none;
}

/// The OpenBLAS kernel family that runs at a level (the oldest that reaches it, which every
/// DYNAMIC_ARCH build since 0.3.10 has).
inline const char* openblas_kernel_for(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "SkylakeX";
    case Isa::avx2: return "Haswell";
    case Isa::avx: return "Sandybridge";
    default: return nullptr;
  }
}

/// The level Eigen's own kernels were compiled for (the compiler's -m flags).
constexpr Isa eigen_kernel_isa() {
#if !MUON_X86
  return Isa::none;
#elif defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__)
  return Isa::avx512;
#elif defined(__AVX2__) && defined(__FMA__)
  return Isa::avx2;
#elif defined(__AVX__)
  return Isa::avx;
#else
  return Isa::baseline;
#endif
}

/// Which kernels run the CPU backend's matrix products.
enum class Products { blas, eigen };

/// What `report()` found: the CPU, the BLAS and its kernel, the engine the products run on.
struct Report {
  Isa cpu = Isa::none;
  bool blas_linked = false;      // built with a CBLAS (MUON_USE_CBLAS)
  std::string blas;              // e.g. "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ..."; "" if unknown
  std::string kernel;            // the BLAS's kernel family ("SkylakeX"); "" if it does not say
  Isa kernel_isa = Isa::none;    // the level that kernel needs (none: unknown)
  std::string redispatched_from; // the kernel the BLAS had chosen, when muon redid the choice
  std::string kept_because;      // why a below-ISA kernel was left as it is
  Products products = Products::blas;
  Isa products_isa = Isa::none;  // the level the products run at (none: unknown)
  bool bf16 = false;             // the CPU multiplies bf16 in hardware (has_bf16)
  // what Precision::automatic resolves to: float32 (no bf16 hardware, or MUON_NS_PRECISION=
  // float32), bfloat16 (MUON_NS_PRECISION=bfloat16), or automatic (bf16 unless the Gram form
  // is asked for by name)
  Precision automatic = Precision::float32;
  /// True when the products run on kernels known to be below what the CPU can run.
  bool below_cpu() const {
    return cpu != Isa::none && products_isa != Isa::none && products_isa < cpu;
  }
  /// One line: "CPU AVX-512 | products: OpenBLAS 0.3.21, SkylakeX kernels (AVX-512; ...)".
  std::string summary() const {
    std::string s = std::string("CPU ") + name(cpu) + " | products: ";
    if (products == Products::eigen) {
      s += std::string("Eigen kernels (") + name(products_isa) + ")";
    } else {
      std::string lib = blas.empty() ? std::string("CBLAS") : blas.substr(0, blas.find(' ', 9));
      s += lib;
      if (!kernel.empty()) s += ", " + kernel + " kernels (" + name(kernel_isa) + ")";
      if (!redispatched_from.empty()) s += ", re-dispatched from " + redispatched_from;
    }
    if (below_cpu()) s += ", BELOW the CPU";
    return s;
  }
  /// The same with the Newton-Schulz engine of float matrices under `precision` (resolved:
  /// automatic there means bf16): "... | float Newton-Schulz: bf16 products on AVX512-BF16 ...".
  std::string summary(Precision precision) const {
    return summary() + " | float Newton-Schulz: " +
           (precision == Precision::float32 ? "float32 products"
                                            : "bf16 products on AVX512-BF16 (muon's kernels)");
  }
  /// The one-time warning configure() prints; empty when the products run at the CPU's level.
  std::string warning() const {
    if (!below_cpu()) return {};
    return "muon: matrix products run below this CPU's instruction set (" + summary() + ")" +
           (kept_because.empty() ? std::string() : ": " + kept_because) +
           "; expect a fraction of its speed. See muon::cpu::report() and docs/speed.md.";
  }
};

namespace detail {

inline const char* env(const char* key) {
  const char* v = std::getenv(key);
  return v && *v ? v : nullptr;
}

/// The value of an environment variable that takes one of a few words; the first when unset.
/// Any other value is refused, naming the variable and the words.
inline std::string_view env_choice(const char* key,
                                   std::initializer_list<std::string_view> words) {
  const char* v = env(key);
  if (!v) return *words.begin();
  for (std::string_view w : words)
    if (v == w) return w;
  std::string expected;
  for (std::string_view w : words) expected += (expected.empty() ? "" : ", ") + std::string(w);
  throw std::invalid_argument(std::string(key) + "=" + v + ": expected one of " + expected);
}

#if MUON_HAVE_DLSYM
template <class F>
F* blas_symbol(const char* symbol) {
  return reinterpret_cast<F*>(dlsym(RTLD_DEFAULT, symbol));
}
#else
template <class F>
F* blas_symbol(const char*) {
  return nullptr;
}
#endif

// Called directly when the CBLAS header is OpenBLAS's (which also keeps the library linked
// under --as-needed); looked up at run time otherwise.
#ifdef OPENBLAS_CONFIG_H
inline std::string openblas_config() { return openblas_get_config(); }
inline std::string openblas_core() { return openblas_get_corename(); }
#else
inline std::string openblas_string(const char* symbol) {
  auto* f = blas_symbol<char*()>(symbol);
  return f ? std::string(f()) : std::string();
}
inline std::string openblas_config() { return openblas_string("openblas_get_config"); }
inline std::string openblas_core() { return openblas_string("openblas_get_corename"); }
#endif

/// Redoes OpenBLAS's kernel choice for `core` (its DYNAMIC_ARCH dispatch reads
/// OPENBLAS_CORETYPE when it runs; it runs again after its quit). Must not race with a BLAS call
/// on another thread: it is done once, when the first CPU backend is made.
inline bool redo_openblas_dispatch(const char* core) {
  auto* quit = blas_symbol<void()>("gotoblas_dynamic_quit");
  auto* init = blas_symbol<void()>("gotoblas_dynamic_init");
  if (!quit || !init) return false;
  setenv("OPENBLAS_CORETYPE", core, 1);
  quit();
  init();
  unsetenv("OPENBLAS_CORETYPE");
  return true;
}

#if MUON_USE_CBLAS
inline constexpr bool blas_linked = true;
#else
inline constexpr bool blas_linked = false;
#endif

inline std::atomic<int>& products_setting() {
  static std::atomic<int> p{blas_linked ? static_cast<int>(Products::blas)
                                        : static_cast<int>(Products::eigen)};
  return p;
}

/// Whether the program has Eigen's product kernels: always without a CBLAS; with one, once
/// EigenBackend::link_eigen_products() ran.
inline std::atomic<bool>& eigen_products_linked() {
  static std::atomic<bool> linked{!blas_linked};
  return linked;
}
/// Refuses `asked` (what chose Eigen's kernels) when the program has not linked them.
inline void require_eigen_products(const std::string& asked) {
  if (!eigen_products_linked())
    throw std::invalid_argument(asked +
                                ": this program has not linked Eigen's product kernels; call "
                                "muon::EigenBackend::link_eigen_products() before making the "
                                "first backend");
}

inline Report& the_report() {
  static Report r;
  return r;
}

/// Reads the CPU and the BLAS, and redoes the BLAS's dispatch where it runs below the CPU.
inline Report inspect_and_redispatch() {
  Report r;
  r.cpu = cpu_isa();
  r.blas_linked = blas_linked;
  if (!blas_linked) return r;
  r.blas = openblas_config();
  r.kernel = openblas_core();
  r.kernel_isa = openblas_kernel_isa(r.kernel);
  if (r.cpu == Isa::none || r.kernel_isa == Isa::none || r.kernel_isa >= r.cpu) return r;
  const char* target = openblas_kernel_for(r.cpu);
  if (env("OPENBLAS_CORETYPE")) {
    r.kept_because = "OPENBLAS_CORETYPE is set";
  } else if (env_choice("MUON_BLAS_DISPATCH", {"auto", "keep"}) == "keep") {
    r.kept_because = "MUON_BLAS_DISPATCH=keep";
  } else if (r.blas.find("DYNAMIC_ARCH") == std::string::npos) {
    r.kept_because = "the BLAS is built for one CPU model (no DYNAMIC_ARCH)";
  } else if (!target || !redo_openblas_dispatch(target)) {
    r.kept_because = "the BLAS offers no way to redo its dispatch";
  } else {
    r.redispatched_from = r.kernel;
    r.blas = openblas_config();  // names the kernel in use
    r.kernel = openblas_core();
    r.kernel_isa = openblas_kernel_isa(r.kernel);
    if (r.kernel_isa < r.cpu) r.kept_because = "the BLAS has no kernel for this CPU";
  }
  return r;
}

inline void set_engine(Report& r, Products p) {
  r.products = p;
  r.products_isa = p == Products::eigen ? eigen_kernel_isa() : r.kernel_isa;
}

}  // namespace detail

/// Inspects the CPU and the BLAS once per process, redoes the BLAS's kernel choice where it
/// runs below the CPU (see the top of this file), picks the product engine (MUON_PRODUCTS) and
/// warns once on stderr if the products still run below the CPU. The CPU backend calls it when
/// it is made; call it yourself first if other threads of yours may be inside the BLAS then.
inline const Report& configure() {
  static std::once_flag once;
  std::call_once(once, [] {
    const bool eigen = detail::env_choice("MUON_PRODUCTS", {"blas", "eigen"}) == "eigen";
    if (eigen) detail::require_eigen_products("MUON_PRODUCTS=eigen");
    (void)detail::env_choice("MUON_BLAS_DISPATCH", {"auto", "keep"});
    const std::string_view ns = detail::env_choice("MUON_NS_PRECISION", {"auto", "float32", "bfloat16"});
    Report r = detail::inspect_and_redispatch();
    r.bf16 = has_bf16();
    if (ns == "bfloat16" && !r.bf16)
      throw std::invalid_argument(
          "MUON_NS_PRECISION=bfloat16: this CPU does not multiply bf16 in hardware "
          "(no AVX512-BF16); use auto or float32");
    r.automatic = ns == "float32" || !r.bf16 ? Precision::float32
                  : ns == "bfloat16"        ? Precision::bfloat16
                                            : Precision::automatic;
    if (eigen) detail::products_setting() = static_cast<int>(Products::eigen);
    detail::set_engine(r, static_cast<Products>(detail::products_setting().load()));
    if (r.below_cpu()) std::fprintf(stderr, "%s\n", r.warning().c_str());
    detail::the_report() = r;
  });
  return detail::the_report();
}

/// What configure() found and chose.
inline const Report& report() { return configure(); }

/// The engine of the CPU backend's products now.
inline Products products() {
  return static_cast<Products>(detail::products_setting().load(std::memory_order_relaxed));
}

/// Chooses the engine of the products for the whole process (MUON_PRODUCTS=eigen does it from
/// the environment). Not to be called while another thread runs a product. `blas` needs a
/// build with a CBLAS (MUON_USE_CBLAS); `eigen`, in a build with one, a program that linked
/// Eigen's kernels (EigenBackend::link_eigen_products()).
inline void set_products(Products p) {
  if (p == Products::blas && !detail::blas_linked)
    throw std::invalid_argument(
        "muon::cpu::set_products(blas): this build has no CBLAS (configure with MUON_BLAS)");
  if (p == Products::eigen) detail::require_eigen_products("muon::cpu::set_products(eigen)");
  configure();
  detail::products_setting() = static_cast<int>(p);
  detail::set_engine(detail::the_report(), p);
}

}  // namespace muon::cpu
