// Newton-Schulz: mathematical properties, the SVD oracle, overflow, edge shapes, schedules.
#include <catch2/catch.hpp>
#include <cmath>

#include "test_support.hpp"

using namespace muon_test;
using muon::Schedule;

namespace {

template <class T>
Mat<T> ns(const Mat<T>& x, const Schedule& schedule, int steps,
          muon::NewtonSchulzMethod method = muon::NewtonSchulzMethod::automatic) {
  muon::EigenBackend backend;
  Mat<T> out(x.rows(), x.cols());
  muon::NewtonSchulzOptions o;
  o.schedule = schedule;
  o.steps = steps;
  o.method = method;
  muon::orthogonalize(backend, cview(x), muon::view(out), o);
  return out;
}

Eigen::VectorXd log_spaced(Eigen::Index k, double lo, double hi) {
  Eigen::VectorXd s(k);
  for (Eigen::Index i = 0; i < k; ++i)
    s(i) = hi * std::pow(lo / hi, k == 1 ? 0.0 : double(i) / double(k - 1));
  return s;
}

}  // namespace

TEMPLATE_TEST_CASE("20 textbook steps give an orthogonal matrix", "[ns]", float, double) {
  for (auto [m, n] : {std::pair{32, 48}, std::pair{48, 32}, std::pair{40, 40}}) {
    const Mat<TestType> x = with_spectrum<TestType>(m, n, log_spaced(std::min(m, n), 1e-2, 3.0), 7);
    const Eigen::MatrixXd o = ns(x, Schedule::textbook(), 20).template cast<double>();
    const Eigen::MatrixXd gram = m <= n ? Eigen::MatrixXd(o * o.transpose())
                                        : Eigen::MatrixXd(o.transpose() * o);
    const double defect = (gram - Eigen::MatrixXd::Identity(gram.rows(), gram.cols())).norm();
    INFO(m << "x" << n << " ||O O^T - I||_F = " << defect);
    CHECK(defect < (std::is_same_v<TestType, float> ? 1e-4 : 1e-12));
  }
}

TEMPLATE_TEST_CASE("keller 5 steps keep singular values in [0.6, 1.25]", "[ns]", float, double) {
  // inputs whose singular values all lie in [1e-2, 1] times the largest, across shapes
  for (auto [m, n] : {std::pair{64, 64}, std::pair{32, 128}, std::pair{128, 32}, std::pair{1, 50},
                      std::pair{50, 1}, std::pair{96, 80}}) {
    const Mat<TestType> x = with_spectrum<TestType>(m, n, log_spaced(std::min(m, n), 5e-2, 5.0), 11);
    const Eigen::VectorXd s =
        muon::reference::singular_values(ns(x, Schedule::keller(), 5).template cast<double>());
    INFO(m << "x" << n << " s in [" << s.minCoeff() << ", " << s.maxCoeff() << "]");
    CHECK(s.minCoeff() >= 0.6);
    CHECK(s.maxCoeff() <= 1.25);
  }
}

TEMPLATE_TEST_CASE("NS(X^T) = NS(X)^T and NS(-X) = -NS(X)", "[ns]", float, double) {
  for (auto [m, n] : {std::pair{24, 40}, std::pair{40, 24}, std::pair{30, 30}}) {
    const Mat<TestType> x = gaussian<TestType>(m, n, 3);
    const Mat<TestType> o = ns(x, Schedule::keller(), 5);
    const Mat<TestType> ot = ns(Mat<TestType>(x.transpose()), Schedule::keller(), 5);
    const Mat<TestType> on = ns(Mat<TestType>(-x), Schedule::keller(), 5);
    // Odd polynomial: negation commutes with every rounding, so the result is exact.
    CHECK(on == -o);
    if (m != n) {
      // A rectangular input and its transpose run the very same short-side loop.
      CHECK(ot == Mat<TestType>(o.transpose()));
    } else {
      CHECK((ot - o.transpose()).cwiseAbs().maxCoeff() < Tol<TestType>::ns);
    }
  }
}

