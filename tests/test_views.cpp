// Views and adapters: Eigen layouts, user tensor types (ADL and trait), overlap detection.
#include <catch2/catch.hpp>
#include <memory>

#include "test_support.hpp"

using namespace muon_test;

// A user's own tensor type, adapted by an ADL function in its namespace.
namespace user_lib {
struct Tensor2D {
  std::vector<float> storage;
  long rows, cols;
  Tensor2D(long r, long c) : storage(static_cast<std::size_t>(r * c)), rows(r), cols(c) {}
};
inline muon::MatrixView<float> muon_view(Tensor2D& t) {
  return muon::row_major_view(t.storage.data(), t.rows, t.cols);
}
inline muon::MatrixView<const float> muon_view(const Tensor2D& t) {
  return muon::row_major_view(t.storage.data(), t.rows, t.cols);
}
}  // namespace user_lib

// A third-party column-major type the user does not own, adapted by a trait specialization.
namespace vendor {
struct ColumnMajorBuffer {
  std::unique_ptr<double[]> data;
  long m, n;
};
}  // namespace vendor
template <>
struct muon::TensorAdapter<vendor::ColumnMajorBuffer> {
  static MatrixView<double> view(vendor::ColumnMajorBuffer& b) {
    return col_major_view(b.data.get(), b.m, b.n);
  }
  static MatrixView<const double> view(const vendor::ColumnMajorBuffer& b) {
    return col_major_view<HostSpace, const double>(b.data.get(), b.m, b.n);
  }
};

TEST_CASE("Eigen objects are viewed in place with their strides", "[views]") {
  Eigen::MatrixXf cm(4, 6);         // column-major
  Mat<float> rm(4, 6);              // row-major
  auto v1 = muon::view(cm);
  CHECK(v1.data() == cm.data());
  CHECK((v1.row_stride() == 1 && v1.col_stride() == 4));
  auto v2 = muon::view(rm);
  CHECK((v2.row_stride() == 6 && v2.col_stride() == 1));
  auto block = rm.block(1, 2, 2, 3);
  auto v3 = muon::view(block);
  CHECK(v3.data() == &rm(1, 2));
  CHECK((v3.rows() == 2 && v3.cols() == 3 && v3.row_stride() == 6));
  const Eigen::MatrixXf& constant = cm;
  auto v4 = muon::view(constant);
  STATIC_REQUIRE(std::is_same_v<decltype(v4), muon::MatrixView<const float>>);
  Eigen::Ref<Eigen::MatrixXf> ref(cm);
  CHECK(muon::view(ref).data() == cm.data());
  v2(3, 5) = 42;
  CHECK(rm(3, 5) == 42);
  CHECK(v2.transposed()(5, 3) == 42);
}

TEST_CASE("user tensor types train through ADL and trait adapters without copies", "[views]") {
  user_lib::Tensor2D w(10, 6), g(10, 6);
  for (std::size_t i = 0; i < w.storage.size(); ++i) {
    w.storage[i] = std::sin(float(i));
    g.storage[i] = std::cos(float(i));
  }
  const std::vector<float> before = w.storage;
  muon::Optimizer<muon::EigenBackend, float> opt;
  opt.add_muon("user.weight", w, g);
  opt.step();
  CHECK(w.storage != before);  // updated in the user's own storage

  // The same numbers through an Eigen matrix give the same result.
  Mat<float> ew = Eigen::Map<Mat<float>>(const_cast<float*>(before.data()), 10, 6);
  const Mat<float> eg = Eigen::Map<Mat<float>>(g.storage.data(), 10, 6);
  muon::Optimizer<muon::EigenBackend, float> ref;
  ref.add_muon("w", ew, eg);
  ref.step();
  CHECK(std::equal(w.storage.begin(), w.storage.end(), ew.data()));

  vendor::ColumnMajorBuffer p{std::make_unique<double[]>(12), 3, 4};
  vendor::ColumnMajorBuffer pg{std::make_unique<double[]>(12), 3, 4};
  for (int i = 0; i < 12; ++i) pg.data[i] = i + 1.0;
  muon::Optimizer<muon::EigenBackend, double> opt2;
  opt2.add_adamw("vendor.bias", p, pg);
  opt2.step();
  for (int i = 0; i < 12; ++i) CHECK(p.data[i] == Approx(-1e-3).epsilon(1e-6));  // -lr sign(g)
}

TEST_CASE("overlap detection is exact for blocks of one matrix", "[views]") {
  Mat<float> m(8, 10);
  auto full = muon::view(m);
  CHECK(muon::detail::views_overlap(full, full));
  CHECK_FALSE(muon::detail::views_overlap(full.block(0, 0, 8, 5), full.block(0, 5, 8, 5)));
  CHECK(muon::detail::views_overlap(full.block(0, 0, 8, 6), full.block(0, 5, 8, 5)));
  CHECK_FALSE(muon::detail::views_overlap(full.block(0, 0, 4, 10), full.block(4, 0, 4, 10)));
  CHECK(muon::detail::views_overlap(full.block(2, 3, 3, 3), full.block(4, 5, 3, 3)));
  CHECK_FALSE(muon::detail::views_overlap(full.block(2, 3, 3, 3), full.block(5, 3, 3, 3)));
  // transposed layouts fall back to the conservative address-range test
  CHECK(muon::detail::views_overlap(full.block(0, 0, 8, 5), full.transposed().block(0, 0, 5, 8)));
  Mat<float> other(8, 10);
  CHECK_FALSE(muon::detail::views_overlap(full, muon::view(other)));
  CHECK_FALSE(muon::detail::views_overlap(full.block(0, 0, 0, 5), full));  // empty
}

TEST_CASE("N-D tensors flatten to (shape[0], rest)", "[views]") {
  float data[2 * 3 * 4 * 5];
  muon::TensorView<float> t{data, {2, 3, 4, 5}};
  CHECK(t.numel() == 120);
  const auto m = t.flattened();
  CHECK((m.rows() == 2 && m.cols() == 60 && m.row_stride() == 60 && m.col_stride() == 1));
  muon::TensorView<float> v{data, {7}};
  CHECK((v.flattened().rows() == 1 && v.flattened().cols() == 7));
}
