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

TEST_CASE("strided N-D arrays are viewed as Muon sees them, or refused by name", "[views]") {
  float data[2 * 3 * 4 * 5] = {};
  using S = std::vector<muon::index_t>;
  auto view = [&](const S& shape, const S& strides) {
    return muon::strided_view(data, shape, strides, "weight 'conv1'");
  };
  // 2-D: any strides (here a transposed column-major block).
  auto m = view({3, 4}, {1, 3});
  CHECK((m.rows() == 3 && m.cols() == 4 && m.row_stride() == 1 && m.col_stride() == 3));
  CHECK(&m(2, 1) == &data[2 + 1 * 3]);
  // 1-D is one row with its stride; 0-D one element.
  auto v = view({5}, {2});
  CHECK((v.rows() == 1 && v.cols() == 5 && &v(0, 4) == &data[8]));
  CHECK((view({}, {}).rows() == 1 && view({}, {}).cols() == 1));
  // 4-D, dense trailing block, padded outer stride (rows 120 / 2 = 60 apart): (2, 60).
  auto k = view({2, 3, 4, 5}, {60, 20, 5, 1});
  CHECK((k.rows() == 2 && k.cols() == 60 && k.row_stride() == 60 && k.col_stride() == 1));
  CHECK(&k(1, 59) == &data[119]);
  // Extent-1 dimensions may carry any stride.
  auto e = view({2, 1, 4, 5}, {20, 999, 5, 1});
  CHECK((e.cols() == 20 && &e(1, 19) == &data[39]));
  // A permuted 3-D array would need a copy: refused, naming the array, shape and dimension.
  CHECK_THROWS_WITH(view({2, 3, 4}, {12, 1, 3}),
                    Catch::Contains("weight 'conv1' of shape 2x3x4") &&
                        Catch::Contains("dimension 2"));
  CHECK_THROWS_AS(view({2, 3}, {1}), muon::InvalidArgument);
}
