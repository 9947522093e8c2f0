// A temporary that owns its memory cannot be registered: it is freed as the call returns, and
// the optimizer would read freed memory at every step. A temporary block of a named matrix is
// a view and registers (the control).
#include "muon/eigen.hpp"

int main() {
  Eigen::MatrixXf w = Eigen::MatrixXf::Ones(4, 3);
  Eigen::MatrixXf g = Eigen::MatrixXf::Ones(4, 3);
  muon::Optimizer<muon::EigenBackend, float> opt;
#ifdef MUON_COMPILE_FAIL_CONTROL
  opt.add_muon("w", w, g.block(0, 0, 4, 3));
#else
  opt.add_muon("w", w, Eigen::MatrixXf(g));
#endif
  return static_cast<int>(opt.num_params());
}
