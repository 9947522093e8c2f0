// LibTorch tensors through muon/adapters/libtorch.hpp: in-place views with their strides, clear
// refusals (dtype, device, layout), gradients that stay put across backward(), and muon's AdamW
// against torch::optim::AdamW (an independent implementation) on the same gradients.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <muon/adapters/libtorch.hpp>
#include <muon/adapters/libtorch_optimizer.hpp>
#include <sstream>
#include <muon/distributed/sharded_optimizer.hpp>
#include <muon/distributed/thread_communicator.hpp>
#include <muon/eigen.hpp>

using Catch::Matchers::Contains;

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
      for (auto& p : (*net)->parameters())
        if (p.grad().defined()) p.mutable_grad().zero_();
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
  // StepLR multiplies the current rate: fast-forwarded before the load, a resumed schedule goes
  // on at the saved run's rates; fast-forwarded after it, it decays the restored rate again.
  const auto rate = [](muon::libtorch::Muon<float>& o) { return o.param_groups()[0].options().get_lr(); };
  Tiny again;
  muon::libtorch::Muon<float> early(muon::libtorch::route(again->named_parameters(), tiny_routing()));
  torch::optim::StepLR early_schedule(early, 2, 0.5);
  for (int s = 0; s < 3; ++s) early_schedule.step();
  saved.seekg(0);
  torch::load(early, saved);
  for (int s = 3; s < 8; ++s) {
    CHECK(rate(early) == rate(opt));
    schedule.step();
    early_schedule.step();
  }
  muon::libtorch::Muon<float> late(muon::libtorch::route(again->named_parameters(), tiny_routing()));
  saved.seekg(0);
  torch::load(late, saved);
  torch::optim::StepLR late_schedule(late, 2, 0.5);
  for (int s = 0; s < 3; ++s) late_schedule.step();
  CHECK(rate(late) < lr);
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

TEST_CASE("a frozen parameter sits every step out, and registration creates no gradient",
          "[frameworks][libtorch][optim]") {
  torch::manual_seed(6);
  Tiny net;
  net->hidden->weight.set_requires_grad(false);
  net->head->bias.set_requires_grad(false);
  const torch::Tensor weight = net->hidden->weight.detach().clone();
  const torch::Tensor bias = net->head->bias.detach().clone();
  muon::libtorch::Muon<float> opt(muon::libtorch::route(net->named_parameters(), tiny_routing()));
  for (const auto& p : net->parameters()) CHECK_FALSE(p.grad().defined());
  for (int step = 0; step < 10; ++step) {
    opt.zero_grad();
    tiny_loss(net, step).backward();
    opt.step();
  }
  CHECK(torch::equal(net->hidden->weight, weight));  // not even weight decay
  CHECK(torch::equal(net->head->bias, bias));
  CHECK_FALSE(net->hidden->weight.grad().defined());
  CHECK(opt.last_report().updated == net->parameters().size() - 2);

  // Frozen mid-run (its .grad stays defined under LibTorch 1.x's zero_grad): it stops moving
  // and keeps its momentum; unfrozen, it steps on as one that was never frozen would from there.
  Tiny a, b;
  {
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < a->parameters().size(); ++i) b->parameters()[i].copy_(a->parameters()[i]);
  }
  muon::libtorch::Muon<float> oa(muon::libtorch::route(a->named_parameters(), tiny_routing()));
  muon::libtorch::Muon<float> ob(muon::libtorch::route(b->named_parameters(), tiny_routing()));
  for (int step = 0; step < 6; ++step) {
    const bool frozen = step == 2 || step == 3;
    a->hidden->weight.set_requires_grad(!frozen);
    const torch::Tensor held = a->hidden->weight.detach().clone();
    zero_grad_in_place(oa);
    tiny_loss(a, step).backward();
    oa.step();
    if (frozen) CHECK(torch::equal(a->hidden->weight, held));
    // b: the same, with the frozen steps' gradient of that weight cleared by hand.
    zero_grad_in_place(ob);
    tiny_loss(b, step).backward();
    if (frozen) b->hidden->weight.mutable_grad().reset();
    ob.step();
    CHECK(same_tensors(copies(a), copies(b)));
  }
}

