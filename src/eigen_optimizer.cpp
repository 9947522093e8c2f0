// The compiled mode's library (CMake target muon::compiled): muon::Optimizer on the Eigen
// backend for float and double, instantiated once here. Programs that link it see these
// instantiations declared extern by muon/eigen.hpp and do not compile them again.
#include "muon/eigen.hpp"

namespace muon {
template class detail::OptimizerCore<Optimizer<EigenBackend, float>, EigenBackend, float,
                                     detail::WholeMatrix>;
template class detail::OptimizerCore<Optimizer<EigenBackend, double>, EigenBackend, double,
                                     detail::WholeMatrix>;
template class Optimizer<EigenBackend, float>;
template class Optimizer<EigenBackend, double>;
}  // namespace muon
