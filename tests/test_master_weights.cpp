// MasterWeights: bf16 parameters updated through fp32 masters, on the CPU (Eigen::bfloat16).
// The reference is a plain fp32 optimizer on the widened parameters and gradients.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "muon/master_weights.hpp"
#include "test_support.hpp"

using namespace muon_test;
using Catch::Matchers::Contains;
using muon::EigenBackend;
using bf16 = Eigen::bfloat16;

namespace {

using Mixed = muon::MasterWeights<EigenBackend, float, bf16>;

template <class T>
muon::MatrixView<T> view_of(Mat<T>& m) {
  return muon::row_major_view(m.data(), m.rows(), m.cols());
}
template <class T>
muon::MatrixView<const T> cview_of(const Mat<T>& m) {
  return muon::row_major_view(m.data(), m.rows(), m.cols());
}
Mat<float> master_of(Mixed& mixed, muon::ParamId id) {
  const auto v = mixed.master(id);
  Mat<float> m(v.rows(), v.cols());
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) m(i, j) = v(i, j);
  return m;
}

muon::GroupOptions options() {
  muon::GroupOptions g;
  g.muon.lr = 0.02;
  g.adamw.lr = 3e-3;
  return g;
}

}  // namespace

TEST_CASE("bf16 parameters are the rounded fp32 masters of a plain fp32 run",
          "[master_weights]") {
  Mat<bf16> w16 = gaussian<float>(24, 40, 1).cast<bf16>(), b16 = gaussian<float>(1, 40, 2).cast<bf16>();
  Mat<bf16> gw16(24, 40), gb16(1, 40);
  Mat<float> w32 = w16.cast<float>(), b32 = b16.cast<float>(), gw32(24, 40), gb32(1, 40);

  muon::Optimizer<EigenBackend, float> inner(options()), plain(options());
  Mixed mixed(inner);
  const auto iw = mixed.add_muon("w", view_of(w16), cview_of(gw16));
  const auto ib = mixed.add_adamw("b", view_of(b16), cview_of(gb16));
  plain.add_muon("w", view_of(w32), cview_of(gw32));
  plain.add_adamw("b", view_of(b32), cview_of(gb32));

  for (int step = 0; step < 5; ++step) {
    gw16 = gaussian<float>(24, 40, 10 + step).cast<bf16>();
    gb16 = gaussian<float>(1, 40, 20 + step).cast<bf16>();
    gw32 = gw16.cast<float>();
    gb32 = gb16.cast<float>();
    CHECK(mixed.step().applied);
    plain.step();
    // The masters follow the fp32 run bit for bit, the parameters are their rounding.
    CHECK(same_bits(master_of(mixed, iw), w32));
    CHECK(same_bits(master_of(mixed, ib), b32));
    const Mat<bf16> rw = w32.cast<bf16>(), rb = b32.cast<bf16>();
    CHECK(same_bits(w16, rw));
    CHECK(same_bits(b16, rb));
  }
  // Not the trivial case: the parameters did move.
  CHECK((w16.cast<float>() - gaussian<float>(24, 40, 1).cast<bf16>().cast<float>()).norm() > 0.1);
}

TEST_CASE("updates below bf16's rounding step accumulate in the masters", "[master_weights]") {
  // At 1.0 bf16's spacing is 2^-7: an AdamW step of lr = 1e-3 rounds back to 1.0 when applied
  // to the bf16 value itself, so only an fp32 master can move the parameter.
  Mat<bf16> w16 = Mat<bf16>::Constant(4, 8, bf16(1.0f)), g16 = Mat<bf16>::Constant(4, 8, bf16(0.5f));
  muon::GroupOptions g;
  g.adamw.lr = 1e-3;
  g.adamw.weight_decay = 0;
  muon::Optimizer<EigenBackend, float> inner(g);
  Mixed mixed(inner);
  const auto id = mixed.add_adamw("w", view_of(w16), cview_of(g16));
  mixed.step();
  CHECK(static_cast<float>(w16(0, 0)) == 1.0f);               // one step: below half a step
  CHECK(std::abs(master_of(mixed, id)(0, 0) - 0.999f) < 1e-6);  // ... yet the master moved
  for (int i = 0; i < 9; ++i) mixed.step();
  const Mat<float> master = master_of(mixed, id);
  CHECK(std::abs(master(0, 0) - 0.990f) < 1e-5);
  CHECK(static_cast<float>(w16(0, 0)) == static_cast<float>(bf16(master(0, 0))));
  CHECK(static_cast<float>(w16(0, 0)) < 1.0f);
}

TEST_CASE("a refused step changes neither masters nor bf16 parameters", "[master_weights]") {
  Mat<bf16> w16 = gaussian<float>(8, 12, 3).cast<bf16>(), g16 = gaussian<float>(8, 12, 4).cast<bf16>();
  g16(2, 5) = bf16(std::numeric_limits<float>::quiet_NaN());
  const Mat<bf16> w0 = w16;
  for (auto policy : {muon::NonFinitePolicy::skip, muon::NonFinitePolicy::error}) {
    muon::OptimizerOptions oo;
    oo.non_finite = policy;
    muon::Optimizer<EigenBackend, float> inner(options(), oo);
    Mixed mixed(inner);
    const auto id = mixed.add_muon("w", view_of(w16), cview_of(g16));
    const Mat<float> m0 = master_of(mixed, id);
    if (policy == muon::NonFinitePolicy::skip) {
      const auto report = mixed.step();
      CHECK_FALSE(report.applied);
      CHECK(report.skipped_because == "w");
    } else {
      CHECK_THROWS_AS(mixed.step(), muon::NonFiniteGradient);
    }
    CHECK(same_bits(w16, w0));
    CHECK(same_bits(master_of(mixed, id), m0));
  }
}