TEMPLATE_TEST_CASE("distance to the exact msign by SVD", "[ns]", float, double) {
  const Mat<TestType> x = with_spectrum<TestType>(40, 72, log_spaced(40, 2e-2, 2.0), 5);
  const Eigen::MatrixXd exact = muon::reference::msign(x.template cast<double>());
  auto distance = [&](const Schedule& s, int steps) {
    return (ns(x, s, steps).template cast<double>() - exact).norm() / std::sqrt(40.0);
  };
  // Convergent schedule: exact to working precision.
  CHECK(distance(Schedule::textbook(), 40) < (std::is_same_v<TestType, float> ? 1e-4 : 1e-12));
  // Polar Express is built to be close after 5 steps; keller trades accuracy for speed.
  const double pe = distance(Schedule::polar_express(), 5), keller = distance(Schedule::keller(), 5);
  INFO("polar_express " << pe << " keller " << keller);
  CHECK(pe < 0.12);
  CHECK(keller < 0.35);
  CHECK(pe < keller);
}

TEMPLATE_TEST_CASE("zero input gives zero output", "[ns]", float, double) {
  for (const auto& s : {Schedule::keller(), Schedule::polar_express(), Schedule::you()}) {
    const Mat<TestType> o = ns(Mat<TestType>::Zero(7, 5).eval(), s, 5);
    CHECK(o.allFinite());
    CHECK(o.cwiseAbs().maxCoeff() == 0);
  }
}

TEST_CASE("huge and tiny float entries are normalized without overflow or underflow", "[ns]") {
  const Mat<float> x = gaussian<float>(16, 24, 9);
  const Mat<float> reference = ns(x, Schedule::keller(), 5);
  // (Entries so small that ||X||_F < eps = 1e-7 are divided by eps instead, by design.)
  for (float scale : {1e20f, 1e30f, 1e-3f}) {
    INFO("scale " << scale);
    const Mat<float> o = ns(Mat<float>(x * scale), Schedule::keller(), 5);
    CHECK(o.allFinite());
    CHECK(o.cwiseAbs().maxCoeff() > 0.1f);
    CHECK((o - reference).cwiseAbs().maxCoeff() < 1e-4f);
  }
}

TEST_CASE("huge double entries are normalized without overflow", "[ns]") {
  const Mat<double> x = gaussian<double>(16, 24, 9);
  const Mat<double> o = ns(Mat<double>(x * 1e300), Schedule::keller(), 5);
  CHECK(o.allFinite());
  CHECK((o - ns(x, Schedule::keller(), 5)).cwiseAbs().maxCoeff() < 1e-12);
}

TEMPLATE_TEST_CASE("vectors and empty matrices", "[ns]", float, double) {
  // A 1 x n (or n x 1) matrix has one singular value: NS maps x to p(1/||x||..) x/||x||.
  for (auto [m, n] : {std::pair{1, 9}, std::pair{9, 1}, std::pair{1, 1}}) {
    const Mat<TestType> x = gaussian<TestType>(m, n, 2);
    const Mat<TestType> o = ns(x, Schedule::textbook(), 12);
    const Eigen::MatrixXd expect = x.template cast<double>() / x.template cast<double>().norm();
    CHECK((o.template cast<double>() - expect).cwiseAbs().maxCoeff() < Tol<TestType>::ns);
  }
  for (auto [m, n] : {std::pair{0, 5}, std::pair{5, 0}, std::pair{0, 0}}) {
    const Mat<TestType> o = ns(Mat<TestType>(m, n), Schedule::keller(), 5);
    CHECK(o.size() == 0);
  }
}

TEMPLATE_TEST_CASE("strided and column-major views are orthogonalized in place of a copy",
                   "[ns]", float, double) {
  const Mat<TestType> x = gaussian<TestType>(12, 20, 4);
  const Mat<TestType> expect = ns(x, Schedule::keller(), 5);
  // column-major input and output
  Eigen::Matrix<TestType, Eigen::Dynamic, Eigen::Dynamic> xc = x, oc(12, 20);
  muon::EigenBackend backend;
  muon::orthogonalize(backend, cview(xc), muon::view(oc));
  CHECK((oc - expect).cwiseAbs().maxCoeff() < Tol<TestType>::ns);
  // a block of a bigger matrix, written into a block of another
  Mat<TestType> big = Mat<TestType>::Zero(30, 40), out = Mat<TestType>::Constant(30, 40, 7);
  big.block(5, 10, 12, 20) = x;
  auto in_block = big.block(5, 10, 12, 20);
  auto out_block = out.block(3, 2, 12, 20);
  muon::orthogonalize(backend, cview(in_block), muon::view(out_block));
  CHECK((out.block(3, 2, 12, 20) - expect).cwiseAbs().maxCoeff() < Tol<TestType>::ns);
  CHECK(out(0, 0) == TestType(7));  // nothing outside the block touched
}

