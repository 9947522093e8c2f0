// Newton-Schulz: mathematical properties, the SVD oracle, overflow, edge shapes, schedules.
#include <catch2/catch.hpp>
#include <bit>
#include <cmath>
#include <cstdint>

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
    // The transpose runs the same short-side loop, but on the other storage order: the BLAS
    // may block (and so round) the two layouts differently, so only rounding-level agreement
    // is guaranteed.
    CHECK((ot - o.transpose()).cwiseAbs().maxCoeff() < Tol<TestType>::ns);
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

TEMPLATE_TEST_CASE("the CPU backend's products give their values on every layout, on both engines",
                   "[ns][products]", float, double) {
  // Dense row- and column-major operands go to the BLAS or Eigen's kernels, operands with no
  // unit stride (every other column of a bigger matrix) to plain loops: each against the same
  // products in double, computed here from the entries.
  using T = TestType;
  const Mat<T> a = gaussian<T>(7, 5, 1), b = gaussian<T>(5, 6, 2), s0 = gaussian<T>(7, 7, 3);
  const Mat<T> s = (s0 + s0.transpose()).eval(), c0 = gaussian<T>(7, 6, 4);
  const Eigen::MatrixXd ad = a.template cast<double>(), bd = b.template cast<double>(),
                        sd = s.template cast<double>(), cd = c0.template cast<double>();
  const Eigen::MatrixXd gemm = 0.5 * ad * bd - 2.0 * cd, symm = 0.5 * sd * sd.leftCols(6) - 2.0 * cd,
                        syrk = 0.5 * ad * ad.transpose() - 2.0 * sd;
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-13;
  const auto error = [](const auto& got, const Eigen::MatrixXd& want, bool lower) {
    double e = 0;
    for (Eigen::Index i = 0; i < want.rows(); ++i)
      for (Eigen::Index j = 0; j < (lower ? i + 1 : want.cols()); ++j)
        e = std::max(e, std::abs(double(got(i, j)) - want(i, j)) / std::max(1.0, std::abs(want(i, j))));
    return e;
  };
  // A copy of m in the layout asked for, and the view of it.
  struct Laid {
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> storage;
    muon::MatrixView<T> view;
  };
  const auto lay = [](const Mat<T>& m, int layout) {
    Laid l;
    if (layout == 0) {  // row-major
      l.storage = m.transpose();
      l.view = muon::MatrixView<T>(l.storage.data(), m.rows(), m.cols(), m.cols(), 1);
    } else if (layout == 1) {  // column-major
      l.storage = m;
      l.view = muon::MatrixView<T>(l.storage.data(), m.rows(), m.cols(), 1, m.rows());
    } else {  // every other column of a column-major matrix twice as wide: no unit stride
      l.storage = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>::Constant(m.rows() * 2, m.cols(), T(9));
      for (Eigen::Index i = 0; i < m.rows(); ++i)
        for (Eigen::Index j = 0; j < m.cols(); ++j) l.storage(2 * i, j) = m(i, j);
      l.view = muon::MatrixView<T>(l.storage.data(), m.rows(), m.cols(), 2, 2 * m.rows());
    }
    return l;
  };
  const auto before = muon::cpu::products();
  for (auto engine : {muon::cpu::Products::blas, muon::cpu::Products::eigen}) {
    if (engine == muon::cpu::Products::blas && !muon::cpu::detail::blas_linked) continue;
    muon::cpu::set_products(engine);
    muon::EigenBackend backend;
    for (int la = 0; la < 3; ++la)
      for (int lc = 0; lc < 3; ++lc) {
        INFO("engine " << int(engine) << ", layouts " << la << " " << lc);
        Laid A = lay(a, la), B = lay(b, (la + 1) % 3), S = lay(s, la), C = lay(c0, lc), D = lay(s, lc);
        backend.gemm(T(0.5), muon::MatrixView<const T>(A.view), muon::MatrixView<const T>(B.view), T(-2), C.view);
        CHECK(error(C.view, gemm, false) < tol);
        C = lay(c0, lc);
        backend.symm(T(0.5), muon::MatrixView<const T>(S.view),
                     muon::MatrixView<const T>(lay(s.leftCols(6), (lc + 1) % 3).view), T(-2), C.view);
        CHECK(error(C.view, symm, false) < tol);
        backend.syrk(T(0.5), muon::MatrixView<const T>(A.view), T(-2), D.view);
        CHECK(error(D.view, syrk, true) < tol);
      }
  }
  muon::cpu::set_products(before);
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
  const auto keller5 = Schedule::keller().resolve(5);
  const double u = muon::unit_roundoff<TestType>;
  CHECK(muon::uses_gram(NewtonSchulzMethod::automatic, 100, 200, keller5, u));
  CHECK_FALSE(muon::uses_gram(NewtonSchulzMethod::automatic, 100, 199, keller5, u));
  CHECK_FALSE(muon::uses_gram(NewtonSchulzMethod::standard, 10, 1000, keller5, u));
  CHECK(muon::uses_gram(NewtonSchulzMethod::gram, 10, 10, keller5, u));
}

