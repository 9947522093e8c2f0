// LibTorch tensors through muon/adapters/libtorch.hpp: in-place views with their strides, clear
// refusals (dtype, device, layout), gradients that stay put across backward(), and muon's AdamW
// against torch::optim::AdamW (an independent implementation) on the same gradients.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <muon/adapters/libtorch.hpp>
#include <muon/adapters/libtorch_optimizer.hpp>
#include <sstream>
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

// ---- muon::libtorch::Muon, a torch::optim::Optimizer ---------------------------------------

namespace {

struct TinyImpl : torch::nn::Module {
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear hidden{nullptr}, head{nullptr};
  TinyImpl() {
    embed = register_module("embed", torch::nn::Embedding(16, 8));
    hidden = register_module("hidden", torch::nn::Linear(8, 24));  // weight 24 x 8: tall
    head = register_module("head", torch::nn::Linear(24, 5));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return head(torch::tanh(hidden(embed(x).mean(1))));
  }
};
TORCH_MODULE(Tiny);

torch::Tensor tiny_loss(Tiny& net, int step) {
  torch::manual_seed(100 + step);
  const torch::Tensor x = torch::randint(16, {32, 4}), y = torch::randint(5, {32});
  return torch::nn::functional::cross_entropy(net->forward(x), y);
}

/// A training loop that knows only LibTorch's own interfaces.
void train(torch::optim::Optimizer& opt, torch::optim::LRScheduler& schedule, Tiny& net,
           int from, int to) {
  for (int step = from; step < to; ++step) {
    opt.zero_grad();
    tiny_loss(net, step).backward();
    opt.step();
    schedule.step();
  }
}

bool same_tensors(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!torch::equal(a[i], b[i])) return false;
  return true;
}

std::vector<torch::Tensor> copies(Tiny& net) {
  std::vector<torch::Tensor> out;
  for (const auto& p : net->parameters()) out.push_back(p.detach().clone());
  return out;
}

/// zero_grad(set_to_none=true) where this LibTorch has it (2.x), else what it does: every
/// .grad() becomes None.
template <class Opt>
void zero_grad_to_none(Opt& opt, Tiny& net) {
  if constexpr (requires { opt.zero_grad(true); })
    opt.zero_grad(true);
  else
    for (auto& p : net->parameters()) p.mutable_grad().reset();
}

/// zero_grad(set_to_none=false) where this LibTorch has it, else its zero_grad() (1.x), which
/// zeroes in place.
template <class Opt>
void zero_grad_in_place(Opt& opt) {
  if constexpr (requires { opt.zero_grad(false); })
    opt.zero_grad(false);
  else
    opt.zero_grad();
}

muon::libtorch::RoutingOptions tiny_routing() {
  muon::libtorch::RoutingOptions r;
  r.options.muon.lr = 0.05;
  r.options.adamw.lr = 0.01;
  return r;
}

}  // namespace

TEST_CASE("the routing table names every parameter, and the usual split holds",
          "[frameworks][libtorch][optim]") {
  torch::manual_seed(0);
  Tiny net;
  const auto routed = muon::libtorch::route(net->named_parameters(), tiny_routing());
  REQUIRE(routed.routes.size() == net->named_parameters().size());
  for (const auto& r : routed.routes) {
    INFO(r.name);
    const bool hidden = r.name == "hidden.weight";
    CHECK((r.rule == muon::UpdateRule::muon) == hidden);
    CHECK(r.lr == (hidden ? 0.05 : 0.01));
    CHECK(r.effective_lr == (hidden ? 0.05 * std::sqrt(24.0 / 8.0) : 0.01));
  }
  const std::string table = routed.table();
  for (const auto& item : net->named_parameters()) CHECK_THAT(table, Catch::Contains(item.key()));
  CHECK_THAT(table, Catch::Contains("24x8") && Catch::Contains("muon"));
  CHECK(routed.groups.size() == 2);
}

TEST_CASE("a loop written against torch::optim::Optimizer& trains with Muon and StepLR",
          "[frameworks][libtorch][optim]") {
  torch::manual_seed(1);
  Tiny net;
  muon::libtorch::Muon<float> opt(muon::libtorch::route(net->named_parameters(), tiny_routing()));
  torch::optim::StepLR schedule(opt, /*step_size=*/10, /*gamma=*/0.5);
  const float before = tiny_loss(net, 0).item<float>();
  train(opt, schedule, net, 0, 30);
  CHECK(tiny_loss(net, 0).item<float>() < before);
  // StepLR halved both groups' rates (at its 10th and 20th step); the engine steps with them.
  CHECK(opt.param_groups()[0].options().get_lr() == Approx(0.05 / 4));
  CHECK(opt.param_groups()[1].options().get_lr() == Approx(0.01 / 4));
  opt.zero_grad();
  tiny_loss(net, 0).backward();
  opt.step();
  CHECK(opt.engine().group_options(muon::GroupId{0}).muon.lr == Approx(0.05 / 4));
  CHECK(opt.engine().group_options(muon::GroupId{1}).adamw.lr == Approx(0.01 / 4));
  CHECK(opt.engine().step_count() == 31);
}