TEST_CASE("Experts{} in a routing layout infers the rows as add_muon does",
          "[frameworks][libtorch][optim]") {
  // Plain tensors take part when they require a gradient, as module parameters do.
  torch::Tensor w = torch::randn({4, 8, 16}).requires_grad_(), v = w.detach().clone().requires_grad_();
  w.mutable_grad() = torch::randn_like(w);
  v.mutable_grad() = w.grad().clone();
  torch::OrderedDict<std::string, torch::Tensor> named, named_v;
  named.insert("w1", w);
  named_v.insert("w1", v);
  muon::libtorch::RoutingOptions inferred, given;
  inferred.layouts["w1"].experts = muon::Experts{};
  given.layouts["w1"].experts = muon::Experts{8};
  const auto routed = muon::libtorch::route(named, inferred);
  CHECK(routed.routes[0].effective_lr == muon::libtorch::route(named_v, given).routes[0].effective_lr);
  muon::libtorch::Muon<float> a(routed), b(muon::libtorch::route(named_v, given));
  a.step();
  b.step();
  CHECK(a.engine().num_matrices(muon::ParamId{0}) == 4);
  CHECK(torch::equal(w, v));
}

TEST_CASE("a param group with a refused tensor registers none of it, names it, and recovers",
          "[frameworks][libtorch][optim]") {
  torch::Tensor a = torch::randn({4, 4}), c = torch::randn({4, 4}), d = torch::randn({4, 4});
  torch::Tensor bad = torch::randn({4, 4}, torch::kDouble);
  for (torch::Tensor* t : {&a, &c, &d, &bad}) {
    t->requires_grad_();
    t->mutable_grad() = torch::randn_like(*t);
  }
  muon::libtorch::Muon<float> opt({torch::optim::OptimizerParamGroup({d})},
                                  muon::libtorch::Options(muon::UpdateRule::muon));
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {a, bad, c}, std::make_unique<muon::libtorch::Options>(muon::UpdateRule::muon)));
  for (int attempt = 0; attempt < 2; ++attempt) {
    CHECK_THROWS_WITH(opt.step(), Contains("'group.1.1'") && Contains("Double"));
    CHECK(opt.engine().num_params() == 1);  // d, from the constructor; not a, before the bad one
  }
  auto& params = opt.param_groups()[1].params();
  params.erase(params.begin() + 1);  // mended
  const torch::Tensor a0 = a.detach().clone();
  CHECK_NOTHROW(opt.step());
  CHECK(opt.engine().num_params() == 3);
  CHECK(opt.last_report().updated == 3);
  CHECK_FALSE(torch::equal(a, a0));
  // A routed model of another dtype names the parameter.
  Tiny net;
  net->to(torch::kDouble);
  CHECK_THROWS_WITH(muon::libtorch::Muon<float>(muon::libtorch::route(net->named_parameters(), tiny_routing())),
                    Contains("parameter 'hidden.weight'") && Contains("Double"));
}

TEST_CASE("enumerators outside their enum are refused by Options and in archives",
          "[frameworks][libtorch][optim][errors]") {
  muon::GroupOptions g;
  g.muon.scale = static_cast<muon::ScaleMode>(42);
  CHECK_THROWS_WITH(muon::libtorch::Options(muon::UpdateRule::muon, g), Contains("muon.scale"));
  CHECK_THROWS_WITH(muon::libtorch::Options(static_cast<muon::UpdateRule>(9)), Contains("rule"));
  torch::Tensor w = torch::randn({4, 4}).requires_grad_();
  w.mutable_grad() = torch::randn_like(w);
  muon::libtorch::Muon<float> opt({torch::optim::OptimizerParamGroup({w})},
                                  muon::libtorch::Options(muon::UpdateRule::muon));
  // Set by hand on a group's options: refused at the next step, which changes nothing.
  auto& o = static_cast<muon::libtorch::Options&>(opt.param_groups()[0].options());
  o.options().muon.momentum_form = static_cast<muon::MomentumForm>(7);
  const torch::Tensor w0 = w.detach().clone();
  CHECK_THROWS_WITH(opt.step(), Contains("momentum_form"));
  CHECK(torch::equal(w, w0));
  o.options().muon.momentum_form = muon::MomentumForm::ema;
  // In an archive: a group whose method field was written as 9.
  torch::serialize::OutputArchive archive;
  o.options().muon.newton_schulz.method = static_cast<muon::NewtonSchulzMethod>(9);
  o.serialize(archive);
  o.options().muon.newton_schulz.method = muon::NewtonSchulzMethod::automatic;
  std::stringstream bytes;
  archive.save_to(bytes);
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  muon::libtorch::Options read;
  CHECK_THROWS_WITH(read.serialize(in), Contains("newton_schulz.method"));
  CHECK(read.options().muon.newton_schulz.method == muon::NewtonSchulzMethod::automatic);
}

