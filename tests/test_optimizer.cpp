// The optimizer: update semantics, routing, groups, gradients, bad input, non-finite policy.
#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <deque>
#include <limits>
#include <span>
#include <thread>
#include <tuple>
#include <type_traits>

#include "test_support.hpp"

using namespace muon_test;
using Catch::Matchers::Contains;
using muon::EigenBackend;

namespace {

template <class T>
using Opt = muon::Optimizer<EigenBackend, T>;

muon::GroupOptions muon_options(double lr, double wd, double momentum = 0.95) {
  muon::GroupOptions g;
  g.muon.lr = lr;
  g.muon.weight_decay = wd;
  g.muon.momentum = momentum;
  return g;
}


}  // namespace

TEST_CASE("defaults are torch.optim.Muon's and torch.optim.AdamW's", "[optimizer]") {
  const muon::MuonOptions m;
  CHECK(m.lr == 1e-3);
  CHECK(m.weight_decay == 0.1);
  CHECK(m.momentum == 0.95);
  CHECK(m.nesterov);
  CHECK(m.momentum_form == muon::MomentumForm::ema);
  CHECK(m.scale == muon::ScaleMode::original);
  CHECK(m.newton_schulz.schedule.kind() == muon::Schedule::Kind::keller);
  CHECK(m.newton_schulz.steps == 5);
  CHECK(m.newton_schulz.eps == 1e-7);
  const muon::AdamWOptions a;
  CHECK(a.lr == 1e-3);
  CHECK(a.beta1 == 0.9);
  CHECK(a.beta2 == 0.999);
  CHECK(a.eps == 1e-8);
  CHECK(a.weight_decay == 0.01);
}

TEMPLATE_TEST_CASE("a zero gradient shrinks W by exactly (1 - lr wd)", "[optimizer]", float,
                   double) {
  const double lr = 0.02, wd = 0.1;
  auto g = muon_options(lr, wd);
  g.adamw.lr = lr;
  g.adamw.weight_decay = wd;
  Opt<TestType> opt(g);
  Mat<TestType> w = gaussian<TestType>(16, 8, 1), b = gaussian<TestType>(1, 8, 2);
  const Mat<TestType> w0 = w, b0 = b;
  const Mat<TestType> gw = Mat<TestType>::Zero(16, 8), gb = Mat<TestType>::Zero(1, 8);
  opt.add_muon("w", w, gw);
  opt.add_adamw("b", b, gb);
  opt.step();
  const auto decay = static_cast<TestType>(1 - lr * wd);
  CHECK(same_bits(w, Mat<TestType>(w0 * decay)));
  CHECK(same_bits(b, Mat<TestType>(b0 * decay)));
  CHECK(w.allFinite());
}

TEST_CASE("gradient entries of 1e20 in float give the update of the unscaled gradient",
          "[optimizer]") {
  // ||G||_F^2 overflows float here; the update must be neither zero nor NaN, and since
  // Newton-Schulz normalizes, it must equal the update of G / 1e20.
  const Mat<float> g = gaussian<float>(24, 16, 2);
  const Mat<float> huge = g * 1e20f;
  Mat<float> w = gaussian<float>(24, 16, 1), v = w;
  const Mat<float> w0 = w;
  Opt<float> a(muon_options(0.02, 0.1)), b(muon_options(0.02, 0.1));
  a.add_muon("w", w, huge);
  b.add_muon("w", v, g);
  a.step();
  b.step();
  CHECK(w.allFinite());
  CHECK((w - w0).cwiseAbs().maxCoeff() > 1e-3f);
  CHECK((w - v).cwiseAbs().maxCoeff() < 1e-5f);
}

TEMPLATE_TEST_CASE("gradients are never modified", "[optimizer]", float, double) {
  for (bool nesterov : {true, false})
    for (auto form : {muon::MomentumForm::ema, muon::MomentumForm::sum}) {
      auto g = muon_options(0.02, 0.1);
      g.muon.nesterov = nesterov;
      g.muon.momentum_form = form;
      Opt<TestType> opt(g);
      Mat<TestType> tall = gaussian<TestType>(20, 6, 1), wide = gaussian<TestType>(6, 20, 2);
      Mat<TestType> bias = gaussian<TestType>(6, 1, 3);
      const Mat<TestType> g1 = gaussian<TestType>(20, 6, 4), g2 = gaussian<TestType>(6, 20, 5);
      const Mat<TestType> g3 = gaussian<TestType>(6, 1, 6);
      const Mat<TestType> c1 = g1, c2 = g2, c3 = g3;
      opt.add_muon("tall", tall, g1);
      opt.add_muon("wide", wide, g2);
      opt.add_adamw("bias", bias, g3);
      for (int i = 0; i < 3; ++i) opt.step();
      CHECK(same_bits(g1, c1));
      CHECK(same_bits(g2, c2));
      CHECK(same_bits(g3, c3));
    }
}

TEMPLATE_TEST_CASE("momentum buffers follow the EMA and sum forms", "[optimizer]", float, double) {
  for (auto form : {muon::MomentumForm::ema, muon::MomentumForm::sum}) {
    auto opts = muon_options(0.01, 0.0, 0.9);
    opts.muon.momentum_form = form;
    Opt<TestType> opt(opts);
    Mat<TestType> w = gaussian<TestType>(5, 7, 1), g = gaussian<TestType>(5, 7, 2);
    const auto id = opt.add_muon("w", w, g);
    const Mat<TestType> g1 = g;
    opt.step();
    overwrite(g, gaussian<TestType>(5, 7, 3));
    opt.step();
    const Eigen::MatrixXd G1 = g1.template cast<double>(), G2 = g.template cast<double>();
    const Eigen::MatrixXd expect = form == muon::MomentumForm::ema
                                       ? Eigen::MatrixXd(0.9 * (0.1 * G1) + 0.1 * G2)
                                       : Eigen::MatrixXd(0.9 * G1 + G2);
    const auto m = opt.momentum_buffer(id);
    Eigen::MatrixXd got = muon::reference::to_double(m);
    CHECK((got - expect).cwiseAbs().maxCoeff() < 10 * std::numeric_limits<TestType>::epsilon());
  }
}

TEST_CASE("shape scales use the flattened shape of N-D weights", "[optimizer][scale]") {
  // The update formulas, evaluated independently.
  CHECK(muon::shape_scale(muon::ScaleMode::original, 64, 18) == Approx(std::sqrt(64.0 / 18)));
  CHECK(muon::shape_scale(muon::ScaleMode::original, 18, 64) == Approx(1.0));
  CHECK(muon::shape_scale(muon::ScaleMode::match_rms_adamw, 18, 64, 0.2) ==
        Approx(0.2 * std::sqrt(64.0)));
  CHECK(muon::shape_scale(muon::ScaleMode::spectral, 18, 64) == Approx(std::sqrt(18.0 / 64)));
  CHECK(muon::shape_scale(muon::ScaleMode::none, 18, 64) == 1.0);

  // A conv kernel 64 x 2 x 3 x 3 is the matrix 64 x 18: its update is -lr s(64, 18) NS(G),
  // not s(64, 2) (reading the kernel's dimensions) nor s(3, 3).
  for (auto mode : {muon::ScaleMode::original, muon::ScaleMode::match_rms_adamw,
                    muon::ScaleMode::spectral, muon::ScaleMode::none}) {
    auto opts = muon_options(0.01, 0.0, 0.0);  // momentum 0: U = G
    opts.muon.scale = mode;
    Opt<double> opt(opts);
    std::vector<muon::index_t> shape{64, 2, 3, 3};
    Mat<double> w = gaussian<double>(64, 18, 1);
    const Mat<double> g = gaussian<double>(64, 18, 2), w0 = w;
    opt.add_muon("conv", muon::TensorView<double>{w.data(), shape},
                 muon::TensorView<const double>{g.data(), shape});
    opt.step();
    Mat<double> o(64, 18);
    EigenBackend backend;
    muon::orthogonalize(backend, cview(g), muon::view(o));
    const double s = ((w0 - w).array() / (0.01 * o.array())).mean();
    INFO(muon::to_string(mode));
    CHECK(s == Approx(muon::shape_scale(mode, 64, 18)).epsilon(1e-9));
  }
}

