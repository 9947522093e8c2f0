// Quickstart: a 3-layer MLP (32 -> 64 -> 64 -> 8, tanh) fitted to a random teacher network.
// Muon updates the weight matrices, AdamW the biases, in one optimizer; the same model trained
// with AdamW alone is printed beside it. Gradients come from the example's own backward pass.
#include <cstdio>

#include "mlp.hpp"

int main() {
  using Matrix = Mlp<float>::Matrix;
  Matrix x, y;
  teacher_data<float>(512, x, y);

  // Muon for the matrices, AdamW for the biases: one optimizer, one step().
  auto with_muon = Mlp<float>::quickstart(3);
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
  auto with_adamw = Mlp<float>::quickstart(3);
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
