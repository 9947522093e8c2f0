#pragma once
// The task of seed 000 ("When does Muon work? Model depth is a key factor"):
// a linear teacher y = W_gt x (x in R^100, W_gt 100 x 100) learned by a width-100 MLP of some
// depth, linear or SiLU, under MSE, trained with Adam or with Muon on every weight matrix.
// Shared by depth_experiment and svd_entropy.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>

#include "mlp.hpp"

struct RegressionRun {
  Activation activation = Activation::linear;
  int depth = 1;
  bool muon = false;  ///< Muon on every weight matrix, else Adam(W)
  double lr = 1e-3;
  double weight_decay = 0;  ///< 0: Adam and Muon without decay, as in the seed
  int steps = 1000;
  int batch = 128;
  unsigned seed = 0;
};

struct RegressionResult {
  double final_loss;  ///< MSE on 4096 held-out samples; +inf if training diverged
  Mlp<float> model;
};

inline constexpr int kWidth = 100;

/// Trains one configuration. Everything random (teacher, initial weights, the batches, the
/// held-out set) depends on `seed` only, so Adam and Muon see the same problem and data.
inline RegressionResult train_regression(const RegressionRun& run) {
  using Matrix = Mlp<float>::Matrix;
  std::mt19937 rng(run.seed);
  std::normal_distribution<float> normal(0, 1);
  auto gaussian = [&](int rows, int cols) {
    return Matrix(Matrix::NullaryExpr(rows, cols, [&] { return normal(rng); }));
  };
  const Matrix teacher = gaussian(kWidth, kWidth) / std::sqrt(float(kWidth));
  const Matrix test_x = gaussian(kWidth, 4096);
  const Matrix test_y = teacher * test_x;

  RegressionResult result{0, Mlp<float>(std::vector<int>(run.depth + 1, kWidth), run.activation,
                                        /*biases=*/false, run.seed + 1)};
  Mlp<float>& model = result.model;
  muon::GroupOptions options;
  options.muon.lr = options.adamw.lr = run.lr;
  options.muon.weight_decay = options.adamw.weight_decay = run.weight_decay;
  muon::Optimizer<muon::EigenBackend, float> opt(options);
  for (int l = 0; l < model.layers(); ++l) {
    const std::string name = "w" + std::to_string(l);
    if (run.muon)
      opt.add_muon(name, model.w[l], model.gw[l]);
    else
      opt.add_adamw(name, model.w[l], model.gw[l]);
  }
  for (int step = 0; step < run.steps; ++step) {
    const Matrix x = gaussian(kWidth, run.batch);
    const float loss = model.loss_and_gradients(x, teacher * x);
    if (!std::isfinite(loss)) {  // diverged: this learning rate is too large
      result.final_loss = INFINITY;
      return result;
    }
    opt.step();
  }
  const double loss = (model.forward(test_x) - test_y).squaredNorm() / double(test_y.size());
  result.final_loss = std::isfinite(loss) ? loss : INFINITY;
  return result;
}

inline const char* to_string(Activation a) {
  switch (a) {
    case Activation::linear: return "linear";
    case Activation::tanh: return "tanh";
    case Activation::silu: return "silu";
  }
  return "?";
}

/// The value after `--name` on the command line, or `fallback`; `--name=value` also works.
inline std::string option(int argc, char** argv, const char* name, const std::string& fallback) {
  const std::size_t n = std::strlen(name);
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) {
      if (i + 1 >= argc) throw std::invalid_argument(std::string(name) + " needs a value");
      return argv[i + 1];
    }
    if (std::strncmp(argv[i], name, n) == 0 && argv[i][n] == '=') return argv[i] + n + 1;
  }
  return fallback;
}
inline int int_option(int argc, char** argv, const char* name, int fallback) {
  const std::string v = option(argc, argv, name, std::to_string(fallback));
  std::size_t used = 0;
  const int value = std::stoi(v, &used);
  if (used != v.size() || value < 0)
    throw std::invalid_argument(std::string(name) + " must be a non-negative integer, got '" + v +
                                "'");
  return value;
}