TEST_CASE("match_rms_adamw makes the update RMS equal rms_factor", "[optimizer][scale]") {
  for (auto [m, n] : {std::pair{64, 64}, std::pair{32, 128}, std::pair{128, 32}, std::pair{16, 256}}) {
    auto opts = muon_options(1.0, 0.0, 0.0);
    opts.muon.scale = muon::ScaleMode::match_rms_adamw;
    opts.muon.newton_schulz.schedule = muon::Schedule::textbook();  // exact msign
    opts.muon.newton_schulz.steps = 40;
    Opt<double> opt(opts);
    Mat<double> w = Mat<double>::Zero(m, n);
    const Mat<double> g = gaussian<double>(m, n, 3);
    opt.add_muon("w", w, g);
    opt.step();
    INFO(m << "x" << n);
    CHECK(muon::update_rms(cview(w)) == Approx(0.2).epsilon(1e-6));
  }
}

TEST_CASE("telemetry reports each Muon matrix's residual, update RMS and steps",
          "[optimizer][telemetry]") {
  muon::OptimizerOptions oo;
  oo.telemetry = true;
  auto opts = muon_options(0.02, 0.0);
  opts.muon.scale = muon::ScaleMode::match_rms_adamw;
  Opt<float> opt(opts, oo);
  Mat<float> a = gaussian<float>(32, 96, 1), b = gaussian<float>(40, 40, 2),
             c = gaussian<float>(8, 8, 3), bias = gaussian<float>(1, 8, 4);
  const Mat<float> ga = gaussian<float>(32, 96, 5), gb = gaussian<float>(40, 40, 6),
                   gc = gaussian<float>(8, 8, 7), gbias = gaussian<float>(1, 8, 8);
  const auto ida = opt.add_muon("a", a, ga);
  opt.add_adamw("bias", bias, gbias);
  const auto idb = opt.add_muon("b", b, gb);
  const auto idc = opt.add_muon("c", c, gc);
  opt.clear_grad(idc);
  const Mat<float> a0 = a, b0 = b;
  const auto report = opt.step();
  REQUIRE(report.newton_schulz.size() == 2);  // AdamW and gradient-less parameters: no entry
  CHECK(report.newton_schulz[0].param.value == ida.value);
  CHECK(report.newton_schulz[1].param.value == idb.value);
  const std::pair<const Mat<float>*, const Mat<float>*> moved[] = {{&a0, &a}, {&b0, &b}};
  for (std::size_t i = 0; i < 2; ++i) {
    const auto& t = report.newton_schulz[i];
    // O recovered from the weight change (no weight decay): W1 = W0 - lr s O
    const Eigen::MatrixXd step = (moved[i].first->cast<double>() - moved[i].second->cast<double>()) / 0.02;
    const double s = std::sqrt(double(std::max(step.rows(), step.cols()))) * 0.2;
    const Eigen::MatrixXd o = step / s;
    const Eigen::MatrixXd gram = o.rows() <= o.cols() ? Eigen::MatrixXd(o * o.transpose())
                                                      : Eigen::MatrixXd(o.transpose() * o);
    const double residual = (gram - Eigen::MatrixXd::Identity(gram.rows(), gram.cols())).norm() /
                            std::sqrt(double(gram.rows()));
    INFO("matrix " << i << ": reported residual " << t.residual << " (from W: " << residual
                   << "), update RMS " << t.update_rms);
    CHECK(t.steps == 5);
    CHECK(std::abs(t.residual - residual) <= 1e-3);
    CHECK(t.update_rms == Approx(muon::update_rms(muon::MatrixView<const double>(
                                     step.data(), step.rows(), step.cols(), 1, step.rows())))
                              .epsilon(1e-4));
    CHECK(t.update_rms > 0.14);  // keller keeps singular values in [0.7, 1.2]: RMS near 0.2
    CHECK(t.update_rms < 0.24);
  }
  // with a tolerance the report counts the steps it added; without telemetry no entries
  auto tight = opts;
  tight.muon.newton_schulz.tolerance = 1e-4;
  opt.set_group_options({}, tight);
  const auto refined = opt.step();
  REQUIRE(refined.newton_schulz.size() == 2);
  for (const auto& t : refined.newton_schulz) {
    CHECK(t.steps > 5);
    CHECK(t.residual <= 1e-4);
  }
  Opt<float> quiet(opts);
  Mat<float> w = a0;
  quiet.add_muon("w", w, ga);
  CHECK(quiet.step().newton_schulz.empty());
}

TEMPLATE_TEST_CASE("a parameter without a gradient is skipped entirely", "[optimizer]", float,
                   double) {
  Opt<TestType> opt(muon_options(0.02, 0.1));
  Mat<TestType> a = gaussian<TestType>(6, 4, 1), b = gaussian<TestType>(6, 4, 2);
  const Mat<TestType> ga = gaussian<TestType>(6, 4, 3), gb = gaussian<TestType>(6, 4, 4);
  opt.add_muon("a", a, ga);
  const auto idb = opt.add_muon("b", b, gb);
  opt.clear_grad(idb);
  const Mat<TestType> b0 = b;
  const auto report = opt.step();
  CHECK(report.applied);
  CHECK(report.updated == 1);
  CHECK(same_bits(b, b0));  // no weight decay either
  CHECK(muon::reference::to_double(opt.momentum_buffer(idb)).cwiseAbs().maxCoeff() == 0);
  opt.set_grad(idb, cview(gb));
  CHECK(opt.step().updated == 2);
  CHECK(!same_bits(b, b0));
}

TEMPLATE_TEST_CASE("parameter groups carry their own options", "[optimizer]", float, double) {
  Opt<TestType> both(muon_options(0.01, 0.1));
  const auto fast = both.add_group(muon_options(0.05, 0.0));
  Opt<TestType> slow_only(muon_options(0.01, 0.1)), fast_only(muon_options(0.05, 0.0));
  Mat<TestType> w1 = gaussian<TestType>(8, 8, 1), w2 = gaussian<TestType>(8, 12, 2);
  Mat<TestType> v1 = w1, v2 = w2;
  const Mat<TestType> g1 = gaussian<TestType>(8, 8, 3), g2 = gaussian<TestType>(8, 12, 4);
  both.add_muon("slow", w1, g1);
  both.add_muon("fast", w2, g2, fast);
  slow_only.add_muon("slow", v1, g1);
  fast_only.add_muon("fast", v2, g2);
  for (int i = 0; i < 2; ++i) {
    both.step();
    slow_only.step();
    fast_only.step();
  }
  CHECK(same_bits(w1, v1));
  CHECK(same_bits(w2, v2));
  CHECK(both.group_options(fast).muon.lr == 0.05);
}