TEMPLATE_TEST_CASE("Gram Newton-Schulz equals the standard loop", "[ns][gram]", float, double) {
  using muon::NewtonSchulzMethod;
  for (auto [m, n] : {std::pair{16, 64}, std::pair{64, 16}, std::pair{1, 9}, std::pair{24, 30},
                      std::pair{20, 20}}) {
    for (const auto& s : {Schedule::keller(), Schedule::you(), Schedule::polar_express()}) {
      const Mat<TestType> x = with_spectrum<TestType>(m, n, log_spaced(std::min(m, n), 1e-3, 1.0), 8);
      // Gram accumulates more rounding than the standard loop on ill-conditioned input (about
      // 1e-4 against 2e-6 per entry in float here). Required: its distance to the exact msign
      // is the standard loop's, and its error against the loop in double stays far below
      // bf16's 3.9e-3, the precision torch.optim.Muon runs Newton-Schulz in.
      const Mat<TestType> plain = ns(x, s, 5, NewtonSchulzMethod::standard);
      const Mat<TestType> gram = ns(x, s, 5, NewtonSchulzMethod::gram);
      const Eigen::MatrixXd exact_ns =
          ns(Mat<double>(x.template cast<double>()), s, 5, NewtonSchulzMethod::standard);
      const double error = (gram.template cast<double>() - exact_ns).cwiseAbs().maxCoeff();
      const auto d_plain = muon::orthogonality(cview(plain), cview(x)).msign_distance;
      const auto d_gram = muon::orthogonality(cview(gram), cview(x)).msign_distance;
      INFO(m << "x" << n << " " << s.name() << ": error " << error << ", msign distance "
             << d_plain << " / " << d_gram);
      CHECK(error < (std::is_same_v<TestType, float> ? 2e-3 : 1e-10));
      CHECK(std::abs(d_gram - d_plain) < (std::is_same_v<TestType, float> ? 1e-3 : 1e-12));
    }
  }
  // Converged textbook iterations (where A's deviation from I underflows) stay exact.
  const Mat<TestType> x = gaussian<TestType>(24, 96, 5);
  const Mat<TestType> gram = ns(x, Schedule::textbook(), 30, NewtonSchulzMethod::gram);
  const Eigen::MatrixXd exact = muon::reference::msign(x.template cast<double>());
  CHECK((gram.template cast<double>() - exact).cwiseAbs().maxCoeff() < Tol<TestType>::ns);
  CHECK(ns(Mat<TestType>::Zero(4, 12).eval(), Schedule::keller(), 5, NewtonSchulzMethod::gram)
            .cwiseAbs()
            .maxCoeff() == 0);
  CHECK(muon::uses_gram(NewtonSchulzMethod::automatic, 100, 200));
  CHECK_FALSE(muon::uses_gram(NewtonSchulzMethod::automatic, 100, 199));
  CHECK_FALSE(muon::uses_gram(NewtonSchulzMethod::standard, 10, 1000));
}

TEST_CASE("switching a group to the Gram method sizes its workspace", "[ns][gram]") {
  muon::Optimizer<muon::EigenBackend, float> opt;
  Mat<float> w = gaussian<float>(32, 32, 1);
  const Mat<float> g = gaussian<float>(32, 32, 2);
  opt.add_muon("square", w, g);
  muon::GroupOptions o;
  o.muon.newton_schulz.method = muon::NewtonSchulzMethod::gram;
  opt.set_group_options({}, o);
  CHECK_NOTHROW(opt.step());
  CHECK(w.allFinite());
}

