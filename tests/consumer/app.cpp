// A consumer of muon: trains y = W x on a fixed teacher with Muon and checks the loss falls.
#include <muon/eigen.hpp>

#include <cstdio>

int main() {
  const Eigen::MatrixXf teacher = Eigen::MatrixXf::Random(16, 16);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(16, 64);
  Eigen::MatrixXf w = Eigen::MatrixXf::Zero(16, 16), grad(16, 16);
  muon::GroupOptions options;
  options.muon.lr = 0.05;
  options.muon.weight_decay = 0;
  muon::Optimizer<muon::EigenBackend, float> opt(options);
  opt.add_muon("w", w, grad);
  auto loss = [&] { return (w * x - teacher * x).squaredNorm() / float(x.size()); };
  const float first = loss();
  for (int step = 0; step < 50; ++step) {
    grad = 2.0f * (w * x - teacher * x) * x.transpose() / float(x.size());
    opt.step();
  }
  std::printf("muon %s: loss %.4f -> %.4f\n", MUON_VERSION_STRING, first, loss());
  return loss() < 0.5f * first ? 0 : 1;
}