TEST_CASE("bad hyper-parameters are refused at construction and naming the option",
          "[optimizer][errors]") {
  auto expect_refused = [](auto mutate, const char* field) {
    muon::GroupOptions g;
    mutate(g);
    INFO(field);
    CHECK_THROWS_WITH(Opt<float>(g), Contains(field));
    Opt<float> opt;
    CHECK_THROWS_AS(opt.add_group(g), muon::InvalidArgument);
    CHECK(opt.num_groups() == 1);
    const muon::GroupOptions before = opt.group_options();
    CHECK_THROWS_AS(opt.set_group_options({}, g), muon::InvalidArgument);
    CHECK(opt.group_options().muon.lr == before.muon.lr);
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  expect_refused([](auto& g) { g.muon.lr = -1e-3; }, "muon.lr");
  expect_refused([&](auto& g) { g.muon.lr = nan; }, "muon.lr");
  expect_refused([](auto& g) { g.muon.weight_decay = -0.1; }, "muon.weight_decay");
  expect_refused([&](auto& g) { g.muon.weight_decay = inf; }, "muon.weight_decay");
  expect_refused([](auto& g) { g.muon.momentum = 1.0; }, "muon.momentum");
  expect_refused([](auto& g) { g.muon.momentum = -0.1; }, "muon.momentum");
  expect_refused([&](auto& g) { g.muon.momentum = nan; }, "muon.momentum");
  expect_refused([](auto& g) { g.muon.rms_factor = 0; }, "rms_factor");
  expect_refused([](auto& g) { g.muon.newton_schulz.steps = 0; }, "steps");
  expect_refused([](auto& g) { g.muon.newton_schulz.steps = 1000; }, "steps");
  expect_refused([](auto& g) { g.muon.newton_schulz.eps = 0; }, "eps");
  expect_refused([](auto& g) { g.muon.newton_schulz.schedule = muon::Schedule::custom({}); },
                 "no coefficients");
  expect_refused([](auto& g) { g.adamw.lr = -1; }, "adamw.lr");
  expect_refused([](auto& g) { g.adamw.beta1 = 1.0; }, "adamw.beta1");
  expect_refused([](auto& g) { g.adamw.beta2 = -0.5; }, "adamw.beta2");
  expect_refused([](auto& g) { g.adamw.eps = 0; }, "adamw.eps");
  expect_refused([&](auto& g) { g.adamw.weight_decay = nan; }, "adamw.weight_decay");
}

TEST_CASE("bad registrations name the parameter and its shape and change nothing",
          "[optimizer][errors]") {
  Opt<float> opt;
  Mat<float> w = gaussian<float>(64, 32, 1), other = gaussian<float>(8, 8, 2);
  const Mat<float> g = gaussian<float>(64, 32, 3), wrong = gaussian<float>(32, 64, 4);
  const Mat<float> go = gaussian<float>(8, 8, 5);
  CHECK_THROWS_WITH(opt.add_muon("fc1.weight", w, wrong),
                    Contains("'fc1.weight' (64x32)") && Contains("32x64"));
  opt.add_muon("fc1.weight", w, g);
  CHECK_THROWS_WITH(opt.add_muon("fc1.weight", other, go), Contains("already registered"));
  CHECK_THROWS_WITH(opt.add_muon("alias", w, g), Contains("registered twice"));
  CHECK_THROWS_WITH(opt.add_adamw("alias_block", muon::view(w).block(3, 3, 2, 2),
                                  cview(go).block(0, 0, 2, 2)),
                    Contains("'fc1.weight'"));
  CHECK_THROWS_WITH(opt.add_muon("self", other, other), Contains("the parameter itself"));
  CHECK_THROWS_WITH(opt.add_muon("bad_group", other, go, muon::GroupId{7}), Contains("group"));
  CHECK_THROWS_WITH(opt.add_muon("", other, go), Contains("name"));
  float bias[4] = {}, gbias[4] = {};
  CHECK_THROWS_WITH(opt.add_muon("bias", muon::TensorView<float>{bias, {4}},
                                 muon::TensorView<const float>{gbias, {4}}),
                    Contains("'bias' (4)") && Contains("add_adamw"));
  CHECK_THROWS_WITH(opt.add_muon("conv", muon::TensorView<float>{bias, {2, 2}},
                                 muon::TensorView<const float>{gbias, {1, 4}}),
                    Contains("1x4"));
  CHECK_THROWS_AS(opt.set_grad(muon::ParamId{0}, cview(wrong)), muon::InvalidArgument);
  CHECK_THROWS_AS(opt.set_grad(muon::ParamId{9}, cview(g)), muon::InvalidArgument);
  CHECK(opt.num_params() == 1);
  CHECK_NOTHROW(opt.step());
}

TEST_CASE("NorMuon's convention is refused a change that would resize a registered matrix's "
          "state, and allowed where it does not", "[optimizer][errors]") {
  Mat<float> tall = gaussian<float>(6, 4, 1), wide = gaussian<float>(3, 7, 2);
  const Mat<float> g_tall = gaussian<float>(6, 4, 3), g_wide = gaussian<float>(3, 7, 4);
  muon::GroupOptions eo;
  eo.normuon.convention = muon::NorMuonConvention::emerging_optimizers;
  Opt<float> opt;
  const muon::GroupId second = opt.add_group({});
  opt.add(muon::rules::NorMuon{}, "tall", tall, g_tall);            // per row either way
  opt.add(muon::rules::NorMuon{}, "wide", wide, g_wide, second);  // per row, or per column
  CHECK_NOTHROW(opt.set_group_options({}, eo));
  CHECK_THROWS_WITH(opt.set_group_options(second, eo),
                    Contains("'wide' (3x7)") && Contains("convention") && Contains("nothing was changed"));
  CHECK(opt.group_options(second).normuon.convention == muon::NorMuonConvention::dion);
  opt.step();
  std::ostringstream saved;
  opt.save_state(saved);
  // A state saved under one convention does not load where the wide matrix keeps its state per
  // column: one value per column (7), not per row (3).
  Mat<float> tall2 = tall, wide2 = wide;
  Opt<float> other(eo);
  other.add(muon::rules::NorMuon{}, "tall", tall2, g_tall);
  other.add(muon::rules::NorMuon{}, "wide", wide2, g_wide);
  std::istringstream in(saved.str());
  CHECK_THROWS_AS(other.load_state(in), muon::StateError);
}

TEMPLATE_TEST_CASE("empty matrices are a no-op", "[optimizer]", float, double) {
  Opt<TestType> opt;
  Mat<TestType> w(0, 5), b(3, 0);
  const Mat<TestType> gw(0, 5), gb(3, 0);
  opt.add_muon("w", w, gw);
  opt.add_adamw("b", b, gb);
  const auto r = opt.step();
  CHECK(r.applied);
  CHECK(r.updated == 0);
}

TEMPLATE_TEST_CASE("a non-finite gradient refuses the step and changes nothing", "[optimizer]",
                   float, double) {
  for (double bad : {std::numeric_limits<double>::quiet_NaN(),
                     std::numeric_limits<double>::infinity()}) {
    for (auto policy : {muon::NonFinitePolicy::error, muon::NonFinitePolicy::skip}) {
      Opt<TestType> opt(muon_options(0.02, 0.1), {policy});
      Mat<TestType> a = gaussian<TestType>(6, 9, 1), b = gaussian<TestType>(4, 1, 2);
      Mat<TestType> ga = gaussian<TestType>(6, 9, 3), gb = gaussian<TestType>(4, 1, 4);
      const auto ida = opt.add_muon("a", a, ga);
      opt.add_adamw("b", b, gb);
      opt.step();
      const Mat<TestType> a1 = a, b1 = b;
      const Eigen::MatrixXd m1 = muon::reference::to_double(opt.momentum_buffer(ida));
      const TestType saved = gb(2, 0);
      gb(2, 0) = static_cast<TestType>(bad);
      if (policy == muon::NonFinitePolicy::error) {
        CHECK_THROWS_WITH(opt.step(), Contains("'b' (4x1)") && Contains("NaN or Inf"));
      } else {
        const auto r = opt.step();
        CHECK_FALSE(r.applied);
        CHECK(r.skipped_because == "b");
      }
      CHECK(same_bits(a, a1));
      CHECK(same_bits(b, b1));
      CHECK(opt.step_count() == 1);
      CHECK(muon::reference::to_double(opt.momentum_buffer(ida)) == m1);
      // Recovery: the next good step is the step the refused one would have been.
      gb(2, 0) = saved;
      opt.step();
      Opt<TestType> clean(muon_options(0.02, 0.1));
      Mat<TestType> ca = gaussian<TestType>(6, 9, 1), cb = gaussian<TestType>(4, 1, 2);
      clean.add_muon("a", ca, ga);
      clean.add_adamw("b", cb, gb);
      clean.step();
      clean.step();
      CHECK(same_bits(a, ca));
      CHECK(same_bits(b, cb));
    }
  }
}

TEST_CASE("an overflowing momentum is never applied: that parameter is left as it was",
          "[optimizer][robust]") {
  // Sum-form momentum on entries of 1e38: M = 1e38, 1.95e38, 2.85e38; the Nesterov input
  // G + 0.95 M reaches 3.7e38 > FLT_MAX at the third step, so Newton-Schulz sees Inf.
  for (auto policy : {muon::NonFinitePolicy::error, muon::NonFinitePolicy::skip}) {
    muon::GroupOptions g = muon_options(0.02, 0.1);
    g.muon.momentum_form = muon::MomentumForm::sum;
    Opt<float> opt(g, {policy});
    Mat<float> w = gaussian<float>(8, 24, 1), other = gaussian<float>(8, 8, 2);
    Mat<float> gw = Mat<float>::Constant(8, 24, 1e38f);
    const Mat<float> gother = gaussian<float>(8, 8, 3);
    const auto id = opt.add_muon("huge", w, gw);
    opt.add_muon("other", other, gother);
    opt.step();
    opt.step();
    const Mat<float> w2 = w, other2 = other;
    const Mat<float> m2 = Mat<float>(Eigen::Map<const Mat<float>>(
        opt.momentum_buffer(id).data(), 8, 24));
    std::stringstream before;
    opt.save_state(before);
    if (policy == muon::NonFinitePolicy::error) {
      try {
        opt.step();
        FAIL("no NonFiniteUpdate");
      } catch (const muon::NonFiniteUpdate& e) {
        CHECK(e.parameter() == "huge");
        CHECK_THAT(e.what(), Contains("'huge' (8x24)") && Contains("left as they were"));
      }
    } else {
      const auto r = opt.step();
      CHECK(r.applied);
      CHECK(r.refused == 1);
      CHECK(r.updated == 1);
      CHECK(r.skipped_because == "huge");
    }
    CHECK(w.allFinite());
    CHECK(same_bits(w, w2));  // neither the parameter ...
    CHECK(same_bits(Mat<float>(Eigen::Map<const Mat<float>>(opt.momentum_buffer(id).data(), 8, 24)),
                    m2));     // ... nor its momentum moved
    CHECK_FALSE(same_bits(other, other2));  // the other parameter took the step
    CHECK(opt.step_count() == 3);
    // The next good step of 'huge' is the step the refused one would have been.
    overwrite(gw, -gw);  // M + G, U back in range
    opt.step();
    Opt<float> resumed(g, {policy});
    Mat<float> rw = w2, rother = other2;
    resumed.add_muon("huge", rw, gw);
    resumed.add_muon("other", rother, gother);
    resumed.load_state(before);
    resumed.step();
    CHECK(w.allFinite());
    CHECK(same_bits(w, rw));
  }
}

TEMPLATE_TEST_CASE("NonFinitePolicy::unchecked steps through a NaN gradient as torch does",
                   "[optimizer]", float, double) {
  // No check and no refusal: the NaN reaches the AdamW parameter it belongs to; the finite
  // Muon parameter updates exactly as under the checked policy.
  Opt<TestType> unchecked(muon_options(0.02, 0.1), {muon::NonFinitePolicy::unchecked});
  Opt<TestType> checked(muon_options(0.02, 0.1));
  Mat<TestType> a = gaussian<TestType>(6, 9, 1), b = gaussian<TestType>(4, 1, 2);
  Mat<TestType> ca = a, cb = b;
  const Mat<TestType> ga = gaussian<TestType>(6, 9, 3);
  Mat<TestType> gb = gaussian<TestType>(4, 1, 4);
  unchecked.add_muon("a", a, ga);
  unchecked.add_adamw("b", b, gb);
  checked.add_muon("a", ca, ga);
  gb(2, 0) = std::numeric_limits<TestType>::quiet_NaN();
  const auto r = unchecked.step();
  checked.step();
  CHECK(r.applied);
  CHECK(r.updated == 2);
  CHECK(unchecked.step_count() == 1);
  CHECK(std::isnan(b(2, 0)));
  CHECK(std::isfinite(b(0, 0)));
  CHECK(same_bits(a, ca));
}

TEMPLATE_TEST_CASE("strided, column-major and mapped parameters update like dense ones",
                   "[optimizer][views]", float, double) {
  // Reference: dense row-major registration.
  const Mat<TestType> w0 = gaussian<TestType>(12, 5, 1), g = gaussian<TestType>(12, 5, 2);
  Mat<TestType> dense = w0;
  Opt<TestType> ref(muon_options(0.02, 0.1));
  ref.add_muon("w", dense, g);
  ref.step();
  ref.step();
  auto close = [&](const auto& got) {
    return (Mat<TestType>(got) - dense).cwiseAbs().maxCoeff() <=
           4 * std::numeric_limits<TestType>::epsilon();
  };

  // Column-major Eigen matrix with a column-major gradient.
  Eigen::Matrix<TestType, Eigen::Dynamic, Eigen::Dynamic> cm = w0, gcm = g;
  Opt<TestType> o1(muon_options(0.02, 0.1));
  o1.add_muon("w", cm, gcm);
  o1.step();
  o1.step();
  CHECK(close(cm));

  // Two disjoint column blocks of one fused matrix (e.g. per-head splits), registered apart.
  Mat<TestType> fused(12, 10), gfused(12, 10);
  fused << w0, w0;
  gfused << g, g;
  Opt<TestType> o2(muon_options(0.02, 0.1));
  auto left = fused.leftCols(5), right = fused.rightCols(5);
  o2.add_muon("left", left, gfused.leftCols(5));
  o2.add_muon("right", right, gfused.rightCols(5));
  o2.step();
  o2.step();
  CHECK(close(fused.leftCols(5)));
  CHECK(close(fused.rightCols(5)));

  // Eigen::Map over a raw buffer and an Eigen::Ref.
  std::vector<TestType> raw(w0.data(), w0.data() + w0.size());
  Eigen::Map<Mat<TestType>> map(raw.data(), 12, 5);
  Opt<TestType> o3(muon_options(0.02, 0.1));
  o3.add_muon("w", map, g);
  o3.step();
  o3.step();
  CHECK(close(map));
}

// ---- matrices side by side, expert stacks and split matrices ------------------------------

TEMPLATE_TEST_CASE("a matrix steps to the same bits alone or side by side with others",
                   "[optimizer][grouped]", float, double) {
  // Six matrices of two shapes in one optimizer (spread over the workers, costliest first)
  // against one optimizer per matrix: each matrix's result depends on its shape only.
  const std::pair<int, int> shapes[] = {{32, 64}, {32, 64}, {48, 16}, {32, 64}, {48, 16}, {32, 64}};
  std::vector<Mat<TestType>> w, alone, g;
  for (unsigned i = 0; i < 6; ++i) {
    w.push_back(gaussian<TestType>(shapes[i].first, shapes[i].second, 10 + i));
    alone.push_back(w.back());
    g.push_back(gaussian<TestType>(shapes[i].first, shapes[i].second, 20 + i));
  }
  Opt<TestType> together(muon_options(0.02, 0.1));
  std::deque<Opt<TestType>> single;
  for (std::size_t i = 0; i < 6; ++i) {
    together.add_muon("w" + std::to_string(i), w[i], g[i]);
    single.emplace_back(muon_options(0.02, 0.1)).add_muon("w", alone[i], g[i]);
  }
  for (int s = 0; s < 3; ++s) {
    CHECK(together.step().updated == 6);
    for (auto& o : single) o.step();
  }
  for (std::size_t i = 0; i < 6; ++i) {
    INFO("matrix " << i);
    CHECK(same_bits(w[i], alone[i]));
  }
  // ... and within rounding of one-off orthogonalizations on the BLAS's threads.
  Mat<TestType> m = Mat<TestType>::Zero(32, 64), v0 = gaussian<TestType>(32, 64, 10), u(32, 64);
  Mat<TestType> expected = v0;
  for (int s = 0; s < 3; ++s) {  // torch's Muon step, written out
    m = 0.95 * m + 0.05 * g[0];
    const Mat<TestType> nesterov = 0.05 * g[0] + 0.95 * m;
    muon::EigenBackend backend;
    muon::orthogonalize(backend, cview(nesterov), muon::view(u));
    expected = expected * TestType(1 - 0.02 * 0.1) - TestType(0.02) * u;
  }
  CHECK((w[0] - expected).cwiseAbs().maxCoeff() < 10 * Tol<TestType>::ns * 0.02 * 3);
}

TEST_CASE("with bf16 Newton-Schulz a matrix steps to the same bits alone or side by side, "
          "run after run", "[optimizer][grouped][bf16]") {
  if (!muon::cpu::has_bf16()) {
    WARN("this CPU has no AVX512-BF16: nothing to check");
    return;
  }
  const muon::EigenBackend bf16(muon::CpuOptions{muon::cpu::Precision::bfloat16});
  // wide, tall and square, two of each; a 192 x 384 one too large to run side by side
  const std::pair<int, int> shapes[] = {{32, 64}, {48, 16}, {40, 40}, {32, 64}, {48, 16},
                                        {40, 40}, {192, 384}};
  constexpr std::size_t n = std::size(shapes);
  std::vector<Mat<float>> w, alone, again, g;
  for (unsigned i = 0; i < n; ++i) {
    w.push_back(gaussian<float>(shapes[i].first, shapes[i].second, 10 + i));
    g.push_back(gaussian<float>(shapes[i].first, shapes[i].second, 20 + i));
  }
  alone = again = w;
  Opt<float> together(muon_options(0.02, 0.1), {}, bf16), twice(muon_options(0.02, 0.1), {}, bf16);
  std::deque<Opt<float>> single;
  for (std::size_t i = 0; i < n; ++i) {
    together.add_muon("w" + std::to_string(i), w[i], g[i]);
    twice.add_muon("w" + std::to_string(i), again[i], g[i]);
    single.emplace_back(muon_options(0.02, 0.1), muon::OptimizerOptions{}, bf16)
        .add_muon("w", alone[i], g[i]);
  }
  for (int s = 0; s < 3; ++s) {
    CHECK(together.step().updated == n);
    twice.step();
    for (auto& o : single) o.step();
  }
  const Mat<float> w0_float32 = [&] {  // matrix 0 with float32 products
    Mat<float> v = gaussian<float>(32, 64, 10);
    Opt<float> o(muon_options(0.02, 0.1), {},
                 muon::EigenBackend(muon::CpuOptions{muon::cpu::Precision::float32}));
    o.add_muon("w", v, g[0]);
    for (int s = 0; s < 3; ++s) o.step();
    return v;
  }();
  for (std::size_t i = 0; i < n; ++i) {
    INFO("matrix " << i);
    CHECK(same_bits(w[i], alone[i]));
    CHECK(same_bits(w[i], again[i]));
  }
  // bf16 is not float32: the updates differ, by bf16 rounding of lr-sized steps
  const double gap = (w[0] - w0_float32).cwiseAbs().maxCoeff();
  CHECK(gap > 0);
  CHECK(gap < 0.02 * 3 * 0.05);
}

TEMPLATE_TEST_CASE("an expert stack steps as its experts registered one by one",
                   "[optimizer][grouped]", float, double) {
  // 4 experts of 12 x 5 (tall: the shape scale is sqrt(12/5) per expert, not that of the
  // flattened 4 x 60), stored as one 4 x 12 x 5 tensor with one momentum buffer.
  const muon::index_t E = 4, m = 12, n = 5;
  std::vector<TestType> stack(static_cast<std::size_t>(E * m * n)), grad(stack.size());
  std::vector<Mat<TestType>> experts, grads;
  for (muon::index_t e = 0; e < E; ++e) {
    experts.push_back(gaussian<TestType>(m, n, 30 + unsigned(e)));
    grads.push_back(gaussian<TestType>(m, n, 40 + unsigned(e)));
    std::copy_n(experts.back().data(), m * n, stack.data() + e * m * n);
    std::copy_n(grads.back().data(), m * n, grad.data() + e * m * n);
  }
  Opt<TestType> stacked(muon_options(0.02, 0.1)), separate(muon_options(0.02, 0.1));
  const auto id = stacked.add_muon("experts", muon::TensorView<TestType>{stack.data(), {E, m, n}},
                                   muon::TensorView<const TestType>{grad.data(), {E, m, n}},
                                   muon::Experts{});
  CHECK(stacked.num_matrices(id) == 4);
  for (muon::index_t e = 0; e < E; ++e)
    separate.add_muon("e" + std::to_string(e), experts[std::size_t(e)], grads[std::size_t(e)]);
  for (int s = 0; s < 3; ++s) {
    stacked.step();
    separate.step();
  }
  for (muon::index_t e = 0; e < E; ++e) {
    INFO("expert " << e);
    const Mat<TestType> got = Eigen::Map<const Mat<TestType>>(stack.data() + e * m * n, m, n);
    CHECK(same_bits(got, experts[std::size_t(e)]));
  }
  // One state record for the stack.
  std::stringstream state;
  stacked.save_state(state);
  Opt<TestType> again(muon_options(0.02, 0.1));
  again.add_muon("experts", muon::TensorView<TestType>{stack.data(), {E, m, n}},
                 muon::TensorView<const TestType>{grad.data(), {E, m, n}}, muon::Experts{});
  again.load_state(state);
  CHECK(again.step_count() == 3);
  // Through any view: the flattened E x (m n) matrix and the rows of one expert.
  Mat<TestType> flat = Mat<TestType>::Zero(E, m * n), flat_grad = Mat<TestType>::Zero(E, m * n);
  Opt<TestType> viewed(muon_options(0.02, 0.1));
  CHECK(viewed.add_muon("flat", flat, flat_grad, muon::Experts{m}).value == 0);
  CHECK_THROWS_WITH(viewed.add_muon("bad", flat_grad, flat, muon::Experts{7}),
                    Contains("'bad' (4x60)") && Contains("experts of 7 rows do not divide"));
}

TEST_CASE("add(rule, ...) registers every form as the short forms add_muon / add_adamw do",
          "[optimizer]") {
  // A matrix, a split matrix, an expert stack and an N-D AdamW tensor, each registered twice:
  // through the short forms and through the rule's policy object.
  struct Model {
    Mat<float> w = gaussian<float>(9, 7, 1), gw = gaussian<float>(9, 7, 2);
    Mat<float> q = gaussian<float>(8, 6, 3), gq = gaussian<float>(8, 6, 4);
    Mat<float> b = gaussian<float>(1, 5, 5), gb = gaussian<float>(1, 5, 6);
    std::vector<float> stack = std::vector<float>(2 * 3 * 4, 0.5f), gstack = std::vector<float>(24, 0.25f);
    std::vector<float> t = std::vector<float>(2 * 2 * 3, 1.0f), gt = std::vector<float>(12, -0.5f);
  };
  Model a, b;
  Opt<float> short_forms(muon_options(0.02, 0.1)), by_rule(muon_options(0.02, 0.1));
  short_forms.add_muon("w", a.w, a.gw);
  short_forms.add_muon("q", a.q, a.gq, muon::Split{0, {4, 4}});
  short_forms.add_muon("e", muon::TensorView<float>{a.stack.data(), {2, 3, 4}},
                       muon::TensorView<const float>{a.gstack.data(), {2, 3, 4}}, muon::Experts{});
  short_forms.add_adamw("b", a.b, a.gb);
  short_forms.add_adamw("t", muon::TensorView<float>{a.t.data(), {2, 2, 3}},
                        muon::TensorView<const float>{a.gt.data(), {2, 2, 3}});
  by_rule.add(muon::rules::Muon{}, "w", b.w, b.gw);
  by_rule.add(muon::rules::Muon{}, "q", b.q, b.gq, muon::Split{0, {4, 4}});
  by_rule.add(muon::rules::Muon{}, "e", muon::TensorView<float>{b.stack.data(), {2, 3, 4}},
              muon::TensorView<const float>{b.gstack.data(), {2, 3, 4}}, muon::Experts{});
  by_rule.add(muon::rules::AdamW{}, "b", b.b, b.gb);
  by_rule.add(muon::rules::AdamW{}, "t", muon::TensorView<float>{b.t.data(), {2, 2, 3}},
              muon::TensorView<const float>{b.gt.data(), {2, 2, 3}});
  REQUIRE(by_rule.num_matrices(muon::ParamId{1}) == 2);
  REQUIRE(by_rule.num_matrices(muon::ParamId{2}) == 2);
  for (int s = 0; s < 2; ++s) {
    short_forms.step();
    by_rule.step();
  }
  CHECK(same_bits(a.w, b.w));
  CHECK(same_bits(a.q, b.q));
  CHECK(same_bits(a.b, b.b));
  CHECK(a.stack == b.stack);
  CHECK(a.t == b.t);
  CHECK(a.w != gaussian<float>(9, 7, 1));  // the weights moved
  std::stringstream x, y;
  short_forms.save_state(x);
  by_rule.save_state(y);
  CHECK(x.str() == y.str());
}

TEMPLATE_TEST_CASE("a split matrix steps as its blocks registered one by one",
                   "[optimizer][grouped]", float, double) {
  // A fused QKV weight (rows 8 + 8 + 4, grouped-query style) and per-head column blocks.
  for (int axis : {0, 1}) {
    INFO("axis " << axis);
    const std::vector<muon::index_t> sizes = axis == 0 ? std::vector<muon::index_t>{8, 8, 4}
                                                       : std::vector<muon::index_t>{6, 0, 6, 12};
    Mat<TestType> fused = gaussian<TestType>(20, 24, 50), fused_grad = gaussian<TestType>(20, 24, 51);
    std::vector<Mat<TestType>> blocks, grads;
    muon::index_t at = 0;
    for (muon::index_t s : sizes) {
      if (axis == 0) {
        blocks.push_back(fused.middleRows(at, s));
        grads.push_back(fused_grad.middleRows(at, s));
      } else {
        blocks.push_back(fused.middleCols(at, s));
        grads.push_back(fused_grad.middleCols(at, s));
      }
      at += s;
    }
    Opt<TestType> split(muon_options(0.02, 0.1)), separate(muon_options(0.02, 0.1));
    split.add_muon("qkv", fused, fused_grad, muon::Split{axis, sizes});
    for (std::size_t i = 0; i < blocks.size(); ++i)
      if (blocks[i].size() > 0) separate.add_muon("b" + std::to_string(i), blocks[i], grads[i]);
    for (int s = 0; s < 3; ++s) {
      split.step();
      separate.step();
    }
    at = 0;
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      const Mat<TestType> got = axis == 0 ? Mat<TestType>(fused.middleRows(at, sizes[i]))
                                          : Mat<TestType>(fused.middleCols(at, sizes[i]));
      CHECK(same_bits(got, blocks[i]));
      at += sizes[i];
    }
  }
  Mat<TestType> w = Mat<TestType>::Zero(6, 4), g = Mat<TestType>::Zero(6, 4);
  Opt<TestType> opt;
  CHECK_THROWS_WITH(opt.add_muon("qkv", w, g, muon::Split{0, {2, 2}}),
                    Contains("'qkv' (6x4)") && Contains("split sizes add up to 4 but axis 0 has 6"));
  CHECK_THROWS_WITH(opt.add_muon("qkv", w, g, muon::Split{2, {6}}), Contains("split axis 2"));
  CHECK_THROWS_WITH(opt.add_muon("qkv", w, g, muon::Split{1, {5, -1}}), Contains("negative"));
  CHECK(opt.num_params() == 0);  // nothing was registered by the refusals
}

