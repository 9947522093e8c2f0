// A temporary that owns its memory cannot be registered: it is freed as the call returns, and
// the optimizer would read freed memory at every step. A temporary block of a named matrix is
// a view and registers (the control).
#include "muon/adapters/eigen.hpp"  // not muon/eigen.hpp: its SVD tools add ~25 s a compile
#include "muon/backend/eigen.hpp"
#include "muon/optimizer.hpp"

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