TEST_CASE("the Gram form's restart plan follows the drift analysis", "[ns][gram]") {
  using muon::NewtonSchulzMethod;
  const auto keller = [](int steps) { return Schedule::keller().resolve(steps); };
  const double uf = muon::unit_roundoff<float>, ud = muon::unit_roundoff<double>;
  // keller multiplies a drift |lambda| <= 0.1 by at most (3.4445 + 4.775 * 0.1 + 2.0315 * 0.01)^2
  // = 15.5 a step: in float 4 updates stay under the limit (15.5^4 * 8 u = 0.028 < 0.1 <
  // 15.5^5 * 8 u), in double 11.
  CHECK(muon::gram_segments(keller(5), uf) == 1);  // the default never restarts
  CHECK(muon::gram_segments(keller(6), uf) == 2);
  CHECK(muon::gram_segments(keller(10), uf) == 2);
  CHECK(muon::gram_segments(keller(11), uf) == 3);
  CHECK(muon::gram_segments(keller(12), ud) == 1);
  CHECK(muon::gram_segments(keller(13), ud) == 2);
  // in bf16 every step restarts, which is the plain loop with more work: automatic never
  // takes it there, nor where restarts eat the saving
  CHECK(muon::gram_segments(keller(5), 0x1p-8) == 5);
  CHECK(muon::gram_segments(keller(5), 0x1p-11) == 3);  // fp16: two steps per segment
  CHECK_FALSE(muon::uses_gram(NewtonSchulzMethod::automatic, 100, 400, keller(5), 0x1p-8));
  // in float a restart every 5 steps still leaves Gram 124/140 of the flops at aspect 2
  CHECK(muon::uses_gram(NewtonSchulzMethod::automatic, 100, 200, keller(20), uf));
  CHECK(muon::gram_flops(keller(5), uf, 1, 4) == 3 * 4 + 25);
  CHECK(muon::standard_flops(5, 1, 4) == 5 * (3 * 4 + 1));
}

namespace {

/// A k-rank m x n matrix (k = 0 gives zeros) scaled by `scale`, optionally with a zero row.
template <class T>
Mat<T> low_rank(Eigen::Index m, Eigen::Index n, Eigen::Index rank, double scale,
                std::uint64_t seed, bool zero_row = false) {
  Eigen::MatrixXd x = Eigen::MatrixXd::Zero(m, n);
  if (rank > 0) x = gaussian<double>(m, rank, seed) * gaussian<double>(rank, n, seed + 1);
  if (zero_row) x.row(m / 2).setZero();
  return (x * scale).cast<T>();
}

/// The robust grid's inputs: wide, tall, square and very long; ranks 0, 1, a few and full; tiny
/// and huge norms; a zero row.
struct RobustInput {
  Eigen::Index m, n, rank;
  double scale;
  bool zero_row;
};
constexpr RobustInput kRobustInputs[] = {{32, 128, 1, 1, false},    {128, 32, 1, 1, false},
                                         {32, 128, 3, 1e-30, false}, {96, 24, 3, 1e30, false},
                                         {32, 128, 32, 1, true},    {24, 24, 2, 1, false},
                                         {16, 160, 0, 1, false},    {1, 40, 1, 1, false},
                                         {20, 80, 20, 1, false}};

}  // namespace

