// muon on xtensor arrays, viewed in place by muon/adapters/xtensor.hpp: a row-major matrix, a
// column-major one, a 4-D convolution kernel (Muon sees it as out x (in * kh * kw)) and a bias
// vector (AdamW), each pulled towards a random target under loss 0.5 ||W - T||^2, so the
// gradient is W - T, computed with xtensor's own expressions.
#include <cstdio>
#include <muon/adapters/xtensor.hpp>
#include <muon/eigen.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xmath.hpp>
#include <xtensor/xnoalias.hpp>
#include <xtensor/xrandom.hpp>
#include <xtensor/xtensor.hpp>

int main() {
  xt::random::seed(0);
  using ColMajor = xt::xtensor<float, 2, xt::layout_type::column_major>;
  xt::xtensor<float, 2> dense = xt::random::randn<float>({64, 256});
  ColMajor col_major = xt::random::randn<float>({128, 32});
  xt::xtensor<float, 4> conv = xt::random::randn<float>({32, 16, 3, 3});
  xt::xarray<float> bias = xt::zeros<float>({32});
  const xt::xtensor<float, 2> dense_target = xt::random::randn<float>({64, 256});
  const ColMajor col_major_target = xt::random::randn<float>({128, 32});
  const xt::xtensor<float, 4> conv_target = xt::random::randn<float>({32, 16, 3, 3});
  const xt::xarray<float> bias_target = xt::random::randn<float>({32});

  // Gradients live in arrays of their own; the optimizer keeps views of them.
  xt::xtensor<float, 2> dense_grad = xt::zeros_like(dense);
  ColMajor col_major_grad = xt::zeros_like(col_major);
  xt::xtensor<float, 4> conv_grad = xt::zeros_like(conv);
  xt::xarray<float> bias_grad = xt::zeros_like(bias);

  muon::GroupOptions options;
  options.muon.weight_decay = options.adamw.weight_decay = 0;
  options.muon.scale = muon::ScaleMode::match_rms_adamw;  // one lr for both rules
  muon::Optimizer<muon::EigenBackend, float> opt(options);
  opt.add_muon("dense", dense, dense_grad);
  opt.add_muon("col_major", col_major, col_major_grad);
  opt.add_muon("conv", conv, conv_grad);
  opt.add_adamw("bias", bias, bias_grad);

  auto loss = [&] {
    return 0.5 * double(xt::sum(xt::square(dense - dense_target))() +
                        xt::sum(xt::square(col_major - col_major_target))() +
                        xt::sum(xt::square(conv - conv_target))() +
                        xt::sum(xt::square(bias - bias_target))());
  };
  const int steps = 300;
  std::printf("step   loss\n");
  for (int step = 0; step <= steps; ++step) {
    // Assign into the existing arrays (noalias keeps their storage, which the views point to).
    xt::noalias(dense_grad) = dense - dense_target;
    xt::noalias(col_major_grad) = col_major - col_major_target;
    xt::noalias(conv_grad) = conv - conv_target;
    xt::noalias(bias_grad) = bias - bias_target;
    if (step % 50 == 0) std::printf("%4d   %.4f\n", step, loss());
    options.muon.lr = options.adamw.lr = 0.1 * (1 - double(step) / steps);  // linear decay
    opt.set_group_options({}, options);
    opt.step();
  }
  return 0;
}