namespace {

/// The CPU backend seen as a batching backend (RunsBatched, as the CUDA backend is for float):
/// newton_schulz_stack runs its stack one matrix after the other, so the optimizer's batched
/// path (stacking inputs, one call, finishing each result) is checked here against its
/// per-matrix path. One worker, so nothing runs side by side.
struct StackingBackend : EigenBackend {
  [[nodiscard]] int workers() const { return 1; }
  template <class T>
  void newton_schulz_stack(muon::MatrixView<const T> in, muon::index_t in_stride,
                           muon::MatrixView<T> out, muon::index_t out_stride, muon::index_t batch,
                           std::span<const muon::Coefficients> schedule, double norm_scale,
                           double eps, muon::NewtonSchulzMethod method) {
    ++stacks;
    const muon::index_t rows = in.rows(), cols = in.cols();
    muon::NewtonSchulzWorkspace<EigenBackend, T> ws;
    ws.reserve(*this, rows, cols, method);
    for (muon::index_t b = 0; b < batch; ++b) {
      copy(muon::MatrixView<const T>(in.data() + b * in_stride, rows, cols, in.row_stride(), in.col_stride()),
           ws.input(*this, rows, cols));
      copy(ws.run(*this, rows, cols, schedule, norm_scale, eps, method),
           muon::MatrixView<T>(out.data() + b * out_stride, rows, cols, out.row_stride(), out.col_stride()));
    }
  }
  // One verdict for several scans (as a GPU backend gives), counted, and the one-matrix check.
  void begin_finite_scan() { scan_finite_so_far = true; }
  template <class T>
  void scan_finite(muon::MatrixView<const T> x) {
    scan_finite_so_far = scan_finite_so_far && EigenBackend::all_finite(x);
  }
  bool end_finite_scan() {
    ++verdicts;
    return scan_finite_so_far;
  }
  template <class T>
  bool all_finite(muon::MatrixView<const T> x) {
    ++single_checks;
    return EigenBackend::all_finite(x);
  }
  int stacks = 0, verdicts = 0, single_checks = 0;
  bool scan_finite_so_far = true;
};
static_assert(muon::RunsBatched<StackingBackend, float> && muon::RunsBatched<StackingBackend, double>);
static_assert(muon::ScansFiniteTogether<StackingBackend, float>);

}  // namespace