TEST_CASE("random call sequences keep muon::libtorch::Muon's promises",
          "[frameworks][libtorch][optim][properties]") {
  // Gradients (in place, reallocated, None, with a NaN), freezing, steps, learning rates set
  // by a scheduler's call or refused options, torch::save / torch::load (valid and corrupted),
  // and a param group with a refused tensor: a refused call changes nothing, a parameter
  // without a gradient or frozen never moves, no NaN reaches a weight, and a resumed copy
  // takes every later call to the same bits.
  struct World {
    Tiny net;
    std::unique_ptr<muon::libtorch::Muon<float>> opt;
    std::string saved;
    std::vector<std::string> failures;
    std::string engine_state() {
      std::ostringstream out;
      opt->engine().save_state(out);
      return out.str();
    }
  };
  const auto make = [](const World* from) {
    auto w = std::make_unique<World>();
    torch::NoGradGuard no_grad;
    if (from != nullptr)
      for (std::size_t i = 0; i < w->net->parameters().size(); ++i)
        w->net->parameters()[i].copy_(from->net->parameters()[i]);
    w->opt = std::make_unique<muon::libtorch::Muon<float>>(
        muon::libtorch::route(w->net->named_parameters(), tiny_routing()));
    return w;
  };
  for (int seq = 0; seq < 6; ++seq) {
    INFO("sequence " << seq);
    std::mt19937_64 rng(static_cast<std::uint64_t>(seq) + 17);
    torch::manual_seed(seq);
    auto world = make(nullptr);
    std::unique_ptr<World> twin;
    for (int n = 0; n < 30; ++n) {
      const int kind = static_cast<int>(rng() % 9), which = static_cast<int>(rng() % 5);
      const std::uint64_t seed = rng();
      INFO("call " << n << " kind " << kind << " parameter " << which);
      for (World* w : {world.get(), twin.get()}) {
        if (w == nullptr) continue;
        auto params = w->net->parameters();
        torch::Tensor p = params[static_cast<std::size_t>(which)];
        const auto weights = copies(w->net);
        const std::string state = w->engine_state();
        const auto unchanged = [&] {
          return same_tensors(copies(w->net), weights) && w->engine_state() == state;
        };
        switch (kind) {
          case 0:
          case 1: {  // backward: in place where a gradient exists, else allocated
            torch::manual_seed(seed);
            zero_grad_in_place(*w->opt);
            tiny_loss(w->net, static_cast<int>(seed % 7)).backward();
            break;
          }
          case 2:  // None
            p.mutable_grad().reset();
            break;
          case 3:  // frozen or thawed
            p.set_requires_grad(!p.requires_grad());
            break;
          case 4:
          case 5: {  // step, with a NaN in one gradient now and then
            const bool nan = seed % 4 == 0 && p.grad().defined() && p.requires_grad();
            if (nan) p.mutable_grad().view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
            std::vector<bool> sits_out;
            for (auto& q : params) sits_out.push_back(!q.grad().defined() || !q.requires_grad());
            if (nan) {
              CHECK_THROWS_AS(w->opt->step(), muon::NonFiniteGradient);
              CHECK(unchanged());
              p.mutable_grad().view(-1)[0] = 0.f;
              break;
            }
            w->opt->step();
            const auto after = copies(w->net);
            for (std::size_t i = 0; i < params.size(); ++i) {
              if (sits_out[i]) CHECK(torch::equal(after[i], weights[i]));
              CHECK(after[i].isfinite().all().item<bool>());
            }
            break;
          }
          case 6: {  // a scheduler's new rate, or options refused at the next step
            auto& o = static_cast<muon::libtorch::Options&>(w->opt->param_groups()[which % 2].options());
            if (seed % 3 != 0) {
              o.set_lr(1e-3 * static_cast<double>(seed % 50));
              break;
            }
            const muon::libtorch::Options good = o;
            o.options().muon.scale = static_cast<muon::ScaleMode>(7);
            CHECK_THROWS_AS(w->opt->step(), muon::InvalidArgument);
            CHECK(unchanged());
            o = good;
            break;
          }
          case 7: {  // save, or load what was saved (corrupted now and then)
            if (w->saved.empty() || seed % 2 == 0) {
              std::stringstream out;
              torch::save(*w->opt, out);
              w->saved = out.str();
              break;
            }
            std::string bytes = w->saved;
            const bool corrupt = seed % 3 == 0;
            if (corrupt) bytes.resize(bytes.size() / 2);
            std::stringstream in(bytes);
            if (corrupt) {
              CHECK_THROWS(torch::load(*w->opt, in));
              CHECK(unchanged());
            } else {
              torch::load(*w->opt, in);
            }
            break;
          }
          default: {  // a param group with a tensor of another dtype: refused, then removed
            torch::Tensor bad = torch::zeros({3, 3}, torch::kDouble).requires_grad_();
            w->opt->add_param_group(torch::optim::OptimizerParamGroup(
                {bad}, std::make_unique<muon::libtorch::Options>(muon::UpdateRule::adamw)));
            CHECK_THROWS_AS(w->opt->step(), muon::InvalidArgument);
            CHECK(unchanged());
            w->opt->param_groups().pop_back();
            break;
          }
        }
      }
      if (twin) REQUIRE(same_tensors(copies(twin->net), copies(world->net)));
      if (!twin && n == 10) {  // the resumed copy: same weights, gradients, freezing and state
        twin = make(world.get());
        for (std::size_t i = 0; i < world->net->parameters().size(); ++i) {
          auto from = world->net->parameters()[i];
          auto to = twin->net->parameters()[i];
          to.set_requires_grad(from.requires_grad());
          if (from.grad().defined()) to.mutable_grad() = from.grad().clone();
        }
        std::stringstream out;
        torch::save(*world->opt, out);
        torch::load(*twin->opt, out);
        twin->saved = world->saved;
      }
    }
  }
}

