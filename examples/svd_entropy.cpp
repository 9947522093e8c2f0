// SVD entropy of trained weights (seeds 002 and 004, Moonlight): the same depth-5 MLP on
// the depth experiment's teacher task, trained once with Muon and once with AdamW; prints the
// entropy H = -(1/log n) sum p_i log p_i, p_i = s_i^2 / sum s_j^2, of every weight matrix.
// Moonlight reports higher entropy (a more even spectrum) for Muon-trained weights.
//
//   svd_entropy [--activation silu|linear] [--steps 1000] [--batch 128] [--seed 0]
//               [--muon-lr X] [--adamw-lr X]
#include <algorithm>
#include <cstdio>
#include <thread>

#include "teacher_regression.hpp"

int main(int argc, char** argv) {
  RegressionRun muon_run;
  double adamw_lr = 0;
  try {
    muon_run.steps = int_option(argc, argv, "--steps", 1000);
    muon_run.batch = std::max(1, int_option(argc, argv, "--batch", 128));
    muon_run.seed = unsigned(int_option(argc, argv, "--seed", 0));
    const std::string act = option(argc, argv, "--activation", "silu");
    if (act != "silu" && act != "linear")
      throw std::invalid_argument("--activation must be silu or linear, got '" + act + "'");
    muon_run.activation = act == "silu" ? Activation::silu : Activation::linear;
    // Each optimizer's best learning rate for this model in the depth experiment (docs/seeds.md).
    muon_run.lr = std::stod(option(argc, argv, "--muon-lr", act == "silu" ? "1e-2" : "3e-3"));
    adamw_lr = std::stod(option(argc, argv, "--adamw-lr", "3e-3"));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\nusage: svd_entropy [--steps N] [--batch B] [--seed S] [--muon-lr X] "
                 "[--adamw-lr X] [--activation silu|linear]\n",
                 e.what());
    return 2;
  }
  muon_run.depth = 5;
  muon_run.weight_decay = 0.01;  // AdamW's default decay, decoupled, for both optimizers
  RegressionRun adamw_run = muon_run;
  muon_run.muon = true;
  adamw_run.lr = adamw_lr;

  const Mlp<float> initial(std::vector<int>(muon_run.depth + 1, kWidth), muon_run.activation,
                           false, muon_run.seed + 1);  // as train_regression initializes
  auto entropy = [](const Mlp<float>::Matrix& w) {
    return muon::svd_entropy(muon::MatrixView<const float>(muon::view(w)));
  };
  RegressionResult trained[2] = {{0, initial}, {0, initial}};
  std::thread other([&] { trained[1] = train_regression(adamw_run); });
  trained[0] = train_regression(muon_run);
  other.join();

  std::printf("depth-5 %s MLP, %d steps, batch %d, seed %u; final test MSE: Muon %.3e "
              "(lr %.0e), AdamW %.3e (lr %.0e)\n\n",
              to_string(muon_run.activation), muon_run.steps, muon_run.batch, muon_run.seed, trained[0].final_loss, muon_run.lr,
              trained[1].final_loss, adamw_run.lr);
  std::printf("layer   initial   Muon    AdamW\n");
  double mean[3] = {0, 0, 0};
  for (int l = 0; l < initial.layers(); ++l) {
    const double h[3] = {entropy(initial.w[l]), entropy(trained[0].model.w[l]),
                         entropy(trained[1].model.w[l])};
    for (int k = 0; k < 3; ++k) mean[k] += h[k] / initial.layers();
    std::printf("w%-5d  %.4f    %.4f  %.4f\n", l, h[0], h[1], h[2]);
  }
  std::printf("mean    %.4f    %.4f  %.4f\n", mean[0], mean[1], mean[2]);
  return 0;
}