TEST_CASE("MasterWeights refuses bad registrations by name and shape, leaving nothing behind",
          "[master_weights]") {
  Mat<bf16> w16 = Mat<bf16>::Zero(4, 3), g16 = Mat<bf16>::Zero(3, 4), ok16 = Mat<bf16>::Zero(4, 3);
  muon::Optimizer<EigenBackend, float> inner;
  Mixed mixed(inner);
  CHECK_THROWS_WITH(mixed.add_muon("w", view_of(w16), cview_of(g16)),
                    Contains("parameter 'w' (4x3)") && Contains("gradient has shape 3x4"));
  CHECK(inner.num_params() == 0);
  mixed.add_muon("w", view_of(w16), cview_of(ok16));
  CHECK_THROWS_WITH(mixed.add_adamw("w2", view_of(w16), cview_of(ok16)),
                    Contains("'w2'") && Contains("shares memory"));
  Mat<bf16> other = Mat<bf16>::Zero(4, 3), other_g = Mat<bf16>::Zero(4, 3);
  CHECK_THROWS_WITH(mixed.add_adamw("w", view_of(other), cview_of(other_g)),
                    Contains("already registered"));  // the optimizer's own check
  CHECK(inner.num_params() == 1);
  CHECK_THROWS_WITH(mixed.master(muon::ParamId{7}), Contains("id 7"));
  CHECK(mixed.step().updated == 1);
}

TEST_CASE("sync_masters restarts the masters from the bf16 parameters", "[master_weights]") {
  Mat<bf16> w16 = gaussian<float>(6, 10, 5).cast<bf16>(), g16 = gaussian<float>(6, 10, 6).cast<bf16>();
  muon::Optimizer<EigenBackend, float> inner(options());
  Mixed mixed(inner);
  const auto id = mixed.add_muon("w", view_of(w16), cview_of(g16));
  mixed.step();
  w16 = gaussian<float>(6, 10, 7).cast<bf16>();  // e.g. parameters loaded from a checkpoint
  mixed.sync_masters();
  const Mat<float> widened = w16.cast<float>();
  CHECK(same_bits(master_of(mixed, id), widened));
}

TEST_CASE("a refused Newton-Schulz result leaves its bf16 parameter, the others are rounded",
          "[master_weights][robust]") {
  // sum-form momentum on bf16 gradients of ~1e38 overflows float at the third step (as in
  // test_optimizer.cpp)
  muon::GroupOptions g = options();
  g.muon.momentum_form = muon::MomentumForm::sum;
  muon::Optimizer<EigenBackend, float> inner(g);
  Mixed mixed(inner);
  Mat<bf16> huge = gaussian<float>(8, 24, 1).cast<bf16>(), other = gaussian<float>(8, 8, 2).cast<bf16>();
  const Mat<bf16> g_huge = Mat<float>::Constant(8, 24, 1e38f).cast<bf16>();
  const Mat<bf16> g_other = gaussian<float>(8, 8, 3).cast<bf16>();
  const auto ih = mixed.add_muon("huge", view_of(huge), cview_of(g_huge));
  const auto io = mixed.add_muon("other", view_of(other), cview_of(g_other));
  mixed.step();
  mixed.step();
  const Mat<bf16> huge2 = huge, other2 = other;
  const Mat<float> master2 = master_of(mixed, ih);
  CHECK_THROWS_AS(mixed.step(), muon::NonFiniteUpdate);
  CHECK(same_bits(huge, huge2));
  CHECK(same_bits(master_of(mixed, ih), master2));
  CHECK_FALSE(same_bits(other, other2));
  CHECK(same_bits(other, Mat<bf16>(master_of(mixed, io).cast<bf16>())));
}

TEST_CASE("QK-clip through MasterWeights rescales the fp32 masters and rounds them into the "
          "bf16 parameters", "[master_weights][qk_clip]") {
  Mat<bf16> w16 = gaussian<float>(24, 8, 1).cast<bf16>(), g16 = gaussian<float>(24, 8, 2).cast<bf16>();
  Mat<float> w32 = w16.cast<float>(), g32 = g16.cast<float>();
  muon::Optimizer<EigenBackend, float> inner(options()), plain(options());
  Mixed mixed(inner);
  const auto id = mixed.add_muon("qkv", view_of(w16), cview_of(g16));
  const auto pid = plain.add_muon("qkv", view_of(w32), cview_of(g32));
  mixed.step();
  plain.step();
  const auto heads = muon::AttentionHeads::contiguous(2, 4, 0, 8);  // Q rows 0-7, K rows 8-15
  const auto c = inner.add_qk_clip(id, id, heads, {10.0});
  const auto cp = plain.add_qk_clip(pid, pid, heads, {10.0});
  const std::vector<float> logits{40.0f, 3.0f};
  CHECK(mixed.clip_qk(c, std::span<const float>(logits)).clipped == 1);
  plain.clip_qk(cp, std::span<const float>(logits));
  CHECK(same_bits(master_of(mixed, id), w32));
  CHECK(same_bits(w16, Mat<bf16>(w32.cast<bf16>())));
}