TEMPLATE_TEST_CASE("a batching backend steps each matrix of a stack as one by one",
                   "[optimizer][grouped]", float, double) {
  // Three 16x40 matrices of group 0 go in one stack; a fourth in group 1 (another lr), a 24x8
  // and a cleared one do not. Against the same optimizer with grouped = false.
  muon::GroupOptions slow = muon_options(0.02, 0.1);
  slow.muon.momentum_form = muon::MomentumForm::sum;
  muon::GroupOptions fast = slow;
  fast.muon.lr = 0.05;
  std::vector<Mat<TestType>> w, v, g;
  const std::pair<int, int> shapes[] = {{16, 40}, {16, 40}, {24, 8}, {16, 40}, {16, 40}, {16, 40}};
  for (unsigned i = 0; i < 6; ++i) {
    w.push_back(gaussian<TestType>(shapes[i].first, shapes[i].second, 60 + i));
    v.push_back(w.back());
    g.push_back(gaussian<TestType>(shapes[i].first, shapes[i].second, 70 + i));
  }
  if constexpr (std::is_same_v<TestType, float>)  // overflows in the sum-form Nesterov input at step 3
    g[1].setConstant(1e38f);
  muon::OptimizerOptions one_by_one;
  one_by_one.grouped = false;
  one_by_one.non_finite = muon::NonFinitePolicy::skip;
  muon::OptimizerOptions grouped = one_by_one;
  grouped.grouped = true;
  muon::Optimizer<StackingBackend, TestType> batched(slow, grouped), loop(slow, one_by_one);
  for (auto* opt : {&batched, &loop}) {
    const auto fast_group = opt->add_group(fast);
    auto& m = opt == &batched ? w : v;
    for (std::size_t i = 0; i < 6; ++i)
      opt->add_muon("w" + std::to_string(i), m[i], g[i], i == 4 ? fast_group : muon::GroupId{});
    opt->clear_grad(muon::ParamId{5});
  }
  for (int s = 0; s < 3; ++s) {
    const auto a = batched.step(), b = loop.step();
    CHECK(a.updated == b.updated);
    CHECK(a.refused == b.refused);
    CHECK(a.skipped_because == b.skipped_because);
  }
  CHECK(batched.backend().stacks == 3);  // one stack (w0, w1, w3) a step
  CHECK(loop.backend().stacks == 0);
  // A step's verdicts: one for the gradients, one for the stack's results. Only w2 and w4 are
  // checked one by one, and the stack's matrices too in float's step 3, whose stack overflowed.
  CHECK(batched.backend().verdicts == 6);
  CHECK(batched.backend().single_checks == (std::is_same_v<TestType, float> ? 9 : 6));
  for (std::size_t i = 0; i < 6; ++i) {
    INFO("matrix " << i);
    CHECK(same_bits(w[i], v[i]));
  }
  if constexpr (std::is_same_v<TestType, float>) CHECK(w[1].allFinite());
}