TEMPLATE_LIST_TEST_CASE("every rule through muon::libtorch::Muon steps as muon::Optimizer and "
                        "resumes from torch::save bit for bit",
                        "[frameworks][libtorch][optim][rules]", muon::rules::All::types) {
  using Rule = TestType;
  torch::manual_seed(7);
  const std::vector<std::vector<int64_t>> shapes =
      Rule::orthogonalizes ? std::vector<std::vector<int64_t>>{{6, 4}, {3, 8}}
                           : std::vector<std::vector<int64_t>>{{6, 4}, {5}};
  muon::GroupOptions g;
  g.muon.lr = 0.02;
  g.lion.lr = 0.003;
  g.lion.weight_decay = 0.1;
  std::vector<torch::Tensor> a, b, grads;  // a: through LibTorch, b: through muon::Optimizer
  for (const auto& s : shapes) {
    const torch::Tensor t = torch::randn(s);
    a.push_back(t.clone().requires_grad_());
    b.push_back(t.clone().requires_grad_());
  }
  muon::libtorch::Muon<float> wrapped({torch::optim::OptimizerParamGroup(a)},
                                      muon::libtorch::Options(Rule::id, g));
  muon::Optimizer<muon::EigenBackend, float> plain(g);
  for (std::size_t i = 0; i < b.size(); ++i)
    plain.add(Rule{}, "group.0." + std::to_string(i), muon::libtorch::param<float>(b[i]),
              muon::libtorch::grad<float>(b[i]));
  const auto step = [&](muon::libtorch::Muon<float>& opt, std::vector<torch::Tensor>& params) {
    for (std::size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = grads[i].clone();
    opt.step();
  };
  for (int s = 0; s < 3; ++s) {
    grads.clear();
    for (const auto& p : a) grads.push_back(torch::randn_like(p));
    step(wrapped, a);
    for (std::size_t i = 0; i < b.size(); ++i) b[i].grad().copy_(grads[i]);
    plain.step();
  }
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(torch::equal(a[i], b[i]));
  // Saved, loaded into an optimizer over copies, one more step on both.
  std::stringstream saved;
  torch::save(wrapped, saved);
  std::vector<torch::Tensor> c;
  for (const auto& p : a) c.push_back(p.detach().clone().requires_grad_());
  muon::libtorch::Muon<float> resumed({torch::optim::OptimizerParamGroup(c)},
                                      muon::libtorch::Options(Rule::id));
  torch::load(resumed, saved);
  CHECK(resumed.param_groups()[0].options().get_lr() == wrapped.param_groups()[0].options().get_lr());
  for (auto& x : grads) x = torch::randn_like(x);
  step(wrapped, a);
  step(resumed, c);
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(torch::equal(a[i], c[i]));
}

TEST_CASE("an archive written before rules named their Newton-Schulz fields still loads",
          "[frameworks][libtorch][optim]") {
  // The keys as they were: Muon's Newton-Schulz fields under "ns.", and no Lion.
  torch::serialize::OutputArchive old;
  old.write("rule", c10::IValue(int64_t{0}));
  for (const char* key : {"muon.lr", "muon.weight_decay", "muon.momentum", "muon.rms_factor",
                          "ns.eps", "adamw.lr", "adamw.beta1", "adamw.beta2",
                          "adamw.eps", "adamw.weight_decay"})
    old.write(key, c10::IValue(0.0625));
  old.write("ns.tolerance", c10::IValue(0.0));
  old.write("muon.nesterov", c10::IValue(false));
  for (const char* key : {"muon.momentum_form", "muon.scale", "ns.method"})
    old.write(key, c10::IValue(int64_t{1}));
  old.write("ns.steps", c10::IValue(int64_t{7}));
  old.write("ns.max_extra_steps", c10::IValue(int64_t{3}));
  old.write("ns.schedule", c10::IValue(std::string("you")));
  old.write("ns.norm_scale", c10::IValue(1.0));
  old.write("ns.coefficients", c10::IValue(std::vector<double>{}));
  std::stringstream bytes;
  old.save_to(bytes);
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  muon::libtorch::Options read;
  read.serialize(in);
  const muon::GroupOptions& g = read.options();
  CHECK((g.muon.lr == 0.0625 && g.muon.newton_schulz.steps == 7 && g.muon.newton_schulz.eps == 0.0625));
  CHECK((g.muon.newton_schulz.max_extra_steps == 3 && g.muon.newton_schulz.schedule.name() == "you"));
  CHECK((g.muon.scale == muon::ScaleMode::match_rms_adamw && !g.muon.nesterov));
  CHECK(g.adamw.beta2 == 0.0625);
  CHECK(g.lion.lr == muon::LionOptions{}.lr);  // no Lion fields: its defaults
  CHECK(!g.muon.cautious_weight_decay);          // an option added since: its default
}

TEST_CASE("ShardedMuon on every rank steps as muon::libtorch::Muon and resumes from torch::save",
          "[frameworks][libtorch][optim][sharded]") {
  const auto strategy = GENERATE(muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1);
  const int world = GENERATE(1, 2, 4);  // the same gradients on every rank: their mean is exact
  INFO(muon::to_string(strategy) << " on " << world << " ranks");
  torch::manual_seed(11);
  std::vector<torch::Tensor> start;
  for (const std::vector<int64_t>& s : {std::vector<int64_t>{6, 4}, {3, 8}, {5}})
    start.push_back(torch::randn(s));
  std::vector<std::vector<torch::Tensor>> grads(4);  // three steps, then one after the resume
  for (auto& g : grads)
    for (const auto& t : start) g.push_back(torch::randn_like(t));
  // Two Muon matrices in one param group, an AdamW vector in another.
  const auto groups = [&](std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& from) {
    params.clear();
    for (const auto& t : from) params.push_back(t.detach().clone().requires_grad_());
    muon::GroupOptions g;
    g.muon.lr = 0.02;
    std::vector<torch::optim::OptimizerParamGroup> out;
    out.emplace_back(std::vector<torch::Tensor>{params[0], params[1]},
                     std::make_unique<muon::libtorch::Options>(muon::UpdateRule::muon, g));
    out.emplace_back(std::vector<torch::Tensor>{params[2]},
                     std::make_unique<muon::libtorch::Options>(muon::UpdateRule::adamw, g));
    return out;
  };
  const auto step = [&](torch::optim::Optimizer& opt, std::vector<torch::Tensor>& params, int s) {
    for (std::size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = grads[s][i].clone();
    opt.step();
  };
  std::vector<torch::Tensor> want;
  muon::libtorch::Muon<float> single(groups(want, start));
  for (int s = 0; s < 4; ++s) step(single, want, s);

  using Engine = muon::ShardedOptimizer<muon::EigenBackend, float, muon::ThreadCommunicator>;
  std::vector<std::vector<torch::Tensor>> got(static_cast<std::size_t>(world)), resumed(got);
  muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
    const auto r = static_cast<std::size_t>(comm.rank());
    muon::libtorch::ShardedMuon<muon::ThreadCommunicator> opt(groups(got[r], start), {}, {}, {},
                                                            Engine(comm, strategy));
    for (int s = 0; s < 3; ++s) step(opt, got[r], s);
    std::stringstream saved;
    torch::save(opt, saved);  // collective: every rank its own part
    muon::libtorch::ShardedMuon<muon::ThreadCommunicator> again(groups(resumed[r], got[r]), {}, {},
                                                              {}, Engine(comm, strategy));
    torch::load(again, saved);
    step(opt, got[r], 3);
    step(again, resumed[r], 3);
  });
  for (std::size_t r = 0; r < got.size(); ++r) {
    INFO("rank " << r);
    CHECK(same_tensors(got[r], want));
    CHECK(same_tensors(resumed[r], want));
  }
  // An engine handed over must hold no parameters yet.
  muon::Optimizer<muon::EigenBackend, float> used;
  torch::Tensor w = torch::zeros({5});
  used.add_adamw("w", muon::libtorch::param<float>(w), muon::libtorch::grad<float>(w));
  std::vector<torch::Tensor> params;
  CHECK_THROWS_WITH(muon::libtorch::Muon<float>(groups(params, start), {}, {}, {}, std::move(used)),
                    Contains("the engine handed over already holds 1 parameters"));
}

