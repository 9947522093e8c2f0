#pragma once
// Shared helpers for muon's tests: random matrices with a chosen spectrum, per-type
// tolerances, and the golden files written by tests/reference/muon_reference.py.
#include <Eigen/Core>
#include <Eigen/QR>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "muon/eigen.hpp"
#include "muon/io/npy.hpp"

namespace muon_test {

/// The golden values and tolerances of this suite are those of float32 (and float64)
/// Newton-Schulz, so its processes pin MUON_NS_PRECISION=float32 before the first CPU backend
/// reads it; a value ctest already set wins (the bf16.* entries set auto). The [bf16] cases
/// ask for bf16 by name (CpuOptions), whatever the environment says.
inline const bool float32_newton_schulz = setenv("MUON_NS_PRECISION", "float32", 0) == 0;

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Tolerances per scalar type. Float's are set from the float32 rounding of Newton-Schulz on
/// the sizes used here (observed errors are 5-20x smaller); double's leave ~1000x headroom
/// over the observed 1e-14..1e-13.
template <class T>
struct Tol;
template <>
struct Tol<float> {
  static constexpr double ns = 5e-4;        // |NS_T - NS_double| max entry
  static constexpr double trajectory = 2e-4;  // relative, after 4 optimizer steps
};
template <>
struct Tol<double> {
  static constexpr double ns = 1e-10;
  static constexpr double trajectory = 1e-10;
};

template <class T>
Mat<T> gaussian(Eigen::Index m, Eigen::Index n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d;
  Mat<T> x(m, n);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(d(rng));
  return x;
}

/// U diag(s) V^T with random orthogonal U, V and the given singular values (min(m,n) of them).
template <class T>
Mat<T> with_spectrum(Eigen::Index m, Eigen::Index n, const Eigen::VectorXd& s,
                     std::uint64_t seed) {
  const Eigen::Index k = std::min(m, n);
  Eigen::HouseholderQR<Eigen::MatrixXd> qu(gaussian<double>(m, k, seed));
  Eigen::HouseholderQR<Eigen::MatrixXd> qv(gaussian<double>(n, k, seed + 1));
  const Eigen::MatrixXd u = qu.householderQ() * Eigen::MatrixXd::Identity(m, k);
  const Eigen::MatrixXd v = qv.householderQ() * Eigen::MatrixXd::Identity(n, k);
  return (u * s.asDiagonal() * v.transpose()).cast<T>();
}

/// Writes new values into `dst`'s existing storage. The optimizer holds views, and assigning
/// a temporary Eigen matrix (`g = gaussian(...)`) would move-swap the storage out from under
/// them.
template <class D, class S>
void overwrite(D& dst, const S& src) {
  dst.array() = src.array();
}

/// Same shape and same bits (so -0 differs from +0); empty matrices compare without reading
/// their data pointer, which may be null.
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  static_assert(sizeof(typename A::Scalar) == sizeof(typename B::Scalar));
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), sizeof(typename A::Scalar) * std::size_t(a.size())) == 0);
}

template <class M>
auto cview(const M& m) {
  return muon::MatrixView<const typename M::Scalar>(muon::view(m));
}

inline std::string golden_path(const std::string& file) { return std::string(MUON_GOLDEN_DIR) + "/" + file; }
/// A file's bytes, or an empty string where it cannot be read.
inline std::string read_bytes(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

/// One line of tests/golden/cases.txt (or peer_cases.txt): kind, name, shape and key=value
/// options.
struct GoldenCase {
  std::string kind, name;
  std::vector<muon::index_t> shape;
  std::map<std::string, std::string> opt;
  double num(const std::string& k) const { return std::stod(opt.at(k)); }
};

inline std::vector<GoldenCase> golden_cases(const std::string& kind,
                                            const std::string& file = "cases.txt") {
  std::ifstream in(golden_path(file));
  std::vector<GoldenCase> out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    GoldenCase c;
    std::string shape, kv;
    ss >> c.kind >> c.name >> shape;
    std::istringstream sh(shape);
    for (std::string e; std::getline(sh, e, ',');) c.shape.push_back(std::stol(e));
    while (ss >> kv) c.opt[kv.substr(0, kv.find('='))] = kv.substr(kv.find('=') + 1);
    if (c.kind == kind) out.push_back(c);
  }
  return out;
}

}  // namespace muon_test