TEST_CASE("enumerators outside their enum are refused where given, naming the field",
          "[optimizer][errors]") {
  const auto expect_refused = [](auto mutate, const char* field) {
    muon::GroupOptions g;
    mutate(g);
    INFO(field);
    CHECK_THROWS_WITH(Opt<float>(g), Contains(field) && Contains("not one of its enumerators"));
    Opt<float> opt;
    CHECK_THROWS_WITH(opt.set_group_options({}, g), Contains(field));
    CHECK(opt.group_options().muon.scale == muon::ScaleMode::original);
  };
  expect_refused([](auto& g) { g.muon.scale = static_cast<muon::ScaleMode>(42); }, "muon.scale");
  expect_refused([](auto& g) { g.muon.momentum_form = static_cast<muon::MomentumForm>(7); },
                 "muon.momentum_form");
  expect_refused(
      [](auto& g) { g.muon.newton_schulz.method = static_cast<muon::NewtonSchulzMethod>(9); },
      "newton_schulz.method");
  expect_refused([](auto& g) { g.normuon.convention = static_cast<muon::NorMuonConvention>(2); },
                 "normuon.convention");
  muon::OptimizerOptions o;
  o.non_finite = static_cast<muon::NonFinitePolicy>(5);
  CHECK_THROWS_WITH(Opt<float>({}, o), Contains("non_finite"));
}