TEST_CASE("QK-clip through muon::libtorch::Muon rescales a fused QKV's offending heads from a "
          "tensor of logits", "[frameworks][libtorch][qk_clip]") {
  torch::manual_seed(3);
  const int64_t width = 8, heads = 2, dh = width / heads;
  torch::nn::Linear qkv(torch::nn::LinearOptions(width, 3 * width).bias(false));
  auto& w = qkv->weight;
  muon::libtorch::RoutingOptions r;
  r.layouts["weight"].split = muon::Split{0, {width, width, width}};
  muon::libtorch::Muon<float> opt(muon::libtorch::route(qkv->named_parameters(), r));
  w.mutable_grad() = torch::randn_like(w);
  opt.step();
  const auto clip = opt.add_qk_clip(w, w, muon::AttentionHeads::contiguous(heads, dh, 0, width), {10.0});
  const torch::Tensor before = w.detach().clone();
  const auto version = w._version();
  const muon::QkClipReport report = opt.clip_qk(clip, torch::tensor({40.0f, 2.0f}));
  CHECK(report.clipped == 1);
  CHECK(w._version() > version);  // autograd sees the in-place change
  const float half = static_cast<float>(std::sqrt(10.0 / 40.0));
  CHECK(torch::equal(w.detach().slice(0, 0, dh), before.slice(0, 0, dh) * half));  // head 0's Q
  CHECK(torch::equal(w.detach().slice(0, width, width + dh), before.slice(0, width, width + dh) * half));  // and K
  CHECK(torch::equal(w.detach().slice(0, dh, width), before.slice(0, dh, width)));  // head 1's Q
  CHECK(torch::equal(w.detach().slice(0, 2 * width), before.slice(0, 2 * width)));  // V
  CHECK_THROWS_WITH(opt.add_qk_clip(torch::zeros({3, 3}), w, muon::AttentionHeads::contiguous(1, 1, 0, 0)),
                    Contains("query tensor is not a parameter"));
  CHECK_THROWS_WITH(opt.clip_qk(clip, torch::zeros({2, 1})), Contains("2 dimensions"));
}
