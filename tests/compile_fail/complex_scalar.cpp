// Complex parameters are refused with a message that says which scalars are supported.
#include <complex>

#include "muon/adapters/eigen.hpp"  // not muon/eigen.hpp: its SVD tools add ~25 s a compile
#include "muon/backend/eigen.hpp"
#include "muon/optimizer.hpp"

#ifdef MUON_COMPILE_FAIL_CONTROL
using Scalar = float;
#else
using Scalar = std::complex<float>;
#endif

int main() {
  muon::Optimizer<muon::EigenBackend, Scalar> opt;
  return static_cast<int>(opt.num_params());
}