TEST_CASE("a parameter view that reaches an element twice is refused and disjoint interleaved "
          "views are accepted", "[optimizer][errors][views]") {
  Opt<float> opt;
  std::vector<float> p(64, 0.f), g(64, 0.f);
  // Four rows on top of each other (row stride 0), rows of 8 two apart: step() would write
  // elements twice.
  CHECK_THROWS_WITH(opt.add_muon("a", muon::MatrixView<float>{p.data(), 4, 8, 0, 1},
                                 muon::MatrixView<const float>{g.data(), 4, 8, 8, 1}),
                    Contains("'a' (4x8)") && Contains("reaches some elements twice"));
  CHECK_THROWS_WITH(opt.add_adamw("b", muon::MatrixView<float>{p.data(), 4, 8, 2, 1},
                                  muon::MatrixView<const float>{g.data(), 4, 8, 8, 1}),
                    Contains("'b' (4x8)") && Contains("strides 2, 1"));
  CHECK(opt.num_params() == 0);
  // Even and odd columns of one buffer are disjoint: both register and step.
  const muon::MatrixView<float> even{p.data(), 4, 8, 16, 2}, odd{p.data() + 1, 4, 8, 16, 2};
  const muon::MatrixView<const float> g_even{g.data(), 4, 8, 16, 2}, g_odd{g.data() + 1, 4, 8, 16, 2};
  opt.add_muon("even", even, g_even);
  CHECK_NOTHROW(opt.add_muon("odd", odd, g_odd));
  CHECK_THROWS_WITH(opt.add_adamw("again", muon::MatrixView<float>{p.data() + 2, 2, 2, 16, 2},
                                  muon::MatrixView<const float>{g.data() + 2, 2, 2, 16, 2}),
                    Contains("'even'"));
  // Strides (3, 2) over 2x2 touch offsets 0, 2, 3, 5: distinct, though not a plain layout.
  std::vector<float> q(6, 0.f), gq(6, 0.f);
  CHECK_NOTHROW(opt.add_adamw("odd_strides", muon::MatrixView<float>{q.data(), 2, 2, 3, 2},
                              muon::MatrixView<const float>{gq.data(), 2, 2, 3, 2}));
  // A view spanning more than the address space is named for what it is.
  const muon::index_t huge = muon::index_t(1) << 40;
  CHECK_THROWS_WITH(opt.add_adamw("huge", muon::MatrixView<float>{p.data(), huge, huge, huge, 1},
                                  muon::MatrixView<const float>{g.data(), huge, huge, huge, 1}),
                    Contains("'huge'") && Contains("spans more than the address space"));
  CHECK(opt.num_params() == 3);
  CHECK_NOTHROW(opt.step());
}

TEST_CASE("element-exact overlap of equally strided views agrees with brute force",
          "[views]") {
  // Every pair of small views with the same strides (including negative and zero) over one
  // buffer: views_overlap must say exactly whether a common element exists.
  std::vector<float> buffer(400);
  float* base = buffer.data() + 200;
  int checked = 0;
  for (muon::index_t rs : {-7, -3, 0, 2, 3, 5, 9})
    for (muon::index_t cs : {-2, 1, 2, 3})
      for (muon::index_t shift = -12; shift <= 12; shift += 1)
        for (muon::index_t rows : {1, 2, 3})
          for (muon::index_t cols : {1, 3, 4}) {
            const muon::MatrixView<float> a{base, 3, 4, rs, cs}, b{base + shift, rows, cols, rs, cs};
            bool common = false;
            for (muon::index_t i = 0; i < 3; ++i)
              for (muon::index_t j = 0; j < 4; ++j)
                for (muon::index_t k = 0; k < rows; ++k)
                  for (muon::index_t l = 0; l < cols; ++l) common |= &a(i, j) == &b(k, l);
            INFO(rs << " " << cs << " " << shift << " " << rows << "x" << cols);
            REQUIRE(muon::detail::views_overlap(a, b) == common);
            bool distinct = true;
            for (muon::index_t i = 0; i < rows * cols; ++i)
              for (muon::index_t j = i + 1; j < rows * cols; ++j)
                distinct &= &b(i / cols, i % cols) != &b(j / cols, j % cols);
            REQUIRE(muon::detail::elements_distinct(b) == distinct);
            ++checked;
          }
  CHECK(checked == 7 * 4 * 25 * 9);
}

namespace {
/// A gradient type whose adapter can hold a step() inside it: the watch_storage check calls
/// muon_view on it at the start of every step, which lets a test enter an optimizer from a
/// second thread while the first is known to be inside.
struct Gate {
  Mat<float> g = Mat<float>::Zero(6, 4);
  std::atomic<int>* inside = nullptr;  // set: the next view announces itself and waits
  std::atomic<bool>* release = nullptr;
};
muon::MatrixView<const float> muon_view(const Gate& gate) {
  // Call 0 is registration's view, call 1 the watch's first read; call 2 is in step().
  if (gate.inside != nullptr && gate.inside->fetch_add(1) == 2)
    while (!gate.release->load()) std::this_thread::yield();
  return muon::view(gate.g);
}
}  // namespace

TEST_CASE("a second thread entering a busy optimizer is refused and disturbs nothing",
          "[optimizer][errors]") {
  muon::OptimizerOptions o;
  o.watch_storage = true;
  Opt<float> opt({}, o), alone({}, o);
  Mat<float> w = gaussian<float>(6, 4, 1), w_alone = w;
  Gate gate, gate_alone;
  gate.g = gate_alone.g = gaussian<float>(6, 4, 2);
  std::atomic<int> inside{0};
  std::atomic<bool> release{false};
  gate.inside = &inside;
  gate.release = &release;
  opt.add_muon("w", w, gate);
  alone.add_muon("w", w_alone, gate_alone);
  std::thread first([&] { opt.step(); });
  while (inside.load() < 3) std::this_thread::yield();  // the first step() is inside
  CHECK_THROWS_AS(opt.step(), muon::ConcurrentUse);
  CHECK_THROWS_WITH(opt.clear_grad(muon::ParamId{0}), Contains("not thread-safe"));
  Mat<float> other = gaussian<float>(2, 2, 3), g_other = other;
  CHECK_THROWS_AS(opt.add_adamw("late", other, g_other), muon::ConcurrentUse);
  release = true;
  first.join();
  alone.step();
  CHECK(same_bits(w, w_alone));  // the refused calls changed nothing
  CHECK(opt.num_params() == 1);
  CHECK(opt.step_count() == 1);
  CHECK_NOTHROW(opt.step());  // and the flag is free again
}

TEST_CASE("watch_storage: a gradient object given new storage is refused by name",
          "[optimizer][errors]") {
  const auto make_grad = [](std::uint64_t seed) { return Mat<float>(gaussian<float>(6, 4, seed)); };
  muon::OptimizerOptions o;
  o.watch_storage = true;
  Opt<float> opt({}, o);
  Mat<float> w = gaussian<float>(6, 4, 1), g = make_grad(2);
  opt.add_muon("fc.weight", w, g);
  g = make_grad(3) * 2;  // an expression: written into g's storage, fine
  CHECK_NOTHROW(opt.step());
  const Mat<float> before = w;
  g = make_grad(4);  // move-assigned: g now holds other memory than the optimizer's view
  CHECK_THROWS_WITH(opt.step(), Contains("'fc.weight' (6x4)") && Contains("G = make_grad()"));
  CHECK(same_bits(w, before));
  opt.set_grad(muon::ParamId{0}, cview(g));  // pointing it at the new storage mends it
  CHECK_NOTHROW(opt.step());
  // Off (the default), the same assignment goes unchecked: the docs show the in-place idiom.
  CHECK_FALSE(muon::OptimizerOptions{}.watch_storage);
}

TEST_CASE("temporary blocks and maps register as views of the matrix they look at",
          "[optimizer][views]") {
  Mat<float> w = gaussian<float>(8, 8, 1), g = gaussian<float>(8, 8, 2);
  Mat<float> c = w.block(2, 2, 4, 4), gc = g.block(2, 2, 4, 4);
  Opt<float> a, b;
  a.add_muon("c", w.block(2, 2, 4, 4), g.block(2, 2, 4, 4));  // rvalue blocks
  b.add_muon("c", c, gc);
  a.step();
  b.step();
  CHECK(same_bits(Mat<float>(w.block(2, 2, 4, 4)), c));
  CHECK(w(0, 0) == gaussian<float>(8, 8, 1)(0, 0));  // outside the block: untouched
}

// ---- QK-clip -------------------------------------------------------------------------------

