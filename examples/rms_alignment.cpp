// RMS alignment (seed 002, Moonlight): the RMS of one Muon update, ||dW||_F / sqrt(rows cols),
// for several shapes, with the "original" shape scale sqrt(max(1, rows/cols)) and with
// "match_rms_adamw" 0.2 sqrt(max(rows, cols)). msign(G) has RMS 1/sqrt(max(rows, cols)) for a
// full-rank G, so match_rms_adamw gives 0.2 (AdamW's typical update RMS, so its lr and weight
// decay carry over), while the original scale gives an RMS that shrinks as the matrix grows.
// "NS5" is muon's default 5-step quintic (keller); "exact" is the value for the exact msign.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include <muon/diagnostics.hpp>
#include <muon/eigen.hpp>

using Matrix = Eigen::MatrixXf;

/// The update of one Muon step (lr 1, no decay) on a Gaussian gradient of the given shape.
double update_rms(int rows, int cols, muon::ScaleMode scale) {
  std::mt19937 rng(unsigned(rows * 7919 + cols));
  std::normal_distribution<float> normal(0, 1);
  const Matrix grad = Matrix::NullaryExpr(rows, cols, [&] { return normal(rng); });
  Matrix w = Matrix::Zero(rows, cols);
  muon::GroupOptions options;
  options.muon.lr = 1;
  options.muon.weight_decay = 0;
  options.muon.scale = scale;
  muon::Optimizer<muon::EigenBackend, float> opt(options);
  opt.add_muon("w", w, grad);
  opt.step();
  return muon::update_rms(muon::MatrixView<const float>(muon::view(w)));  // dW = W - 0
}

int main() {
  const int shapes[][2] = {{1024, 1024}, {512, 2048}, {2048, 512}, {256, 4096}, {4096, 256}};
  std::printf("shape        aspect   original: NS5   exact     match_rms_adamw: NS5   exact\n");
  for (const auto& s : shapes) {
    const double r = s[0], c = s[1];
    const double msign_rms = 1 / std::sqrt(std::max(r, c));
    const std::string aspect = r <= c ? "1:" + std::to_string(s[1] / s[0])
                                      : std::to_string(s[0] / s[1]) + ":1";
    std::printf("%4dx%-4d    %-6s             %.4f    %.4f                      %.4f   %.4f\n",
                s[0], s[1], aspect.c_str(), update_rms(s[0], s[1], muon::ScaleMode::original),
                std::sqrt(std::max(1.0, r / c)) * msign_rms,
                update_rms(s[0], s[1], muon::ScaleMode::match_rms_adamw),
                0.2 * std::sqrt(std::max(r, c)) * msign_rms);
  }
  return 0;
}
