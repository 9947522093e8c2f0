// A parameter must be mutable: a const matrix (or a view of const elements) cannot be
// registered, since step() writes the new weights into it.
#include "muon/adapters/eigen.hpp"  // not muon/eigen.hpp: its SVD tools add ~25 s a compile
#include "muon/backend/eigen.hpp"
#include "muon/optimizer.hpp"

int main() {
#ifdef MUON_COMPILE_FAIL_CONTROL
  Eigen::MatrixXf w = Eigen::MatrixXf::Ones(4, 3);
#else
  const Eigen::MatrixXf w = Eigen::MatrixXf::Ones(4, 3);
#endif
  const Eigen::MatrixXf g = Eigen::MatrixXf::Ones(4, 3);
  muon::Optimizer<muon::EigenBackend, float> opt;
  opt.add_muon("w", w, g);
  return static_cast<int>(opt.num_params());
}