namespace {

/// One attention layer of a fused [Q; K; V] weight (rows: `heads` query heads, then `key_heads`
/// key heads, then the values, each head `dh` rows): the largest logit of each query head over
/// the tokens x (one per row), (x Wq_h^T)(x Wk_g^T)^T / sqrt(dh), computed in double.
template <class T>
std::vector<double> max_logits(const Mat<T>& w, const Eigen::MatrixXd& x, int heads,
                               int key_heads, int dh) {
  const Eigen::MatrixXd wd = w.template cast<double>();
  std::vector<double> out;
  for (int h = 0; h < heads; ++h) {
    const int g = h / (heads / key_heads);
    const Eigen::MatrixXd q = x * wd.middleRows(h * dh, dh).transpose();
    const Eigen::MatrixXd k = x * wd.middleRows((heads + g) * dh, dh).transpose();
    out.push_back((q * k.transpose()).maxCoeff() / std::sqrt(double(dh)));
  }
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("QK-clip brings each offending head's largest logit to tau, by the paper's "
                   "formula, and nothing else moves", "[qk_clip]", float, double) {
  using T = TestType;
  const int dh = 4, d_model = 12;
  const auto [heads, key_heads, alpha] = GENERATE(std::tuple{4, 4, 0.5}, std::tuple{4, 2, 0.5},
                                                  std::tuple{4, 4, 0.25});
  INFO(heads << " query heads, " << key_heads << " key heads, alpha " << alpha);
  const int rows = (heads + 2 * key_heads) * dh;
  Mat<T> w = gaussian<T>(rows, d_model, 1), g = gaussian<T>(rows, d_model, 2);
  const Eigen::MatrixXd x = gaussian<double>(10, d_model, 3) * 1.5;
  Opt<T> opt;
  const auto id = opt.add_muon("qkv", w, g);
  opt.step();
  const Mat<T> stepped = w;
  const Mat<T> momentum = Mat<T>(muon::reference::to_double(opt.momentum_buffer(id)).template cast<T>());
  std::vector<double> s = max_logits(w, x, heads, key_heads, dh);
  std::vector<double> group(key_heads, -1e300);
  for (int h = 0; h < heads; ++h) group[h / (heads / key_heads)] = std::max(group[h / (heads / key_heads)], s[h]);
  const double tau = *std::min_element(group.begin(), group.end()) +
                     0.5 * (*std::max_element(group.begin(), group.end()) - *std::min_element(group.begin(), group.end()));
  const auto clip = opt.add_qk_clip(id, id, muon::AttentionHeads::contiguous(heads, dh, 0, heads * dh, key_heads),
                                    {tau, alpha});
  const muon::QkClipReport r = opt.clip_qk(clip, std::span<const double>(s));

  const double ulp = std::numeric_limits<T>::epsilon();
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-12;  // a logit sums dh * d_model products
  std::size_t clipped = 0;
  for (int h = 0; h < heads + key_heads; ++h) {
    const bool query = h < heads;
    const int grp = query ? h / (heads / key_heads) : h - heads;
    const double eta = group[grp] > tau ? tau / group[grp] : 1.0;
    const double factor = std::pow(eta, query ? alpha : 1 - alpha);  // the paper's, in double
    for (int i = h * dh; i < (h + 1) * dh; ++i)
      for (int j = 0; j < d_model; ++j) {
        const double want = double(stepped(i, j)) * factor;
        if (eta == 1.0)
          CHECK(w(i, j) == stepped(i, j));  // a head at or below tau: the same bits
        else
          CHECK(std::abs(double(w(i, j)) - want) <= 2 * ulp * std::abs(want));
      }
  }
  for (int i = (heads + key_heads) * dh; i < rows; ++i)  // the values: untouched
    CHECK(w.row(i) == stepped.row(i));
  for (double m : group) clipped += m > tau ? 1 : 0;
  CHECK(r.clipped == clipped);
  CHECK(clipped > 0);
  CHECK(clipped < group.size());
  CHECK(r.max_logit == *std::max_element(s.begin(), s.end()));
  // The same tokens now give at most tau, the clipped groups exactly tau.
  const std::vector<double> after = max_logits(w, x, heads, key_heads, dh);
  for (int h = 0; h < heads; ++h) {
    const int grp = h / (heads / key_heads);
    if (group[grp] > tau && s[h] == group[grp])
      CHECK(after[h] == Approx(tau).epsilon(tol));
    CHECK(after[h] <= tau * (1 + tol));
  }
  // The optimizer's state is not the clip's business.
  CHECK(same_bits(Mat<T>(muon::reference::to_double(opt.momentum_buffer(id)).template cast<T>()), momentum));
}

TEST_CASE("QK-clip refuses a bad registration or bad logits by name and changes nothing",
          "[qk_clip][errors]") {
  Mat<float> q = gaussian<float>(8, 6, 1), k = gaussian<float>(8, 6, 2), gq = q, gk = k;
  Opt<float> opt;
  const auto iq = opt.add_muon("attn.q", q, gq), ik = opt.add_muon("attn.k", k, gk);
  const auto heads = muon::AttentionHeads::contiguous(2, 4, 0, 0);
  CHECK_THROWS_WITH(opt.add_qk_clip(iq, ik, heads, {0.0}), Contains("threshold"));
  CHECK_THROWS_WITH(opt.add_qk_clip(iq, ik, heads, {10, 1.5}), Contains("alpha"));
  CHECK_THROWS_WITH(opt.add_qk_clip(iq, ik, muon::AttentionHeads::contiguous(3, 4, 0, 0)),
                    Contains("'attn.q' (8x6)") && Contains("outside"));
  CHECK_THROWS_WITH(opt.add_qk_clip(iq, iq, heads), Contains("overlap"));  // K on top of Q
  CHECK_THROWS_WITH(opt.add_qk_clip(iq, ik, muon::AttentionHeads::contiguous(2, 4, 0, 0, 3)),
                    Contains("divide"));
  auto no_keys = heads;
  no_keys.key.clear();
  CHECK_THROWS_WITH(opt.add_qk_clip(iq, ik, no_keys), Contains("alpha to 1"));
  CHECK(opt.num_qk_clips() == 0);
  const auto id = opt.add_qk_clip(iq, ik, heads, {1.0});
  const Mat<float> q0 = q, k0 = k;
  const std::vector<double> one{50.0}, nan{50.0, std::nan("")};
  CHECK_THROWS_WITH(opt.clip_qk(id, std::span<const double>(one)), Contains("1 logits for 2 query heads"));
  CHECK_THROWS_WITH(opt.clip_qk(id, std::span<const double>(nan)), Contains("query head 1"));
  CHECK_THROWS_WITH(opt.clip_qk(muon::QkClipId{7}, std::span<const double>(one)), Contains("no QK-clip with id 7"));
  CHECK(same_bits(q, q0));
  CHECK(same_bits(k, k0));
  // MLA's rotary queries: query rows only, all of eta.
  CHECK_NOTHROW(opt.add_qk_clip(iq, iq, no_keys, {1.0, 1.0}));
}

TEST_CASE("attention logits that Muon drives up explode without QK-clip and stay near tau "
          "with it", "[qk_clip]") {
  // One head (dh = 8) of a fused q/k weight, trained to raise one token pair's logit
  // s = q.k / sqrt(dh) (loss -s): Muon's steps grow both matrices every step, so the
  // logits grow without bound. With QK-clip at tau, each step's clip takes the forward
  // pass's maxima, so a forward pass can exceed tau by one step's growth at most.
  const int dh = 8, d_model = 16, steps = 60;
  const double tau = 20;
  const Eigen::MatrixXd x = gaussian<double>(6, d_model, 5);
  const auto run = [&](bool clip) {
    Mat<double> w = gaussian<double>(2 * dh, d_model, 6) * 0.1, g(2 * dh, d_model);
    muon::GroupOptions o;
    o.muon.lr = 0.2;
    o.muon.weight_decay = 0;
    Opt<double> opt(o);
    const auto id = opt.add_muon("qk", w, g);
    const auto c = opt.add_qk_clip(id, id, muon::AttentionHeads::contiguous(1, dh, 0, dh), {tau});
    double worst = 0;
    for (int s = 0; s < steps; ++s) {
      const std::vector<double> m = max_logits(w, x, 1, 1, dh);
      if (s > 1) worst = std::max(worst, m[0]);  // after the first clip has had its effect
      const Eigen::VectorXd q = w.topRows(dh) * x.row(0).transpose(), k = w.bottomRows(dh) * x.row(1).transpose();
      g.topRows(dh) = -k * x.row(0) / std::sqrt(double(dh));
      g.bottomRows(dh) = -q * x.row(1) / std::sqrt(double(dh));
      opt.step();
      if (clip) opt.clip_qk(c, std::span<const double>(m));
    }
    return worst;
  };
  const double without = run(false), with = run(true);
  INFO("largest logit: " << without << " without QK-clip, " << with << " with it (tau " << tau << ")");
  CHECK(without > 10 * tau);
  CHECK(with <= 1.5 * tau);
}
