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

TEST_CASE("LibTorch expert stacks and fused QKV step as their matrices one by one",
          "[frameworks][libtorch]") {
  torch::manual_seed(1);
  torch::Tensor experts = torch::randn({3, 8, 4}, torch::kDouble);  // 3 experts of 8 x 4
  torch::Tensor qkv = torch::randn({12, 4}, torch::kDouble);        // rows q, k, v
  experts.mutable_grad() = torch::randn_like(experts);
  qkv.mutable_grad() = torch::randn_like(qkv);
  std::vector<torch::Tensor> one_by_one;
  for (int e = 0; e < 3; ++e) one_by_one.push_back(experts[e].clone());
  for (int r = 0; r < 12; r += 4) one_by_one.push_back(qkv.slice(0, r, r + 4).clone());
  for (int i = 0; i < 6; ++i)
    one_by_one[std::size_t(i)].mutable_grad() =
        (i < 3 ? experts.grad()[i] : qkv.grad().slice(0, 4 * (i - 3), 4 * (i - 2))).clone();
  muon::Optimizer<muon::EigenBackend, double> fused, separate;
  fused.add_muon("experts", muon::libtorch::param<double>(experts),
                 muon::libtorch::grad<double>(experts), muon::Experts{experts.size(1)});
  fused.add_muon("qkv", muon::libtorch::param<double>(qkv), muon::libtorch::grad<double>(qkv),
                 muon::Split{0, {4, 4, 4}});
  for (std::size_t i = 0; i < one_by_one.size(); ++i)
    separate.add_muon("m" + std::to_string(i), muon::libtorch::param<double>(one_by_one[i]),
                      muon::libtorch::grad<double>(one_by_one[i]));
  for (int s = 0; s < 2; ++s) {
    fused.step();
    separate.step();
  }
  for (int e = 0; e < 3; ++e) CHECK(torch::equal(experts[e], one_by_one[std::size_t(e)]));
  for (int i = 0; i < 3; ++i)
    CHECK(torch::equal(qkv.slice(0, 4 * i, 4 * i + 4), one_by_one[std::size_t(3 + i)]));
}
