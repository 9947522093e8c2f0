// Optimizer state save/load: bit-identical resumption, and every way a file can be wrong.
#include <catch2/catch.hpp>
#include <filesystem>
#include <limits>
#include <sstream>

#include "test_support.hpp"

using namespace muon_test;
using Catch::Matchers::Contains;

namespace {

/// A small model: a tall and a wide matrix, a conv kernel (Muon) and a bias (AdamW), with
/// gradients that change every step in a reproducible way.
template <class T>
struct Model {
  Mat<T> tall = gaussian<T>(12, 5, 1), wide = gaussian<T>(4, 9, 2), conv = gaussian<T>(3, 8, 3);
  Mat<T> bias = gaussian<T>(1, 7, 4);
  Mat<T> g_tall, g_wide, g_conv, g_bias;
  muon::Optimizer<muon::EigenBackend, T> opt;

  explicit Model(std::vector<muon::index_t> conv_shape = {3, 2, 2, 2},
                 muon::OptimizerOptions options = {}) {
    muon::GroupOptions g;
    g.muon.lr = 0.02;
    g.adamw.lr = 0.01;
    opt = muon::Optimizer<muon::EigenBackend, T>(g, options);
    set_grads(0);
    opt.add_muon("tall", tall, g_tall);
    opt.add_muon("wide", wide, g_wide);
    opt.add_muon("conv", muon::TensorView<T>{conv.data(), conv_shape},
                 muon::TensorView<const T>{g_conv.data(), conv_shape});
    opt.add_adamw("bias", bias, g_bias);
  }
  void set_grads(int step) {
    if (g_tall.size() == 0) {  // first call: allocate
      g_tall.resize(12, 5);
      g_wide.resize(4, 9);
      g_conv.resize(3, 8);
      g_bias.resize(1, 7);
    }
    overwrite(g_tall, gaussian<T>(12, 5, 100 + step));
    overwrite(g_wide, gaussian<T>(4, 9, 200 + step));
    overwrite(g_conv, gaussian<T>(3, 8, 300 + step));
    overwrite(g_bias, gaussian<T>(1, 7, 400 + step));
  }
  void train(int from, int to) {
    for (int s = from; s < to; ++s) {
      set_grads(s);
      opt.step();
    }
  }
  std::string save() {
    std::ostringstream out;
    opt.save_state(out);
    return out.str();
  }
  void load(const std::string& bytes) {
    std::istringstream in(bytes);
    opt.load_state(in);
  }
};

template <class T>
bool same_params(const Model<T>& a, const Model<T>& b) {
  return a.tall == b.tall && a.wide == b.wide && a.conv == b.conv && a.bias == b.bias;
}

}  // namespace

TEMPLATE_TEST_CASE("save at step k, load into a fresh optimizer, continue: bit-identical",
                   "[state]", float, double) {
  Model<TestType> uninterrupted;
  uninterrupted.train(0, 6);

  Model<TestType> first;
  first.train(0, 3);
  const std::string bytes = first.save();

  Model<TestType> resumed;  // fresh optimizer, parameters restored from the first run
  overwrite(resumed.tall, first.tall);
  overwrite(resumed.wide, first.wide);
  overwrite(resumed.conv, first.conv);
  overwrite(resumed.bias, first.bias);
  resumed.load(bytes);
  CHECK(resumed.opt.step_count() == 3);
  resumed.train(3, 6);
  CHECK(same_params(resumed, uninterrupted));
  CHECK((resumed.save() == uninterrupted.save()));
}

TEST_CASE("state files go through a temporary and a rename", "[state]") {
  const auto dir = std::filesystem::temp_directory_path() / "muon_state_test";
  std::filesystem::create_directories(dir);
  const auto path = dir / "opt.muon";
  Model<float> a;
  a.train(0, 2);
  a.opt.save_state(path);
  CHECK(std::filesystem::exists(path));
  CHECK_FALSE(std::filesystem::exists(dir / "opt.muon.tmp"));
  Model<float> b;
  b.opt.load_state(path);
  CHECK((b.save() == a.save()));
  CHECK_THROWS_AS(b.opt.load_state(dir / "missing.muon"), muon::StateError);
  std::filesystem::remove_all(dir);
}