TEST_CASE("Muon through torch::optim steps as muon::Optimizer on the same tensors",
          "[frameworks][libtorch][optim]") {
  torch::manual_seed(2);
  Tiny a, b;
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < a->parameters().size(); ++i) b->parameters()[i].copy_(a->parameters()[i]);
  const auto r = tiny_routing();
  muon::libtorch::Muon<float> wrapped(muon::libtorch::route(a->named_parameters(), r));
  muon::Optimizer<muon::EigenBackend, float> plain(r.options);
  for (const auto& item : b->named_parameters()) {
    auto& p = item.value();
    if (item.key() == "hidden.weight")
      plain.add_muon(item.key(), muon::libtorch::param<float>(p), muon::libtorch::grad<float>(p));
    else
      plain.add_adamw(item.key(), muon::libtorch::param<float>(p), muon::libtorch::grad<float>(p));
  }
  for (int step = 0; step < 3; ++step) {
    for (Tiny* net : {&a, &b}) {
      torch::AutoGradMode grad(true);
      for (auto& p : (*net)->parameters()) p.mutable_grad().zero_();
      tiny_loss(*net, step).backward();
    }
    wrapped.step();
    plain.step();
  }
  CHECK(same_tensors(copies(a), copies(b)));
}

TEST_CASE("gradients set to None or reallocated are followed, never read stale",
          "[frameworks][libtorch][optim]") {
  torch::manual_seed(3);
  Tiny net;
  muon::libtorch::Muon<float> opt(muon::libtorch::route(net->named_parameters(), tiny_routing()));
  tiny_loss(net, 0).backward();
  opt.step();
  // zero_grad(set_to_none=true), LibTorch 2.x's default: every .grad() is None.
  zero_grad_to_none(opt, net);
  {  // fill freed memory with NaN: a stale read would put it into the weights
    torch::Tensor garbage = torch::full({1 << 16}, std::numeric_limits<float>::quiet_NaN());
    const auto before = copies(net);
    opt.step();
    CHECK(same_tensors(copies(net), before));  // nothing moved, not even weight decay
    CHECK(opt.last_report().updated == 0);
  }
  // backward() allocates new gradients; the next step reads them.
  tiny_loss(net, 1).backward();
  const auto before = copies(net);
  opt.step();
  CHECK(opt.last_report().updated == net->parameters().size());
  for (const auto& p : net->parameters()) CHECK(p.isfinite().all().item<bool>());
  CHECK_FALSE(same_tensors(copies(net), before));
  // One parameter without a gradient sits out, the others step (zeroed in place first).
  zero_grad_in_place(opt);
  tiny_loss(net, 2).backward();
  net->head->bias.mutable_grad().reset();
  const torch::Tensor bias = net->head->bias.detach().clone();
  opt.step();
  CHECK(torch::equal(net->head->bias, bias));
  CHECK(opt.last_report().updated == net->parameters().size() - 1);
}

TEST_CASE("torch::save and torch::load resume Muon bit for bit",
          "[frameworks][libtorch][optim]") {
  // Steps 0-2 under a schedule, saved; steps 3-5 straight on, and again from the save.
  const auto continue_from_3 = [](torch::optim::Optimizer& opt, Tiny& net) {
    for (int step = 3; step < 6; ++step) {
      opt.zero_grad();
      tiny_loss(net, step).backward();
      opt.step();
    }
  };
  torch::manual_seed(4);
  Tiny net;
  muon::libtorch::Muon<float> opt(muon::libtorch::route(net->named_parameters(), tiny_routing()));
  torch::optim::StepLR schedule(opt, 2, 0.5);
  train(opt, schedule, net, 0, 3);
  std::stringstream saved;
  torch::save(opt, saved);
  const double lr = opt.param_groups()[0].options().get_lr();
  const auto weights = copies(net);
  continue_from_3(opt, net);
  const auto straight = copies(net);

  torch::manual_seed(99);  // other initial weights, overwritten below
  Tiny resumed;
  {
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < weights.size(); ++i) resumed->parameters()[i].copy_(weights[i]);
  }
  muon::libtorch::Muon<float> opt2(muon::libtorch::route(resumed->named_parameters(), tiny_routing()));
  torch::load(opt2, saved);
  CHECK(opt2.param_groups()[0].options().get_lr() == lr);  // the schedule's rate, restored
  CHECK(lr == 0.025);
  continue_from_3(opt2, resumed);
  CHECK(same_tensors(copies(resumed), straight));
  // A model routed otherwise is refused, and that optimizer is left as it was.
  Tiny other;
  muon::libtorch::RoutingOptions everything_adamw = tiny_routing();
  everything_adamw.adamw_names = ".";
  muon::libtorch::Muon<float> wrong(muon::libtorch::route(other->named_parameters(), everything_adamw));
  saved.seekg(0);
  CHECK_THROWS_AS(torch::load(wrong, saved), muon::Error);
  CHECK(wrong.engine().step_count() == 0);
  CHECK(wrong.param_groups()[0].options().get_lr() == 0.01);
}

TEST_CASE("a param group added later joins at the next step", "[frameworks][libtorch][optim]") {
  torch::manual_seed(5);
  Tiny net;
  muon::libtorch::Muon<float> opt({torch::optim::OptimizerParamGroup({net->hidden->weight})},
                                  muon::libtorch::Options(muon::UpdateRule::muon));
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {net->head->weight, net->head->bias},
      std::make_unique<muon::libtorch::Options>(muon::UpdateRule::adamw)));
  tiny_loss(net, 0).backward();
  opt.step();
  CHECK(opt.engine().num_params() == 2 + 1);
  CHECK(opt.engine().rule(muon::ParamId{1}) == muon::UpdateRule::adamw);
  CHECK(opt.last_report().updated == 3);
}
