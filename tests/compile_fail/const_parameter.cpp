// A parameter must be mutable: a const matrix (or a view of const elements) cannot be
// registered, since step() writes the new weights into it.
#include "muon/eigen.hpp"

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