TEMPLATE_TEST_CASE("every truncation and every corrupted byte is refused, nothing changes",
                   "[state]", float, double) {
  Model<TestType> source;
  source.train(0, 2);
  const std::string good = source.save();

  Model<TestType> target;
  target.train(0, 1);
  const std::string before = target.save();
  auto unchanged = [&] { return target.save() == before; };

  for (std::size_t n = 0; n < good.size(); ++n) {
    INFO("truncated to " << n << " of " << good.size() << " bytes");
    CHECK_THROWS_AS(target.load(good.substr(0, n)), muon::StateError);
  }
  REQUIRE(unchanged());
  for (std::size_t i = 0; i < good.size(); ++i) {
    std::string bad = good;
    bad[i] = static_cast<char>(bad[i] ^ 0x5a);
    INFO("byte " << i << " changed");
    CHECK_THROWS_AS(target.load(bad), muon::StateError);
  }
  REQUIRE(unchanged());
  CHECK_THROWS_WITH(target.load(good + "x"), Contains("checksum"));
  CHECK(unchanged());
  // Still trains like an optimizer that never saw those files.
  Model<TestType> never;
  never.train(0, 1);
  target.train(1, 3);
  never.train(1, 3);
  CHECK(same_params(target, never));
}

TEST_CASE("wrong version, scalar type, shape, name or count is refused with the reason",
          "[state]") {
  Model<float> source;
  source.train(0, 1);
  const std::string good = source.save();

  std::string v2 = good;
  v2[8] = 2;  // version field follows the 8 magic bytes
  Model<float> target;
  CHECK_THROWS_WITH(target.load(v2), Contains("version 2"));
  CHECK_THROWS_WITH(target.load("not a state file at all"), Contains("magic"));

  Model<double> as_double;
  CHECK_THROWS_WITH(as_double.load(good), Contains("4-byte scalars"));

  Model<float> other_shape({3, 8});  // conv registered as 3x8 instead of 3x2x2x2: same matrix
  CHECK_NOTHROW(other_shape.load(good));

  muon::Optimizer<muon::EigenBackend, float> renamed;
  Mat<float> t = gaussian<float>(12, 5, 1), gt = t;
  renamed.add_muon("not_tall", t, gt);
  Mat<float> w = gaussian<float>(4, 9, 1), gw = w, c = gaussian<float>(3, 8, 1), gc = c;
  Mat<float> b = gaussian<float>(1, 7, 1), gb = b;
  renamed.add_muon("wide", w, gw);
  renamed.add_muon("conv", c, gc);
  renamed.add_adamw("bias", b, gb);
  std::istringstream in1(good);
  CHECK_THROWS_WITH(renamed.load_state(in1), Contains("'tall'") && Contains("'not_tall'"));

  muon::Optimizer<muon::EigenBackend, float> reshaped;
  Mat<float> t2 = gaussian<float>(5, 12, 1), gt2 = t2;
  reshaped.add_muon("tall", t2, gt2);
  reshaped.add_muon("wide", w, gw);
  reshaped.add_muon("conv", c, gc);
  reshaped.add_adamw("bias", b, gb);
  std::istringstream in2(good);
  CHECK_THROWS_WITH(reshaped.load_state(in2), Contains("12x5") && Contains("5x12"));

  // Found by fuzz_state: a record whose update rule differs from the registered parameter's
  // (here 'tall' marked AdamW, all else intact and the checksum valid) was accepted.
  std::string flipped = good.substr(0, good.size() - 8);
  flipped[32] = 1;  // rule byte of the first record: after magic, version, scalar, steps, count
  const std::uint64_t sum = muon::detail::fnv1a64(flipped);
  for (int i = 0; i < 8; ++i) flipped.push_back(static_cast<char>((sum >> (8 * i)) & 0xff));
  Model<float> ruled;
  const std::string before = ruled.save();
  CHECK_THROWS_WITH(ruled.load(flipped), Contains("'tall' (adamw, 12x5) in the state") &&
                                             Contains("'tall' (muon, 12x5) in this optimizer"));
  CHECK(ruled.save() == before);

  muon::Optimizer<muon::EigenBackend, float> fewer;
  fewer.add_muon("tall", t, gt);
  std::istringstream in3(good);
  CHECK_THROWS_WITH(fewer.load_state(in3), Contains("4 parameters"));
}

