#pragma once
// Everything muon offers on the CPU with Eigen: the optimizer, the Eigen backend and adapters,
// the SVD reference and diagnostics.
#include "muon/adapters/eigen.hpp"
#include "muon/backend/eigen.hpp"
#include "muon/diagnostics.hpp"
#include "muon/muon.hpp"
#include "muon/reference.hpp"

// The compiled mode (CMake target muon::compiled, which defines MUON_COMPILED): the CPU
// optimizer for float and double is compiled once, in that library; a program including this
// header leaves step(), save_state() and load_state() (and all they call) and every rule's
// step to it, and compiles the rest (docs/building.md). Same headers and flags, so the same
// code runs.
#if defined(MUON_COMPILED) && MUON_COMPILED
namespace muon {
template <>
inline constexpr bool detail::compiled_elsewhere<Optimizer<EigenBackend, float>> = true;
template <>
inline constexpr bool detail::compiled_elsewhere<Optimizer<EigenBackend, double>> = true;
extern template class detail::OptimizerCore<Optimizer<EigenBackend, float>, EigenBackend, float,
                                            detail::WholeMatrix>;
extern template class detail::OptimizerCore<Optimizer<EigenBackend, double>, EigenBackend, double,
                                            detail::WholeMatrix>;
extern template class Optimizer<EigenBackend, float>;
extern template class Optimizer<EigenBackend, double>;
}  // namespace muon
#endif