TEMPLATE_TEST_CASE("Newton-Schulz stays finite and within the schedule's bound at any rank",
                   "[ns][gram][robust]", float, double) {
  using muon::NewtonSchulzMethod;
  using T = TestType;
  constexpr bool is_float = std::is_same_v<T, float>;
  const std::pair<Schedule, std::vector<int>> schedules[] = {
      {Schedule::keller(), {1, 5, 6, 10, 20, 72, 100}},
      {Schedule::you(), {5, 10, 40}},
      {Schedule::polar_express(), {5, 8, 12, 40}},
      {Schedule::textbook(), {5, 20, 100}}};
  int worst_rows = 0;
  double worst_excess = 0, worst_gap = 0;
  for (const RobustInput& in : kRobustInputs) {
    const Mat<T> x = low_rank<T>(in.m, in.n, in.rank, in.scale, 17 + in.rank, in.zero_row);
    for (const auto& [schedule, step_counts] : schedules) {
      for (int steps : step_counts) {
        const auto resolved = schedule.resolve(steps);
        const double bound =
            muon::singular_value_bound(resolved, 1.0 / schedule.norm_scale()).output;
        const Mat<double> plain = ns(Mat<double>(x.template cast<double>()), schedule, steps,
                                     NewtonSchulzMethod::standard);
        for (auto method : {NewtonSchulzMethod::standard, NewtonSchulzMethod::gram,
                            NewtonSchulzMethod::automatic}) {
          const Mat<T> o = ns(x, schedule, steps, method);
          INFO(in.m << "x" << in.n << " rank " << in.rank << " scale " << in.scale
                    << (in.zero_row ? " zero row" : "") << ", " << schedule.name() << " "
                    << steps << " steps, method " << int(method));
          REQUIRE(o.allFinite());
          const double s_max =
              muon::reference::singular_values(o.template cast<double>()).maxCoeff();
          // rounding may lift a singular value a little past the exact-arithmetic bound
          const double excess = s_max - bound;
          CHECK(excess <= (is_float ? 2e-4 : 1e-9) * std::max(1.0, bound));
          worst_excess = std::max(worst_excess, excess);
          ++worst_rows;
          // In double the Gram form is the plain loop up to rounding, until the steps have
          // amplified the plain loop's own rounding (a^steps times u) to visible size.
          if (!is_float && steps <= 12) {
            const double gap = (o.template cast<double>() - plain).cwiseAbs().maxCoeff();
            CHECK(gap < 1e-9);
            worst_gap = std::max(worst_gap, gap);
          }
        }
      }
    }
  }
  WARN(worst_rows << " results: largest singular value past the bound by " << worst_excess
                  << ", largest gap to the plain loop in double " << worst_gap);
}

TEST_CASE("without restarts the Gram form runs away on a rank-1 matrix", "[ns][gram][robust]") {
  // What the restart plan prevents: the drift of A's spurious negative eigenvalue.
  muon::EigenBackend backend;
  const auto schedule = Schedule::keller().resolve(10);
  Mat<float> x = low_rank<float>(32, 128, 1, 1, 5);
  Mat<float> y(32, 128), z(32, 128), a(32, 32), b(32, 32), w(32, 32), q(32, 32), p(32, 32);
  auto v = [](Mat<float>& m) { return muon::view(m); };
  auto copy = [](muon::MatrixView<float> r) {
    Mat<float> out(r.rows(), r.cols());
    for (Eigen::Index i = 0; i < r.rows(); ++i)
      for (Eigen::Index j = 0; j < r.cols(); ++j) out(i, j) = r(i, j);
    return out;
  };
  const Mat<float> x0 = x;
  const Mat<float> with_plan = copy(muon::gram_newton_schulz_inplace(
      backend, v(x), v(y), v(z), v(a), v(b), v(w), v(q), v(p), schedule, 1.0, 1e-7));
  CHECK(with_plan.allFinite());
  CHECK(muon::reference::singular_values(with_plan.cast<double>()).maxCoeff() < 1.25);
  x = x0;
  const Mat<float> no_plan = copy(muon::gram_newton_schulz_inplace(
      backend, v(x), v(y), v(z), v(a), v(b), v(w), v(q), v(p), schedule, 1.0, 1e-7,
      /*plan_unit_roundoff=*/1e-300));
  CHECK_FALSE((no_plan.allFinite() && no_plan.cwiseAbs().maxCoeff() < 10));
}