TEST_CASE("a state file written by an independent writer loads with the values it holds",
          "[state]") {
  // tests/fuzz/make_corpus.py writes valid.bin from the documented layout in Python: steps 5,
  // muon 'w' 3x2 with M[i] = 0.1 (i + 1), adamw 'b' 1x4 with m[i] = -(i + 1), v[i] = (i + 1)/2.
  const std::string bytes = read_bytes(golden_path("../fuzz/corpus/state/valid.bin"));
  REQUIRE(!bytes.empty());
  Mat<double> w(3, 2), gw(3, 2), b(1, 4), gb(1, 4);
  w.setZero(); gw.setZero(); b.setZero(); gb.setZero();
  muon::Optimizer<muon::EigenBackend, double> opt;
  const auto pw = opt.add_muon("w", w, gw);
  const auto pb = opt.add_adamw("b", b, gb);
  std::istringstream in(bytes);
  opt.load_state(in);
  CHECK(opt.step_count() == 5);
  const auto m_w = opt.momentum_buffer(pw), m_b = opt.momentum_buffer(pb);
  for (int i = 0; i < 6; ++i) CHECK(m_w(i / 2, i % 2) == 0.1 * (i + 1));
  for (int i = 0; i < 4; ++i) CHECK(m_b(0, i) == -(i + 1.0));
  std::ostringstream out;  // v and the AdamW step count are checked by the byte round trip
  opt.save_state(out);
  CHECK(out.str() == bytes);
}

TEST_CASE("a state holding NaN or Inf is refused under error and skip, kept under unchecked",
          "[state][errors]") {
  // An unchecked run steps through a NaN gradient and saves what it has.
  muon::OptimizerOptions unchecked;
  unchecked.non_finite = muon::NonFinitePolicy::unchecked;
  Model<float> poisoned({3, 2, 2, 2}, unchecked);
  poisoned.g_bias(0, 3) = std::numeric_limits<float>::quiet_NaN();
  poisoned.opt.step();
  const std::string bytes = poisoned.save();
  for (auto policy : {muon::NonFinitePolicy::error, muon::NonFinitePolicy::skip}) {
    muon::OptimizerOptions o;
    o.non_finite = policy;
    Model<float> m({3, 2, 2, 2}, o);
    const std::string before = m.save();
    CHECK_THROWS_WITH(m.load(bytes), Contains("'bias' (1x7)") && Contains("NaN or Inf"));
    CHECK((m.save() == before));
  }
  Model<float> keeps({3, 2, 2, 2}, unchecked);
  CHECK_NOTHROW(keeps.load(bytes));
  CHECK((keeps.save() == bytes));
}

TEST_CASE("a directory as a state path is a StateError naming it, with nothing left behind",
          "[state][errors]") {
  const auto dir = std::filesystem::temp_directory_path() / "muon_state_dir_test";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir / "checkpoint");
  Model<float> a;
  a.train(0, 1);
  const std::string before = a.save();
  CHECK_THROWS_WITH(a.opt.save_state(dir / "checkpoint"),
                    Contains("checkpoint'") && Contains("is a directory"));
  CHECK_THROWS_AS(a.opt.load_state(dir / "checkpoint"), muon::StateError);
  CHECK_THROWS_AS(a.opt.save_state(dir / "no" / "such" / "dir" / "opt.muon"), muon::StateError);
  std::size_t entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++entries;
  CHECK(entries == 1);  // only the directory made above: no stray temporary
  CHECK((a.save() == before));
  std::filesystem::remove_all(dir);
}
