#pragma once
// The examples' model: a 3-layer MLP (32 -> 64 -> 64 -> 8, tanh) with its own backward pass,
// and the random teacher network whose outputs it learns.
#include <muon/eigen.hpp>

#include <cmath>
#include <random>

template <class S>
struct Mlp {
  using Matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  Matrix w[3];
  Vector b[3];
  Matrix gw[3];
  Vector gb[3];

  explicit Mlp(unsigned seed) {
    const int dims[4] = {32, 64, 64, 8};
    std::mt19937 rng(seed);
    std::normal_distribution<S> normal(0, 1);
    for (int l = 0; l < 3; ++l) {
      w[l] = Matrix::NullaryExpr(dims[l + 1], dims[l], [&] { return normal(rng); }) /
             std::sqrt(S(dims[l]));
      b[l] = Vector::Zero(dims[l + 1]);
      gw[l] = Matrix::Zero(dims[l + 1], dims[l]);
      gb[l] = Vector::Zero(dims[l + 1]);
    }
  }

  /// Mean squared error on (x, y); fills the gradients.
  S loss_and_gradients(const Matrix& x, const Matrix& y) {
    Matrix h[4];
    h[0] = x;
    for (int l = 0; l < 3; ++l) {
      h[l + 1] = (w[l] * h[l]).colwise() + b[l];
      if (l < 2) h[l + 1] = h[l + 1].array().tanh();
    }
    const S n = S(y.size());
    Matrix delta = S(2) * (h[3] - y) / n;
    const S loss = (h[3] - y).squaredNorm() / n;
    for (int l = 2; l >= 0; --l) {
      gw[l] = delta * h[l].transpose();
      gb[l] = delta.rowwise().sum();
      if (l > 0) delta = (w[l].transpose() * delta).array() * (1 - h[l].array().square());
    }
    return loss;
  }
};

/// n inputs x ~ N(0, 1) (32 x n) and the teacher's outputs y (8 x n).
template <class S, class Matrix = typename Mlp<S>::Matrix>
void teacher_data(int n, Matrix& x, Matrix& y) {
  std::mt19937 rng(1);
  std::normal_distribution<S> normal(0, 1);
  Mlp<S> teacher(7);
  x = Matrix::NullaryExpr(32, n, [&] { return normal(rng); });
  y = x;
  for (int l = 0; l < 3; ++l) {
    y = (teacher.w[l] * y).colwise() + teacher.b[l];
    if (l < 2) y = y.array().tanh();
  }
}
