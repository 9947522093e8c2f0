// Quickstart: a 3-layer MLP (32 -> 64 -> 64 -> 8, tanh) fitted to a random teacher network.
// Muon updates the weight matrices, AdamW the biases, in one optimizer; the same model trained
// with AdamW alone is printed beside it. Gradients come from the example's own backward pass.
#include <muon/eigen.hpp>

#include <cstdio>
#include <random>

using Matrix = Eigen::MatrixXf;

struct Mlp {
  Matrix w[3];
  Eigen::VectorXf b[3];
  Matrix gw[3];
  Eigen::VectorXf gb[3];

  explicit Mlp(unsigned seed) {
    const int dims[4] = {32, 64, 64, 8};
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int l = 0; l < 3; ++l) {
      w[l] = Matrix::NullaryExpr(dims[l + 1], dims[l], [&] { return normal(rng); }) /
             std::sqrt(float(dims[l]));
      b[l] = Eigen::VectorXf::Zero(dims[l + 1]);
      gw[l] = Matrix::Zero(dims[l + 1], dims[l]);
      gb[l] = Eigen::VectorXf::Zero(dims[l + 1]);
    }
  }

  /// Mean squared error on (x, y); fills the gradients.
  float loss_and_gradients(const Matrix& x, const Matrix& y) {
    Matrix h[4];
    h[0] = x;
    for (int l = 0; l < 3; ++l) {
      h[l + 1] = (w[l] * h[l]).colwise() + b[l];
      if (l < 2) h[l + 1] = h[l + 1].array().tanh();
    }
    const float n = float(y.size());
    Matrix delta = 2.0f * (h[3] - y) / n;
    const float loss = (h[3] - y).squaredNorm() / n;
    for (int l = 2; l >= 0; --l) {
      gw[l] = delta * h[l].transpose();
      gb[l] = delta.rowwise().sum();
      if (l > 0) delta = (w[l].transpose() * delta).array() * (1 - h[l].array().square());
    }
    return loss;
  }
};

int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Mlp teacher(7);
  const Matrix x = Matrix::NullaryExpr(32, 512, [&] { return normal(rng); });
  Matrix y = x;
  for (int l = 0; l < 3; ++l) {
    y = (teacher.w[l] * y).colwise() + teacher.b[l];
    if (l < 2) y = y.array().tanh();
  }

  // Muon for the matrices, AdamW for the biases: one optimizer, one step().
  Mlp with_muon(3);
  muon::GroupOptions options;
  options.muon.lr = 0.02;
  options.muon.weight_decay = 0.01;
  options.adamw.lr = 3e-3;
  muon::Optimizer<muon::EigenBackend, float> hybrid(options);
  for (int l = 0; l < 3; ++l) {
    hybrid.add_muon(std::string("w") + std::to_string(l), with_muon.w[l], with_muon.gw[l]);
    hybrid.add_adamw(std::string("b") + std::to_string(l), with_muon.b[l], with_muon.gb[l]);
  }

  // Baseline: AdamW for everything (routing the matrices to AdamW).
  Mlp with_adamw(3);
  muon::Optimizer<muon::EigenBackend, float> adamw(options);
  for (int l = 0; l < 3; ++l) {
    adamw.add_adamw(std::string("w") + std::to_string(l), with_adamw.w[l], with_adamw.gw[l]);
    adamw.add_adamw(std::string("b") + std::to_string(l), with_adamw.b[l], with_adamw.gb[l]);
  }

  std::printf("step   loss (Muon + AdamW)   loss (AdamW only)\n");
  for (int step = 0; step <= 300; ++step) {
    const float lm = with_muon.loss_and_gradients(x, y);
    const float la = with_adamw.loss_and_gradients(x, y);
    if (step % 50 == 0) std::printf("%4d   %19.6f   %17.6f\n", step, lm, la);
    hybrid.step();
    adamw.step();
  }
  for (int l = 0; l < 3; ++l)
    std::printf("layer %d SVD entropy: Muon %.3f, AdamW %.3f\n", l,
                muon::svd_entropy(muon::MatrixView<const float>(muon::view(with_muon.w[l]))),
                muon::svd_entropy(muon::MatrixView<const float>(muon::view(with_adamw.w[l]))));
  return 0;
}
