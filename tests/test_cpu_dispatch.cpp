// The CPU's instruction set, the BLAS's kernel, and the choice muon::cpu::configure() makes.
// ctest also runs the [dispatch] cases with OPENBLAS_CORETYPE and MUON_BLAS_DISPATCH=keep set
// (kernels.* and dispatch.keep), so each branch below is exercised.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "muon/backend/cpu_dispatch.hpp"
#include "muon/backend/eigen.hpp"

using muon::cpu::Isa;

namespace {

// This binary links Eigen's product kernels before main, as a program must before its first
// backend when MUON_PRODUCTS=eigen is set (the kernels.eigen_products run); a CBLAS build
// leaves them out otherwise (the header_only.* tests check a program that does not link them).
const bool eigen_products_linked = (muon::EigenBackend::link_eigen_products(), true);

/// The level /proc/cpuinfo's flags imply (the kernel lists only what it has enabled); none
/// when there is no /proc/cpuinfo.
Isa isa_from_proc_cpuinfo() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    std::set<std::string> f;
    for (std::string w; words >> w;) f.insert(w);
    auto has = [&](const char* x) { return f.count(x) > 0; };
    if (has("avx512f") && has("avx512dq") && has("avx512bw") && has("avx512vl") && has("avx2") &&
        has("fma"))
      return Isa::avx512;
    if (has("avx2") && has("fma")) return Isa::avx2;
    if (has("avx")) return Isa::avx;
    return Isa::baseline;
  }
  return Isa::none;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

TEST_CASE("cpu_isa() agrees with the flags the OS lists", "[dispatch]") {
  const Isa listed = isa_from_proc_cpuinfo();
  if (listed == Isa::none || !MUON_X86) {
    WARN("no x86 /proc/cpuinfo here; nothing to compare");
    return;
  }
  INFO("cpuid: " << muon::cpu::name(muon::cpu::cpu_isa()) << ", /proc/cpuinfo: "
                 << muon::cpu::name(listed));
  CHECK(muon::cpu::cpu_isa() == listed);
}

TEST_CASE("OpenBLAS kernel families map to the levels they need", "[dispatch]") {
  using muon::cpu::openblas_kernel_isa;
  CHECK(openblas_kernel_isa("Prescott") == Isa::baseline);
  CHECK(openblas_kernel_isa("Nehalem") == Isa::baseline);
  CHECK(openblas_kernel_isa("Sandybridge") == Isa::avx);
  CHECK(openblas_kernel_isa("Haswell") == Isa::avx2);
  CHECK(openblas_kernel_isa("zen") == Isa::avx2);
  CHECK(openblas_kernel_isa("SKYLAKEX") == Isa::avx512);
  CHECK(openblas_kernel_isa("Cooperlake") == Isa::avx512);
  CHECK(openblas_kernel_isa("NoSuchCore") == Isa::none);
  CHECK(openblas_kernel_isa("") == Isa::none);
  for (Isa level : {Isa::avx, Isa::avx2, Isa::avx512})
    CHECK(openblas_kernel_isa(muon::cpu::openblas_kernel_for(level)) == level);
  CHECK(muon::cpu::openblas_kernel_for(Isa::baseline) == nullptr);
}

TEST_CASE("the products run at the CPU's level unless the user chose otherwise", "[dispatch]") {
  const muon::cpu::Report& r = muon::cpu::configure();
  INFO(r.summary() << " | " << r.blas << " | kept: " << r.kept_because);
  CHECK(&r == &muon::cpu::report());
  CHECK(r.summary().rfind("CPU ", 0) == 0);
  if (!r.blas_linked) {
    CHECK(r.products == muon::cpu::Products::eigen);
    return;
  }
  if (r.kernel.empty()) {
    WARN("the BLAS is not OpenBLAS (no openblas_get_corename): kernel unknown, nothing chosen");
    CHECK(r.redispatched_from.empty());
    CHECK(!r.below_cpu());
    return;
  }
  // The warning is about the engine in use: the BLAS's kernel, or Eigen's compiled level.
  const bool on_blas = r.products == muon::cpu::Products::blas;
  CHECK(r.products_isa == (on_blas ? r.kernel_isa : muon::cpu::eigen_kernel_isa()));
  CHECK(r.below_cpu() == (r.products_isa < r.cpu));
  CHECK(r.warning().empty() == !r.below_cpu());
  if (on_blas) CHECK(r.summary().find(r.kernel) != std::string::npos);
  if (const char* forced = std::getenv("OPENBLAS_CORETYPE"); forced && *forced) {
    // The user's kernel, never redone; a warning tells when it is below the CPU.
    CHECK(lower(r.kernel) == lower(forced));
    CHECK(r.redispatched_from.empty());
    if (r.kernel_isa < r.cpu) CHECK(r.kept_because == "OPENBLAS_CORETYPE is set");
  } else if (const char* d = std::getenv("MUON_BLAS_DISPATCH");
             d && std::string(d) == "keep") {
    CHECK(r.redispatched_from.empty());
    if (r.kernel_isa < r.cpu) CHECK(r.kept_because == "MUON_BLAS_DISPATCH=keep");
  } else if (r.blas.find("DYNAMIC_ARCH") != std::string::npos && r.cpu >= Isa::avx) {
    // Every DYNAMIC_ARCH OpenBLAS has a kernel family for each level (see openblas_kernel_for).
    CHECK(r.kernel_isa == r.cpu);
    CHECK(r.kept_because.empty());
    if (!r.redispatched_from.empty())
      CHECK(muon::cpu::openblas_kernel_isa(r.redispatched_from) < r.cpu);
  }
}

TEST_CASE("set_products switches the engine and the report with it", "[dispatch]") {
  REQUIRE(eigen_products_linked);
  CHECK(muon::cpu::detail::eigen_products_linked());
  const muon::cpu::Products before = muon::cpu::products();
  muon::cpu::set_products(muon::cpu::Products::eigen);
  CHECK(muon::cpu::products() == muon::cpu::Products::eigen);
  CHECK(muon::cpu::report().products == muon::cpu::Products::eigen);
  CHECK(muon::cpu::report().products_isa == muon::cpu::eigen_kernel_isa());
  CHECK(muon::cpu::report().summary().find("Eigen kernels") != std::string::npos);
  if (muon::cpu::report().blas_linked) {
    muon::cpu::set_products(muon::cpu::Products::blas);
    CHECK(muon::cpu::products() == muon::cpu::Products::blas);
    CHECK(muon::cpu::report().products_isa == muon::cpu::report().kernel_isa);
  } else {
    CHECK_THROWS_WITH(muon::cpu::set_products(muon::cpu::Products::blas),
                      Catch::Contains("set_products(blas)"));
  }
  muon::cpu::set_products(before);
}
