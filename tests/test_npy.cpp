// The .npy reader and writer: files written by NumPy, round trips, and malformed files.
#include <catch2/catch.hpp>

#include "test_support.hpp"

using namespace muon_test;
using Catch::Matchers::Contains;

namespace {

// NumPy fixtures (tests/golden/npy_*.npy) hold value(i, j) = 10 i + j + 0.5.
template <class T>
void check_grid(const muon::npy::Array<T>& a) {
  REQUIRE(a.shape == std::vector<muon::index_t>{3, 4});
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) CHECK(a.data[i * 4 + j] == T(10 * i + j + 0.5));
}

std::string header(const std::string& dict, char major = 1) {
  std::string out("\x93NUMPY", 6);
  out += major;
  out += '\0';
  out += static_cast<char>(dict.size() & 0xff);
  out += static_cast<char>(dict.size() >> 8);
  if (major > 1) out += std::string(2, '\0');
  return out + dict;
}

}  // namespace

TEST_CASE("reads NumPy's files in C and Fortran order, both byte orders", "[npy]") {
  check_grid(muon::npy::read<double>(golden_path("npy_c_f8.npy")));
  check_grid(muon::npy::read<float>(golden_path("npy_c_f8.npy")));
  check_grid(muon::npy::read<double>(golden_path("npy_c_f4.npy")));
  check_grid(muon::npy::read<double>(golden_path("npy_fortran_f8.npy")));
  check_grid(muon::npy::read<float>(golden_path("npy_big_endian_f4.npy")));
  CHECK(muon::npy::read<float>(golden_path("npy_c_f4.npy")).stored == muon::npy::DType::float32);
  const auto cube = muon::npy::read<float>(golden_path("npy_3d_fortran_f4.npy"));
  REQUIRE(cube.shape == std::vector<muon::index_t>{2, 3, 4});
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 4; ++k) CHECK(cube.data[(i * 3 + j) * 4 + k] == 100 * i + 10 * j + k);
}

TEMPLATE_TEST_CASE("write then read gives the same array", "[npy]", float, double) {
  for (std::vector<muon::index_t> shape : {std::vector<muon::index_t>{5}, {3, 4}, {2, 3, 4}, {0, 3}, {}}) {
    std::size_t n = 1;
    for (auto e : shape) n *= static_cast<std::size_t>(e);
    std::vector<TestType> data(n);
    for (std::size_t i = 0; i < n; ++i) data[i] = TestType(i) / 3;
    const std::string bytes = muon::npy::serialize(shape, data.data());
    CHECK((bytes.size() - n * sizeof(TestType)) % 64 == 0);  // header padded to 64 bytes
    const auto back = muon::npy::parse<TestType>(bytes);
    CHECK(back.shape == shape);
    CHECK(back.data == data);
  }
}

TEST_CASE("a header longer than version 1.0's 64 KiB limit is written as version 2.0", "[npy]") {
  const std::vector<muon::index_t> shape(30000, 1);  // "1, " x 30000: a 90 KB header
  const double one = 2.5;
  const std::string bytes = muon::npy::serialize(shape, &one);
  CHECK(bytes[6] == 2);
  CHECK((bytes.size() - sizeof(double)) % 64 == 0);
  const auto back = muon::npy::parse<double>(bytes);
  CHECK(back.shape == shape);
  CHECK(back.data == std::vector<double>{2.5});
}

TEST_CASE("malformed .npy files are refused with the reason", "[npy]") {
  const std::string ok = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }";
  const std::string eight(16, '\0');
  CHECK_NOTHROW(muon::npy::parse<double>(header(ok) + eight));
  CHECK_NOTHROW(muon::npy::parse<double>(header(ok, 2) + eight));
  auto refused = [](const std::string& bytes, const char* why) {
    INFO(why);
    CHECK_THROWS_WITH(muon::npy::parse<double>(bytes, "x.npy"), Contains("x.npy") && Contains(why));
  };
  refused("", "not a .npy file");
  refused("PK\x03\x04 zip file", "not a .npy file");
  refused(header(ok, 9) + eight, "version 9");
  refused(header(ok).substr(0, 30), "truncated .npy header");
  refused(header(ok) + eight.substr(0, 15), "truncated data");
  refused(header(ok) + eight + "!", "unexpected bytes");
  refused(header("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }") + eight,
          "unsupported dtype '<i4'");
  refused(header("{'descr': '<c16', 'fortran_order': False, 'shape': (2,), }") + eight,
          "unsupported dtype");
  refused(header("{'descr': '<f8', 'shape': (2,), }") + eight, "needs 'descr'");
  refused(header("{'descr': '<f8', 'fortran_order': Maybe, 'shape': (2,), }") + eight,
          "True or False");
  refused(header("{'descr': '<f8', 'fortran_order': False, 'shape': (-2,), }") + eight,
          "non-negative integers");
  refused(header("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), 'x': 1}") + eight,
          "unexpected key");
  refused(header("{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999, 99999999999), }"),
          "too large");
  refused(header("{'descr: '<f8'}") + eight, "malformed");
  CHECK_THROWS_WITH(muon::npy::read<float>("/nonexistent/file.npy"), Contains("cannot open"));
}