namespace {
/// ||O O^T - I||_F / sqrt(k) on the short side, in double.
double residual_in_double(const Eigen::MatrixXd& o) {
  const Eigen::MatrixXd gram = o.rows() <= o.cols() ? Eigen::MatrixXd(o * o.transpose())
                                                    : Eigen::MatrixXd(o.transpose() * o);
  return (gram - Eigen::MatrixXd::Identity(gram.rows(), gram.cols())).norm() /
         std::sqrt(double(gram.rows()));
}

template <class T>
Mat<T> ns_reported(const Mat<T>& x, const muon::NewtonSchulzOptions& o,
                   muon::NewtonSchulzReport& report) {
  muon::EigenBackend backend;
  Mat<T> out(x.rows(), x.cols());
  muon::orthogonalize(backend, cview(x), muon::view(out), o, &report);
  return out;
}
}  // namespace

TEMPLATE_TEST_CASE("the reported residual is the result's, by every method and shape",
                   "[ns][tolerance]", float, double) {
  const double tol = std::is_same_v<TestType, float> ? 1e-5 : 1e-12;
  for (auto [m, n] : {std::pair{48, 48}, std::pair{24, 96}, std::pair{96, 24}})
    for (auto method : {muon::NewtonSchulzMethod::standard, muon::NewtonSchulzMethod::gram})
      for (int steps : {1, 5, 9}) {
        const Mat<TestType> x = gaussian<TestType>(m, n, 5 + steps);
        muon::NewtonSchulzOptions o;
        o.steps = steps;
        o.method = method;
        muon::NewtonSchulzReport report;
        const Mat<TestType> out = ns_reported(x, o, report);
        const double exact = residual_in_double(out.template cast<double>());
        INFO(m << "x" << n << " method " << int(method) << " steps " << steps << ": reported "
               << report.residual << ", in double " << exact);
        CHECK(report.steps == steps);
        CHECK(std::abs(report.residual - exact) <= tol);
        // measuring leaves the result exactly as the unmeasured run gives it
        CHECK((out.array() == ns(x, Schedule::keller(), steps, method).array()).all());
      }
}

TEMPLATE_TEST_CASE("a tolerance adds textbook steps until the residual is below it",
                   "[ns][tolerance]", float, double) {
  const bool is_float = std::is_same_v<TestType, float>;
  const double target = is_float ? 1e-4 : 1e-10;
  for (auto [m, n] : {std::pair{32, 32}, std::pair{32, 128}, std::pair{128, 32}}) {
    const Mat<TestType> x =
        with_spectrum<TestType>(m, n, log_spaced(std::min(m, n), 1e-2, 2.0), 17);
    muon::NewtonSchulzOptions o;  // keller, 5 steps: residual ~0.2 by design
    o.tolerance = target;
    o.max_extra_steps = 20;
    muon::NewtonSchulzReport report;
    const Eigen::MatrixXd out = ns_reported(x, o, report).template cast<double>();
    const double distance = (out - muon::reference::msign(x.template cast<double>())).norm() /
                            std::sqrt(double(std::min(m, n)));
    INFO(m << "x" << n << ": " << report.steps << " steps, residual " << report.residual
           << ", distance to msign " << distance);
    CHECK(report.residual <= target);
    CHECK(report.steps > 5);
    CHECK(report.steps < 5 + o.max_extra_steps);
    CHECK(residual_in_double(out) <= target * 1.01 + (is_float ? 1e-5 : 1e-12));
    CHECK(distance <= (is_float ? 1e-3 : 1e-9));
    // the same as running the extra textbook steps as a schedule, plain loop
    std::vector<muon::Coefficients> list(5, {3.4445, -4.7750, 2.0315});
    list.resize(std::size_t(report.steps), muon::kTextbookQuintic);
    const Eigen::MatrixXd plain =
        ns(x, Schedule::custom(list), report.steps, muon::NewtonSchulzMethod::standard)
            .template cast<double>();
    CHECK((out - plain).cwiseAbs().maxCoeff() <= (is_float ? 1e-4 : 1e-11));
  }
}