TEST_CASE("schedules resolve to per-step coefficients", "[schedule]") {
  const auto keller = Schedule::keller().resolve(7);
  REQUIRE(keller.size() == 7);
  for (const auto& c : keller) CHECK(c == muon::Coefficients{3.4445, -4.7750, 2.0315});
  const auto you = Schedule::you().resolve(7);
  CHECK(you[0] == muon::Coefficients{4.0848, -6.8946, 2.9270});
  CHECK(you[6] == muon::Coefficients{2.8366, -3.0525, 1.2012});  // the last one repeats
  CHECK(Schedule::textbook().resolve(1)[0] == muon::Coefficients{1.875, -1.25, 0.375});
  CHECK(Schedule::from_name("you").name() == "you");
  CHECK(Schedule::polar_express().norm_scale() == 1.02);
}

TEST_CASE("polar_express reproduces the published 5-step coefficients", "[schedule]") {
  // Published list (SPEC.md; Amsel et al. 2025 as used by modded-nanogpt and dion).
  const auto pe = Schedule::polar_express().resolve(5);
  REQUIRE(pe.size() == 5);
  CHECK(pe[0].a == Approx(8.1566).margin(1e-4));
  CHECK(pe[0].b == Approx(-22.4833).margin(1e-4));
  CHECK(pe[0].c == Approx(15.8788).margin(1e-4));
  CHECK(pe[4].a == Approx(2.3465).margin(1e-4));
  CHECK(pe[4].b == Approx(-1.7098).margin(1e-4));
  CHECK(pe[4].c == Approx(0.4232).margin(1e-4));
}

TEST_CASE("malformed schedules and step counts are refused", "[schedule]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(Schedule::keller().resolve(0), Contains("steps = 0"));
  CHECK_THROWS_WITH(Schedule::keller().resolve(101), Contains("out of range"));
  CHECK_THROWS_WITH(Schedule::custom({}).resolve(5), Contains("no coefficients"));
  CHECK_THROWS_WITH(Schedule::custom({{1, NAN, 0}}).resolve(5), Contains("not finite"));
  CHECK_THROWS_WITH(Schedule::custom({{1, 0, 0}}, 0.0).resolve(5), Contains("norm_scale"));
  CHECK_THROWS_WITH(Schedule::from_name("kellerr"), Contains("kellerr"));
  CHECK_NOTHROW(Schedule::custom({{2, -1.5, 0.5}}).resolve(3));
}

TEST_CASE("a workspace refuses matrices larger than it reserved", "[ns]") {
  muon::EigenBackend backend;
  muon::NewtonSchulzWorkspace<muon::EigenBackend, float> ws;
  ws.reserve(backend, 4, 6);
  CHECK_NOTHROW(ws.input(backend, 6, 4));
  CHECK_THROWS_AS(ws.input(backend, 5, 6), muon::InvalidArgument);
}

TEMPLATE_TEST_CASE("diagnostics: SVD entropy and update RMS", "[diagnostics]", float, double) {
  const Mat<TestType> eye = Mat<TestType>::Identity(8, 8);
  CHECK(muon::svd_entropy(cview(eye)) == Approx(1.0).epsilon(1e-6));
  const Mat<TestType> rank_one = Mat<TestType>::Ones(8, 5);
  CHECK(muon::svd_entropy(cview(rank_one)) == Approx(0.0).margin(1e-6));
  // two equal singular values out of four: H = log 2 / log 4 = 0.5
  Mat<TestType> two = Mat<TestType>::Zero(4, 4);
  two(0, 0) = 3;
  two(1, 1) = 3;
  CHECK(muon::svd_entropy(cview(two)) == Approx(0.5).epsilon(1e-6));
  const Mat<TestType> c = Mat<TestType>::Constant(3, 4, TestType(0.25));
  CHECK(muon::update_rms(cview(c)) == Approx(0.25).epsilon(1e-6));
  // orthogonality report of an exact msign: all singular values 1, zero distance
  const Mat<TestType> x = gaussian<TestType>(6, 9, 1);
  const Mat<TestType> exact = muon::reference::msign(x.template cast<double>()).template cast<TestType>();
  const auto r = muon::orthogonality(cview(exact), cview(x));
  CHECK(r.s_min == Approx(1.0).epsilon(1e-5));
  CHECK(r.s_max == Approx(1.0).epsilon(1e-5));
  CHECK(r.gram_defect < 1e-5);
  CHECK(r.msign_distance < 1e-5);
}
