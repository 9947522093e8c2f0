// LibTorch tensors through muon/adapters/libtorch.hpp: in-place views with their strides, clear
// refusals (dtype, device, layout), gradients that stay put across backward(), and muon's AdamW
// against torch::optim::AdamW (an independent implementation) on the same gradients.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <muon/adapters/libtorch.hpp>
#include <muon/eigen.hpp>

TEST_CASE("LibTorch tensors are viewed in place with their strides", "[frameworks][libtorch]") {
  torch::Tensor w = torch::zeros({3, 5});
  auto v = muon::libtorch::param<float>(w);
  CHECK((v.data() == w.data_ptr<float>() && v.rows() == 3 && v.cols() == 5));
  torch::Tensor t = w.t();  // a transposed view: strides (1, 5)
  auto vt = muon::libtorch::param<float>(t);
  CHECK((vt.rows() == 5 && vt.cols() == 3 && vt.row_stride() == 1 && vt.col_stride() == 5));
  vt(4, 2) = 7;
  CHECK(w[2][4].item<float>() == 7);

  torch::Tensor kernel = torch::zeros({8, 2, 3, 3}, torch::kDouble);  // a conv weight: 8 x 18
  auto k = muon::libtorch::param<double>(kernel);
  CHECK((k.rows() == 8 && k.cols() == 18));
}

TEST_CASE("LibTorch tensors of the wrong kind are refused by name", "[frameworks][libtorch]") {
  torch::Tensor w = torch::zeros({3, 5});
  CHECK_THROWS_WITH(muon::libtorch::param<double>(w),
                    Catch::Contains("parameter has dtype Float, expected Double"));
  CHECK_THROWS_WITH((muon::libtorch::param<float, muon::DeviceSpace>(w)),
                    Catch::Contains("parameter is on cpu, expected a CUDA device"));
  CHECK_THROWS_WITH(muon::libtorch::param<float>(torch::Tensor()),
                    Catch::Contains("undefined tensor"));
  torch::Tensor permuted = torch::zeros({2, 3, 4}).permute({0, 2, 1});
  CHECK_THROWS_WITH(muon::libtorch::param<float>(permuted),
                    Catch::Contains("of shape 2x4x3 is not dense"));
}

TEST_CASE("a gradient view stays valid across backward() calls", "[frameworks][libtorch]") {
  torch::Tensor w = torch::ones({4, 6}, torch::requires_grad());
  auto g = muon::libtorch::grad<float>(w);  // creates .grad() before any backward()
  REQUIRE(w.grad().defined());
  for (int i = 0; i < 2; ++i) {
    w.grad().zero_();
    (w * 3).sum().backward();
  }
  CHECK(g.data() == w.grad().data_ptr<float>());
  CHECK(g(3, 5) == 3);
}

TEST_CASE("muon's AdamW matches torch::optim::AdamW on the same gradients",
          "[frameworks][libtorch]") {
  torch::manual_seed(0);
  const torch::Tensor start = torch::randn({16, 24}, torch::kDouble);
  torch::Tensor ours = start.clone().requires_grad_();
  torch::Tensor theirs = start.clone().requires_grad_();
  muon::GroupOptions options;
  options.adamw.lr = 1e-2;
  options.adamw.beta2 = 0.95;
  options.adamw.weight_decay = 0.1;
  muon::Optimizer<muon::EigenBackend, double> opt(options);
  opt.add_adamw("w", muon::libtorch::param<double>(ours), muon::libtorch::grad<double>(ours));
  torch::optim::AdamW reference({theirs}, torch::optim::AdamWOptions(1e-2)
                                              .betas({0.9, 0.95})
                                              .eps(1e-8)
                                              .weight_decay(0.1));
  const torch::Tensor target = torch::randn({16, 24}, torch::kDouble);
  for (int step = 0; step < 20; ++step) {
    for (torch::Tensor* w : {&ours, &theirs}) {
      if (w->grad().defined()) w->grad().zero_();
      (*w - target).pow(2).sum().backward();
    }
    opt.step();
    reference.step();
  }
  const double diff = (ours - theirs).abs().max().item<double>();
  CHECK(diff < 1e-12);
  CHECK((ours - start).abs().max().item<double>() > 0.1);  // the weights did move
}