TEST_CASE("a tolerance a rank-deficient matrix cannot reach ends at the cap, finite",
          "[ns][tolerance]") {
  // rank 4 of 32: 28 singular values stay 0, so the residual cannot go below sqrt(28 / 32)
  Eigen::VectorXd s = Eigen::VectorXd::Zero(32);
  s.head(4) << 3.0, 1.0, 0.3, 0.1;
  const Mat<float> x = with_spectrum<float>(32, 96, s, 23);
  muon::NewtonSchulzOptions o;
  o.tolerance = 1e-3;
  o.max_extra_steps = 7;
  muon::NewtonSchulzReport report;
  const Mat<float> out = ns_reported(x, o, report);
  CHECK(report.steps == 5 + 7);
  CHECK(out.allFinite());
  CHECK(report.residual == Approx(std::sqrt(28.0 / 32.0)).epsilon(1e-4));
  const Eigen::VectorXd sv = muon::reference::singular_values(out.cast<double>());
  CHECK(sv.maxCoeff() <= 1.0 + 1e-4);  // the added steps took the four to 1
  CHECK(sv(3) >= 1.0 - 1e-4);
}

TEST_CASE("tolerance options are checked where they are set", "[ns][tolerance]") {
  muon::NewtonSchulzOptions o;
  o.tolerance = -1;
  CHECK_THROWS_WITH(muon::validate(o, "g"), Catch::Matchers::Contains("g.newton_schulz.tolerance"));
  o.tolerance = 1e-3;
  o.max_extra_steps = 101;
  CHECK_THROWS_WITH(muon::validate(o, "g"),
                    Catch::Matchers::Contains("g.newton_schulz.max_extra_steps"));
  o.max_extra_steps = 10;
  CHECK_NOTHROW(muon::validate(o, "g"));
  // a schedule that can end above sqrt(7/3), where the textbook steps diverge
  o.schedule = Schedule::custom({{2.0, 0.0, 0.0}});
  o.steps = 1;
  CHECK_THROWS_WITH(muon::validate(o, "g"), Catch::Matchers::Contains("diverge"));
  o.tolerance = 0;  // without a tolerance the same schedule is allowed
  CHECK_NOTHROW(muon::validate(o, "g"));
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

TEST_CASE("the named coefficient sets: names, repetition and fixed lengths", "[schedule]") {
  using Catch::Matchers::Contains;
  for (const char* name : Schedule::names) CHECK(Schedule::from_name(name).name() == name);
  // quintic is you's list, cycling after its fifth triple where you repeats the last
  const auto quintic = Schedule::quintic().resolve(7), you = Schedule::you().resolve(7);
  for (int t = 0; t < 5; ++t) CHECK(quintic[t] == you[t]);
  CHECK(quintic[5] == you[0]);
  CHECK(quintic[6] == you[1]);
  CHECK(you[6] == you[4]);
  CHECK(Schedule::aol().resolve(6)[4] == Schedule::aol().resolve(6)[0]);
  CHECK(Schedule::simple().resolve(3) == Schedule::keller().resolve(3));
  const auto dsv4 = Schedule::deepseekv4().resolve(12);
  CHECK(dsv4[7] == muon::Coefficients{3.4445, -4.7750, 2.0315});
  CHECK(dsv4[8] == muon::Coefficients{2.0, -1.5, 0.5});
  CHECK(dsv4[11] == muon::Coefficients{2.0, -1.5, 0.5});
  CHECK(Schedule::cans().resolve(9)[8] == Schedule::cans().resolve(9)[4]);
  // cubic5 is five cubics for exactly five steps
  for (const auto& p : Schedule::cubic5().resolve(5)) CHECK(p.c == 0);
  CHECK_THROWS_WITH(Schedule::cubic5().resolve(6), Contains("exactly 5 steps"));
  CHECK(Schedule::polar_express_paper().intended_steps() == 8);
  CHECK(Schedule::deepseekv4().intended_steps() == 10);
  CHECK(Schedule::keller().intended_steps() == 5);
  const auto cycled = Schedule::custom({{2, -1.5, 0.5}, {1.5, -0.5, 0}}, 1.0,
                                       Schedule::Repeat::cycle).resolve(3);
  CHECK(cycled[2] == muon::Coefficients{2, -1.5, 0.5});
}

TEST_CASE("every named schedule's singular-value bound holds on a fine grid and is tight",
          "[schedule]") {
  for (const char* name : Schedule::names) {
    const Schedule s = Schedule::from_name(name);
    const auto steps = s.resolve(s.intended_steps());
    const double input_max = 1.0 / std::min(s.norm_scale(), 1.0);
    const auto bound = muon::singular_value_bound(steps, input_max);
    double out = 0, peak = 0;  // the composed polynomial sampled on [0, input_max]
    for (int i = 0; i <= 200000; ++i) {
      double x = input_max * i / 200000.0;
      for (const auto& p : steps) {
        x = p.a * x + p.b * x * x * x + p.c * std::pow(x, 5);
        peak = std::max(peak, std::abs(x));
      }
      out = std::max(out, std::abs(x));
    }
    INFO(name << ": bound " << bound.output << " / " << bound.peak << ", sampled " << out
              << " / " << peak);
    CHECK(bound.output >= out * (1 - 1e-12));  // both in double: a few ulps either way
    CHECK(bound.peak >= peak * (1 - 1e-12));
    CHECK(bound.output - out < 1e-3 * bound.output);
    CHECK(bound.peak - peak < 1e-3 * bound.peak);
  }
}

TEST_CASE("polar_express reproduces the published 5-step coefficients", "[schedule]") {
  // Published list (Amsel et al. 2025 as used by modded-nanogpt and dion).
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
  // a schedule that blows singular values up is refused where it is chosen
  CHECK_THROWS_WITH(Schedule::custom({{3, 0, 0}}).resolve(8), Contains("maps singular values"));
  CHECK_NOTHROW(Schedule::custom({{3, 0, 0}}).resolve(6));  // 729 < kMaxScheduleGain
}

TEST_CASE("singular-value bounds of the built-in schedules", "[schedule]") {
  auto bound = [](const Schedule& s, int steps) {
    return muon::singular_value_bound(s.resolve(steps));
  };
  // keller overshoots to its maximum p(0.5545) = 1.2024 by design (the analytic maximum of
  // 3.4445 s - 4.7750 s^3 + 2.0315 s^5), and every later step keeps [0, 1.2024] inside it;
  // textbook converges monotonically to 1
  CHECK(bound(Schedule::keller(), 1).output == Approx(1.20237).margin(1e-5));
  CHECK(bound(Schedule::keller(), 100).output == Approx(1.20237).margin(1e-5));
  CHECK(bound(Schedule::textbook(), 30).output == Approx(1.0).margin(1e-12));
  CHECK(bound(Schedule::textbook(), 30).peak == Approx(1.0).margin(1e-12));
  CHECK(bound(Schedule::polar_express(), 5).output < 1.15);
  CHECK(bound(Schedule::polar_express(), 12).output == Approx(1.0).margin(1e-6));
  CHECK(bound(Schedule::you(), 5).peak < 1.3);
  // a step of 3 s: [0, 1] -> [0, 3] -> [0, 9]
  CHECK(muon::singular_value_bound(Schedule::custom({{3, 0, 0}}).resolve(2)).output == 9);
}

TEST_CASE("a workspace refuses matrices larger than it reserved", "[ns]") {
  using Catch::Matchers::Contains;
  muon::EigenBackend backend;
  muon::NewtonSchulzWorkspace<muon::EigenBackend, float> ws;
  ws.reserve(backend, 4, 6);
  CHECK_NOTHROW(ws.input(backend, 6, 4));
  CHECK_THROWS_AS(ws.input(backend, 5, 6), muon::InvalidArgument);
  // as many elements as reserved, but a larger Gram matrix: refused, not written past
  muon::NewtonSchulzWorkspace<muon::EigenBackend, float> thin;
  thin.reserve(backend, 1, 100);
  const auto keller = Schedule::keller().resolve(5);
  CHECK_THROWS_WITH(thin.run(backend, 10, 10, keller, 1.0, 1e-7), Contains("10x10"));
  CHECK_THROWS_AS(thin.input(backend, 10, 10), muon::InvalidArgument);
  CHECK_NOTHROW(thin.run(backend, 100, 1, keller, 1.0, 1e-7));
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

// ---- Newton-Schulz with bf16 products (CPUs with AVX512-BF16) ------------------------------

namespace {

namespace bf16 = muon::cpu::bf16;

/// Whether the [bf16] cases can run here; they pass with a warning on a CPU without bf16.
bool bf16_cpu() {
  if (!muon::cpu::has_bf16()) WARN("this CPU has no AVX512-BF16: nothing to check");
  return muon::cpu::has_bf16();
}

muon::EigenBackend backend_in(muon::cpu::Precision p) {
  return muon::EigenBackend(muon::CpuOptions{p});
}

template <class T>
Mat<T> ns_in(muon::cpu::Precision p, const Mat<T>& x, const Schedule& schedule, int steps) {
  muon::EigenBackend backend = backend_in(p);
  Mat<T> out(x.rows(), x.cols());
  muon::NewtonSchulzOptions o;
  o.schedule = schedule;
  o.steps = steps;
  muon::orthogonalize(backend, cview(x), muon::view(out), o);
  return out;
}

std::vector<bf16::Bits> bf16_gaussian(Eigen::Index n, std::uint64_t seed) {
  const Mat<float> g = gaussian<float>(1, n, seed);
  std::vector<bf16::Bits> out(static_cast<std::size_t>(n));
  for (Eigen::Index i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = bf16::from_float(g(0, i));
  return out;
}

}  // namespace

TEST_CASE("bf16 products are the instruction's arithmetic written out, bit for bit, on any "
          "number of threads", "[bf16]") {
  if (!bf16_cpu()) return;
  struct Case {
    muon::index_t m, n, k;
    bool transposed_b, lower;
  };
  // edges of the 12 x 32 tile, odd k, k across the 512-wide blocks, n across the 2048-wide
  // ones, B read as a transpose, the lower-triangle mode of X X^T, A read in place (even k)
  // and packed (odd k; rows 4 KB apart), and products large enough to be split over the
  // workers (from 4e6 multiply-adds)
  const Case cases[] = {{1, 1, 1, false, false},     {37, 70, 1031, false, false},
                        {130, 33, 5, true, false},   {13, 2100, 6, false, false},
                        {70, 70, 515, true, true},   {97, 97, 64, true, true},
                        {24, 40, 2048, false, false}, {200, 150, 300, false, false},
                        {301, 301, 100, true, true}};
  for (const Case& c : cases) {
    INFO(c.m << "x" << c.n << "x" << c.k << (c.transposed_b ? " B^T" : "") << (c.lower ? " lower" : ""));
    const auto a = bf16_gaussian(c.m * c.k, 1), b = bf16_gaussian(c.k * c.n, 2);
    const bf16::Operand op_a{a.data(), c.k, 1};
    const bf16::Operand op_b = c.transposed_b ? bf16::Operand{b.data(), 1, c.k}
                                              : bf16::Operand{b.data(), c.n, 1};
    std::vector<float> expected(static_cast<std::size_t>(c.m * c.n));
    bf16::reference_product(c.m, c.n, c.k, op_a, op_b, expected.data(), c.n, 1);
    std::vector<bf16::PackBuffers> packs(static_cast<std::size_t>(muon::cpu::worker_pool().size()));
    for (auto& p : packs) p.reserve(c.m, std::max(c.n, c.k));
    for (bool one_thread : {false, true}) {
      INFO((one_thread ? "one thread" : "the workers"));
      std::vector<float> got(expected.size(), -1.0f);
      const auto run = [&] {
        bf16::product(c.m, c.n, c.k, op_a, op_b, got.data(), c.n, 1, c.lower, packs);
      };
      if (one_thread) {  // as inside a side-by-side task
        muon::cpu::worker_pool().run(
            1, [](void* f, std::size_t, int) { (*static_cast<decltype(run)*>(f))(); },
            const_cast<void*>(static_cast<const void*>(&run)));
      } else {
        run();
      }
      int differ = 0;
      for (muon::index_t i = 0; i < c.m; ++i)
        for (muon::index_t j = 0; j < (c.lower ? i + 1 : c.n); ++j)
          differ += std::bit_cast<std::uint32_t>(got[static_cast<std::size_t>(i * c.n + j)]) !=
                    std::bit_cast<std::uint32_t>(expected[static_cast<std::size_t>(i * c.n + j)]);
      CHECK(differ == 0);
    }
  }
}

TEST_CASE("bf16 Newton-Schulz lands as near msign as float32 and keeps the schedule's bounds",
          "[bf16]") {
  if (!bf16_cpu()) return;
  using muon::cpu::Precision;
  for (auto [m, n] : {std::pair{64, 256}, std::pair{256, 64}, std::pair{96, 96},
                      std::pair{77, 130}, std::pair{1, 50}}) {
    const Mat<float> x = with_spectrum<float>(m, n, log_spaced(std::min(m, n), 5e-2, 5.0), 11);
    const Eigen::MatrixXd exact = muon::reference::msign(x.cast<double>());
    const double root_k = std::sqrt(double(std::min(m, n)));
    for (const Schedule& s : {Schedule::keller(), Schedule::polar_express()}) {
      const Mat<float> o16 = ns_in(Precision::bfloat16, x, s, 5);
      const Mat<float> o32 = ns_in(Precision::float32, x, s, 5);
      const double d16 = (o16.cast<double>() - exact).norm() / root_k;
      const double d32 = (o32.cast<double>() - exact).norm() / root_k;
      const Eigen::VectorXd sv = muon::reference::singular_values(o16.cast<double>());
      INFO(m << "x" << n << " " << s.name() << ": dist_msign bf16 " << d16 << ", float32 " << d32
             << "; s in [" << sv.minCoeff() << ", " << sv.maxCoeff() << "]");
      // bf16 operands (8 significant bits) move each result entry by about 2^-9 relative
      CHECK(d16 <= d32 + 4e-3);
      CHECK(sv.minCoeff() >= 0.6);
      CHECK(sv.maxCoeff() <= 1.25);
      // the same matrix again: the same bits
      CHECK(same_bits(o16, ns_in(Precision::bfloat16, x, s, 5)));
    }
  }
}

TEST_CASE("bf16 Newton-Schulz stays finite and near the schedule's bound at any rank and scale",
          "[bf16][robust]") {
  if (!bf16_cpu()) return;
  const std::pair<Schedule, std::vector<int>> schedules[] = {
      {Schedule::keller(), {1, 5, 10, 72}}, {Schedule::polar_express(), {5, 12}},
      {Schedule::textbook(), {5, 20}}};
  double worst = 0;
  for (const RobustInput& in : kRobustInputs) {
    const Mat<float> x = low_rank<float>(in.m, in.n, in.rank, in.scale, 17 + in.rank, in.zero_row);
    for (const auto& [schedule, step_counts] : schedules)
      for (int steps : step_counts) {
        const double bound = muon::singular_value_bound(schedule.resolve(steps),
                                                        1.0 / schedule.norm_scale()).output;
        const Mat<float> o = ns_in(muon::cpu::Precision::bfloat16, x, schedule, steps);
        INFO(in.m << "x" << in.n << " rank " << in.rank << " scale " << in.scale << ", "
                  << schedule.name() << " " << steps << " steps");
        REQUIRE(o.allFinite());
        if (in.rank == 0) CHECK(o.cwiseAbs().maxCoeff() == 0);
        const double excess =
            muon::reference::singular_values(o.cast<double>()).maxCoeff() - bound;
        // bf16 rounding of the operands may lift a singular value past the exact bound by a
        // few bf16 units (2^-8 = 0.004; 0.0048 seen over this grid)
        CHECK(excess <= 0.01 * std::max(1.0, bound));
        worst = std::max(worst, excess);
      }
  }
  WARN("bf16: largest singular value past the bound by " << worst);
}

TEST_CASE("the CPU backend's Newton-Schulz precision is checked and reported", "[bf16]") {
  using muon::cpu::Precision;
  CHECK_THROWS_WITH(backend_in(static_cast<Precision>(7)),
                    Catch::Contains("CpuOptions::newton_schulz = 7"));
  if (!muon::cpu::has_bf16()) {
    CHECK_THROWS_WITH(backend_in(Precision::bfloat16), Catch::Contains("no AVX512-BF16"));
    CHECK(muon::EigenBackend().newton_schulz_precision() == Precision::float32);
    return;
  }
  const muon::EigenBackend b16 = backend_in(Precision::bfloat16), b32 = backend_in(Precision::float32);
  CHECK(b16.use_bf16(muon::NewtonSchulzMethod::gram));
  CHECK_FALSE(b32.use_bf16(muon::NewtonSchulzMethod::standard));
  CHECK_THAT(b16.engine(), Catch::Contains("bf16 products on AVX512-BF16"));
  CHECK_THAT(b32.engine(), Catch::Contains("float Newton-Schulz: float32 products"));
  // double matrices never run in bf16: the same bits as under float32
  const Mat<double> x = gaussian<double>(20, 36, 4);
  CHECK(same_bits(ns_in(Precision::bfloat16, x, Schedule::keller(), 5),
                  ns_in(Precision::float32, x, Schedule::keller(), 5)));
}
