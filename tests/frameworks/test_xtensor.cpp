// xtensor arrays through muon/adapters/xtensor.hpp: viewed in place in every layout, and a Muon
// step on them equals the same step on Eigen copies of the same numbers.
#include <catch2/catch.hpp>
#include <muon/adapters/xtensor.hpp>
#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xrandom.hpp>
#include <xtensor/xtensor.hpp>
#include <xtensor/xview.hpp>

#include "test_support.hpp"

using namespace muon_test;

TEST_CASE("xtensor arrays are viewed in place in any layout", "[frameworks][xtensor]") {
  xt::xtensor<float, 2> row_major = xt::zeros<float>({3, 5});
  auto r = muon::view(row_major);
  CHECK((r.data() == row_major.data() && r.rows() == 3 && r.cols() == 5));
  CHECK(&r(2, 4) == &row_major(2, 4));

  xt::xtensor<double, 2, xt::layout_type::column_major> col_major = xt::zeros<double>({4, 2});
  auto c = muon::view(col_major);
  CHECK((c.row_stride() == 1 && c.col_stride() == 4 && &c(3, 1) == &col_major(3, 1)));

  xt::xarray<float> kernel = xt::zeros<float>({8, 2, 3, 3});  // flattened to 8 x 18
  auto k = muon::view(kernel);
  CHECK((k.rows() == 8 && k.cols() == 18 && &k(7, 17) == &kernel(7, 1, 2, 2)));

  const xt::xtensor<float, 1> bias = xt::zeros<float>({6});  // const: a read-only view
  auto b = muon::view(bias);
  static_assert(std::is_same_v<decltype(b), muon::MatrixView<const float>>);
  CHECK((b.rows() == 1 && b.cols() == 6 && &b(0, 5) == &bias(5)));

  std::vector<float> buffer(12);  // the user's own memory, adapted by xtensor
  auto adapted = xt::adapt(buffer.data(), buffer.size(), xt::no_ownership(),
                           std::vector<std::size_t>{3, 4});
  CHECK(&muon::view(adapted)(2, 3) == &buffer[11]);

  xt::xarray<float, xt::layout_type::column_major> permuted = xt::zeros<float>({2, 3, 4});
  CHECK_THROWS_AS(muon::view(permuted), muon::InvalidArgument);  // 3-D, not dense row-major
}

TEST_CASE("a Muon step on xtensor arrays equals the step on Eigen matrices",
          "[frameworks][xtensor]") {
  xt::random::seed(3);
  xt::xtensor<double, 2, xt::layout_type::column_major> w = xt::random::randn<double>({24, 40});
  const xt::xtensor<double, 2> g = xt::random::randn<double>({24, 40});
  const double initial_w00 = w(0, 0);
  Mat<double> w_eigen(24, 40), g_eigen(24, 40);
  for (int i = 0; i < 24; ++i)
    for (int j = 0; j < 40; ++j) {
      w_eigen(i, j) = w(i, j);
      g_eigen(i, j) = g(i, j);
    }
  muon::GroupOptions options;
  options.muon.lr = 0.1;
  muon::Optimizer<muon::EigenBackend, double> on_xtensor(options), on_eigen(options);
  on_xtensor.add_muon("w", w, g);
  on_eigen.add_muon("w", w_eigen, g_eigen);
  for (int step = 0; step < 3; ++step) {
    on_xtensor.step();
    on_eigen.step();
  }
  double max_diff = 0;
  for (int i = 0; i < 24; ++i)
    for (int j = 0; j < 40; ++j) max_diff = std::max(max_diff, std::abs(w(i, j) - w_eigen(i, j)));
  CHECK(max_diff < 1e-12);  // the layouts differ, so BLAS may round differently
  CHECK(std::abs(w(0, 0) - initial_w00) > 1e-3);  // and the steps did move the weights
}

TEST_CASE("an xtensor expert stack steps as its experts one by one", "[frameworks][xtensor]") {
  xt::random::seed(3);
  xt::xtensor<double, 3> stack = xt::random::randn<double>({2, 5, 7});
  const xt::xtensor<double, 3> grad = xt::random::randn<double>({2, 5, 7});
  std::vector<xt::xtensor<double, 2>> experts, grads;
  for (std::size_t e = 0; e < 2; ++e) {
    experts.emplace_back(xt::view(stack, e, xt::all(), xt::all()));
    grads.emplace_back(xt::view(grad, e, xt::all(), xt::all()));
  }
  muon::Optimizer<muon::EigenBackend, double> fused, separate;
  fused.add_muon("experts", stack, grad, muon::Experts{5});
  separate.add_muon("e0", experts[0], grads[0]);
  separate.add_muon("e1", experts[1], grads[1]);
  fused.step();
  separate.step();
  for (std::size_t e = 0; e < 2; ++e) {
    const bool same = xt::xtensor<double, 2>(xt::view(stack, e, xt::all(), xt::all())) == experts[e];
    CHECK(same);
  }
}
