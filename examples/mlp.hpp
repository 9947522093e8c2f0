#pragma once
// The examples' model: a fully connected network with its own backward pass (Eigen, one column
// per sample), and the random teacher network whose outputs the quickstart learns.
#include <muon/eigen.hpp>

#include <cmath>
#include <random>
#include <vector>

enum class Activation { linear, tanh, silu };

template <class S>
struct Mlp {
  using Matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  std::vector<Matrix> w, gw;  // layer l maps dims[l] -> dims[l + 1]
  std::vector<Vector> b, gb;  // empty when the network has no biases
  Activation activation;

  /// Weights drawn N(0, 1 / fan_in), biases zero; the activation follows every layer but the last.
  Mlp(const std::vector<int>& dims, Activation act, bool biases, unsigned seed)
      : activation(act) {
    std::mt19937 rng(seed);
    std::normal_distribution<S> normal(0, 1);
    for (std::size_t l = 0; l + 1 < dims.size(); ++l) {
      w.push_back(Matrix::NullaryExpr(dims[l + 1], dims[l], [&] { return normal(rng); }) /
                  std::sqrt(S(dims[l])));
      gw.push_back(Matrix::Zero(dims[l + 1], dims[l]));
      if (biases) {
        b.push_back(Vector::Zero(dims[l + 1]));
        gb.push_back(Vector::Zero(dims[l + 1]));
      }
    }
  }
  /// The quickstart's network: 32 -> 64 -> 64 -> 8, tanh, with biases.
  static Mlp quickstart(unsigned seed) { return Mlp({32, 64, 64, 8}, Activation::tanh, true, seed); }

  [[nodiscard]] int layers() const { return int(w.size()); }

  Matrix forward(const Matrix& x) const {
    Matrix h = x;
    for (int l = 0; l < layers(); ++l) {
      Matrix z = affine(l, h);
      h = l + 1 < layers() ? activate(z) : z;
    }
    return h;
  }

  /// Mean squared error on (x, y) over all entries (torch's MSELoss); fills the gradients.
  S loss_and_gradients(const Matrix& x, const Matrix& y) {
    std::vector<Matrix> h(layers() + 1), z(layers());
    h[0] = x;
    for (int l = 0; l < layers(); ++l) {
      z[l] = affine(l, h[l]);
      h[l + 1] = l + 1 < layers() ? activate(z[l]) : z[l];
    }
    const S n = S(y.size());
    Matrix delta = S(2) * (h.back() - y) / n;
    const S loss = (h.back() - y).squaredNorm() / n;
    for (int l = layers() - 1; l >= 0; --l) {
      gw[l].noalias() = delta * h[l].transpose();
      if (!b.empty()) gb[l] = delta.rowwise().sum();
      if (l > 0) delta = (w[l].transpose() * delta).cwiseProduct(derivative(z[l - 1], h[l]));
    }
    return loss;
  }

 private:
  Matrix affine(int l, const Matrix& h) const {
    Matrix z = w[l] * h;
    if (!b.empty()) z.colwise() += b[l];
    return z;
  }
  Matrix activate(const Matrix& z) const {
    switch (activation) {
      case Activation::tanh: return z.array().tanh();
      case Activation::silu: return z.array() / (1 + (-z.array()).exp());
      case Activation::linear: break;
    }
    return z;
  }
  /// d act(z) / dz, given z and act(z).
  Matrix derivative(const Matrix& z, const Matrix& a) const {
    switch (activation) {
      case Activation::tanh: return 1 - a.array().square();
      case Activation::silu: {  // silu'(z) = sigma(z) (1 + z (1 - sigma(z)))
        const auto sigma = (1 + (-z.array()).exp()).inverse();
        return sigma * (1 + z.array() * (1 - sigma));
      }
      case Activation::linear: break;
    }
    return Matrix::Ones(z.rows(), z.cols());
  }
};

/// n inputs x ~ N(0, 1) (32 x n) and the quickstart teacher's outputs y (8 x n).
template <class S, class Matrix = typename Mlp<S>::Matrix>
void teacher_data(int n, Matrix& x, Matrix& y) {
  std::mt19937 rng(1);
  std::normal_distribution<S> normal(0, 1);
  x = Matrix::NullaryExpr(32, n, [&] { return normal(rng); });
  y = Mlp<S>::quickstart(7).forward(x);
}
