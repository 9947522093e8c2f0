// Complex parameters are refused with a message that says which scalars are supported.
#include <complex>

#include "muon/eigen.hpp"

#ifdef MUON_COMPILE_FAIL_CONTROL
using Scalar = float;
#else
using Scalar = std::complex<float>;
#endif

int main() {
  muon::Optimizer<muon::EigenBackend, Scalar> opt;
  return static_cast<int>(opt.num_params());
}
