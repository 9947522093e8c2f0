// ShardedOptimizer on the in-process thread communicator: results equal the single-process
// optimizer, every rank agrees, state is sharded, bad input is refused on every rank together.
// The same checks run under MPI in tests/mpi/sharded_mpi.cpp.
#include <algorithm>
#include <catch2/catch.hpp>
#include <limits>
#include <random>
#include <span>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "muon/distributed/thread_communicator.hpp"
#include "muon/master_weights.hpp"
#include "sharded_model.hpp"

using namespace muon_test;
using Catch::Matchers::Contains;

namespace {

template <class T>
using Sharded = muon::ShardedOptimizer<muon::EigenBackend, T, muon::ThreadCommunicator>;

/// Runs `steps` sharded steps on `world` threads; returns every rank's final weights.
template <class T>
std::vector<ShardedModel<T>> run_world(int world, muon::ShardingStrategy strategy, int steps) {
  std::vector<ShardedModel<T>> models(static_cast<std::size_t>(world));
  muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
    ShardedModel<T>& model = models[static_cast<std::size_t>(comm.rank())];
    Sharded<T> opt(comm, strategy, sharded_options());
    model.register_with(opt);
    for (int s = 0; s < steps; ++s) {
      model.local_gradients(comm.rank(), s);
      opt.step();
    }
  });
  return models;
}

// Both placements meet the driver's Placement concept through their private hooks, and a
// placement whose hook has another signature does not.
static_assert(muon::detail::Placement<muon::Optimizer<muon::EigenBackend, float>>);
static_assert(muon::detail::Placement<Sharded<double>>);
struct MisspeltPlacement : muon::Optimizer<muon::EigenBackend, float> {
  friend muon::detail::PlacementAccess;
  muon::detail::Piece piece(int) const { return {}; }  // hides the hook, (const Param&)
};
static_assert(!muon::detail::Placement<MisspeltPlacement>);
struct SamePlacement : muon::Optimizer<muon::EigenBackend, float> {  // the control: no hiding
  friend muon::detail::PlacementAccess;
};
static_assert(muon::detail::Placement<SamePlacement>);

}  // namespace

TEMPLATE_TEST_CASE("sharded steps equal the single-process optimizer bit for bit on every rank",
                   "[sharded]", float, double) {
  const auto strategy = GENERATE(muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1);
  const int world = GENERATE(1, 2, 3, 4, 9);  // 9: more ranks than rows, columns or parameters
  INFO(muon::to_string(strategy) << " on " << world << " ranks");
  const auto reference = single_process_reference<TestType>(world, 3);
  const auto ranks = run_world<TestType>(world, strategy, 3);
  for (int r = 0; r < world; ++r) {
    INFO("rank " << r);
    CHECK(same_weights(ranks[static_cast<std::size_t>(r)], ranks[0]));  // ranks agree exactly
    CHECK(same_weights(ranks[static_cast<std::size_t>(r)], reference));
  }
  // The weights moved: the comparison above is not between two untouched copies.
  CHECK(!same_weights(reference, ShardedModel<TestType>()));
}

TEST_CASE("optimizer state is sharded: 1/N per rank plus padding", "[sharded]") {
  const std::size_t single = [] {  // muon: one buffer, adamw: two, doubles
    std::size_t n = 0;
    for (const Shape& s : sharded_shapes()) n += std::size_t(s.rows * s.cols) * (s.muon ? 1 : 2);
    return n * sizeof(double);
  }();
  for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
    for (int world : {1, 2, 4}) {
      std::vector<std::size_t> state(static_cast<std::size_t>(world));
      muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
        ShardedModel<double> model;
        Sharded<double> opt(comm, strategy, sharded_options());
        model.register_with(opt);
        state[static_cast<std::size_t>(comm.rank())] = opt.state_bytes();
      });
      INFO(muon::to_string(strategy) << " on " << world << " ranks");
      std::size_t total = 0;
      for (std::size_t b : state) total += b;
      CHECK(total == single);  // nothing duplicated, nothing lost
      if (strategy == muon::ShardingStrategy::zero1)  // padding: < one row or column per matrix
        for (std::size_t b : state) CHECK(b <= single / std::size_t(world) + 2 * 13 * sizeof(double) * 8);
    }
  }
}

TEST_CASE("each rank sends what ZeRO-1 AdamW would: one reduce-scatter and one all-gather",
          "[sharded]") {
  for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
    const int world = 3;
    std::vector<muon::CommVolume> volume(world);
    std::vector<std::size_t> buffers(world);
    muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
      using Counted = muon::CountingCommunicator<muon::ThreadCommunicator>;
      ShardedModel<float> model;
      muon::ShardedOptimizer<muon::EigenBackend, float, Counted> opt(Counted(comm), strategy,
                                                                      sharded_options());
      model.register_with(opt);
      model.local_gradients(comm.rank(), 0);
      opt.step();
      opt.communicator().reset_volume();
      opt.step();
      volume[std::size_t(comm.rank())] = opt.communicator().volume();
      buffers[std::size_t(comm.rank())] = opt.buffer_bytes();
    });
    // buffer_bytes = segment * (N + 2) * 4; per step: 2 collectives of (N - 1) * segment * 4.
    for (int r = 0; r < world; ++r) {
      const std::uint64_t segment_bytes = buffers[std::size_t(r)] / (world + 2);
      CHECK(volume[std::size_t(r)].sent == 2 * (world - 1) * segment_bytes);
      CHECK(volume[std::size_t(r)].received == volume[std::size_t(r)].sent);
    }
  }
}

TEST_CASE("a NaN on one rank is refused on every rank together and changes nothing",
          "[sharded]") {
  for (auto policy : {muon::NonFinitePolicy::error, muon::NonFinitePolicy::skip}) {
    const int world = 3;
    std::vector<int> refused(world, 0);
    std::vector<char> unchanged(world, 0);  // not vector<bool>: ranks write concurrently
    muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
      ShardedModel<float> model;
      muon::OptimizerOptions options;
      options.non_finite = policy;
      Sharded<float> opt(comm, muon::ShardingStrategy::zero1, sharded_options(), options);
      model.register_with(opt);
      model.local_gradients(comm.rank(), 0);
      opt.step();
      const ShardedModel<float> before = model;
      model.local_gradients(comm.rank(), 1);
      if (comm.rank() == 1) model.g[2](3, 4) = std::numeric_limits<float>::quiet_NaN();
      try {
        const auto report = opt.step();
        refused[std::size_t(comm.rank())] = report.applied ? 0 : 1;
      } catch (const muon::NonFiniteGradient& e) {
        refused[std::size_t(comm.rank())] = 2;
        if (comm.rank() == 1) CHECK(e.parameter() == "square");
      }
      unchanged[std::size_t(comm.rank())] = same_weights(model, before) && opt.step_count() == 1;
    });
    const int expected = policy == muon::NonFinitePolicy::skip ? 1 : 2;
    for (int r = 0; r < world; ++r) {
      CHECK(refused[std::size_t(r)] == expected);
      CHECK(unchanged[std::size_t(r)]);
    }
  }
}

TEST_CASE("telemetry: the ranks' entries together are the single-process optimizer's",
          "[sharded]") {
  muon::OptimizerOptions options;
  options.telemetry = true;
  for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
    for (int world : {1, 2, 3}) {
      INFO(muon::to_string(strategy) << " on " << world << " ranks");
      ShardedModel<double> reference;
      muon::Optimizer<muon::EigenBackend, double> single(sharded_options(), options);
      reference.register_with(single);
      reference.mean_gradients(world, 0);
      const auto expected = single.step().newton_schulz;
      REQUIRE(expected.size() == 5);  // the five Muon matrices
      std::vector<std::vector<muon::NewtonSchulzTelemetry>> got(static_cast<std::size_t>(world));
      muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
        ShardedModel<double> model;
        Sharded<double> opt(comm, strategy, sharded_options(), options);
        model.register_with(opt);
        model.local_gradients(comm.rank(), 0);
        got[static_cast<std::size_t>(comm.rank())] = opt.step().newton_schulz;
      });
      // zero1: every rank orthogonalizes every matrix; owner_compute: each its own, once.
      std::vector<int> seen(expected.size(), 0);
      for (const auto& entries : got)
        for (const auto& e : entries) {
          const auto it = std::find_if(expected.begin(), expected.end(),
                                       [&](const auto& x) { return x.param.value == e.param.value; });
          REQUIRE(it != expected.end());
          ++seen[static_cast<std::size_t>(it - expected.begin())];
          CHECK(e.residual == it->residual);
          CHECK(e.update_rms == it->update_rms);
          CHECK(e.steps == it->steps);
        }
      for (int n : seen) CHECK(n == (strategy == muon::ShardingStrategy::zero1 ? world : 1));
    }
  }
}

TEST_CASE("an overflowing momentum is refused on every rank and never applied", "[sharded]") {
  // As in the single-process test: sum-form momentum on gradients of 1e38 overflows float in
  // the Nesterov input at the third step. Every rank must report it, also under owner_compute
  // where only the owner orthogonalizes the matrix, and the other matrix must take the step.
  muon::GroupOptions g = sharded_options();
  g.muon.momentum_form = muon::MomentumForm::sum;
  for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
    for (int world : {1, 2, 3}) {
      INFO(muon::to_string(strategy) << " on " << world << " ranks");
      std::vector<std::string> errors(static_cast<std::size_t>(world));
      std::vector<RowMat<float>> w(static_cast<std::size_t>(world)), other(w);
      std::vector<char> kept(static_cast<std::size_t>(world), 0);
      muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        RowMat<float>& wr = w[r] = gaussian<float>(8, 24, 1);
        RowMat<float>& orr = other[r] = gaussian<float>(8, 8, 2);
        const RowMat<float> gw = RowMat<float>::Constant(8, 24, 1e38f);
        const RowMat<float> go = RowMat<float>::Constant(8, 8, 0.25f);
        muon::ShardedOptimizer<muon::EigenBackend, float, muon::ThreadCommunicator> opt(comm, strategy, g);
        opt.add_muon("huge", wr, gw);
        opt.add_muon("other", orr, go);
        opt.step();
        opt.step();
        const RowMat<float> w2 = wr, o2 = orr;
        try {
          opt.step();
        } catch (const muon::NonFiniteUpdate& e) {
          errors[r] = e.parameter();
        }
        kept[r] = wr.allFinite() && (wr.array() == w2.array()).all() &&
                  (orr.array() != o2.array()).any();
      });
      for (int r = 0; r < world; ++r) {
        INFO("rank " << r);
        CHECK(errors[static_cast<std::size_t>(r)] == "huge");
        CHECK(kept[static_cast<std::size_t>(r)]);
        CHECK(same_bits(w[static_cast<std::size_t>(r)], w[0]));
        CHECK(same_bits(other[static_cast<std::size_t>(r)], other[0]));
      }
    }
  }
}

TEST_CASE("ranks that registered different parameters are refused together", "[sharded]") {
  const int world = 2;
  std::vector<std::string> errors(world);
  muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
    ShardedModel<float> model;
    Sharded<float> opt(comm, muon::ShardingStrategy::owner_compute, sharded_options());
    model.register_with(opt);
    RowMat<float> extra = RowMat<float>::Ones(2, 2), g_extra = RowMat<float>::Ones(2, 2);
    if (comm.rank() == 1) opt.add_muon("extra", extra, g_extra);
    try {
      opt.step();
    } catch (const muon::InvalidArgument& e) {
      errors[std::size_t(comm.rank())] = e.what();
    }
  });
  for (const auto& e : errors) CHECK_THAT(e, Contains("registered different parameters"));
}

TEST_CASE("per-rank state saves and reloads bit-identically, a bad file stops every rank",
          "[sharded]") {
  for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
    const int world = 3;
    std::vector<std::string> saved(world);
    std::vector<ShardedModel<double>> resumed(world), uninterrupted(world), weights_at_2(world);
    // Uninterrupted: 4 steps. Interrupted: save after 2, reload into fresh optimizers, 2 more.
    muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
      const auto r = std::size_t(comm.rank());
      ShardedModel<double>& model = uninterrupted[r];
      Sharded<double> opt(comm, strategy, sharded_options());
      model.register_with(opt);
      for (int s = 0; s < 4; ++s) {
        if (s == 2) {
          std::ostringstream out;
          opt.save_state(out);
          saved[r] = out.str();
          weights_at_2[r] = model;
        }
        model.local_gradients(comm.rank(), s);
        opt.step();
      }
    });
    std::vector<std::string> errors(world);
    std::vector<char> untouched(world, 0);  // not vector<bool>: ranks write concurrently
    muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
      const auto r = std::size_t(comm.rank());
      ShardedModel<double>& model = resumed[r];
      for (std::size_t i = 0; i < model.w.size(); ++i) overwrite(model.w[i], weights_at_2[r].w[i]);
      Sharded<double> opt(comm, strategy, sharded_options());
      model.register_with(opt);
      // First a corrupted file on rank 2 only: every rank refuses and stays as it was.
      std::string bad = saved[r];
      if (r == 2) bad[bad.size() / 2] ^= 0x10;
      std::istringstream bad_in(bad);
      std::ostringstream before;
      opt.save_state(before);
      try {
        opt.load_state(bad_in);
      } catch (const muon::StateError& e) {
        errors[r] = e.what();
      }
      std::ostringstream after;
      opt.save_state(after);
      untouched[r] = after.str() == before.str();
      std::istringstream in(saved[r]);
      opt.load_state(in);
      for (int s = 2; s < 4; ++s) {
        model.local_gradients(comm.rank(), s);
        opt.step();
      }
    });
    INFO(muon::to_string(strategy));
    for (std::size_t r = 0; r < std::size_t(world); ++r) {
      CHECK(same_weights(resumed[r], uninterrupted[r]));
      CHECK(untouched[r]);
      CHECK_THAT(errors[r], Contains(r == 2 ? "checksum" : "refused on another rank"));
    }
  }
}

TEST_CASE("late registration keeps every state and AdamW step count, cleared gradients are "
          "skipped as by the single-process optimizer",
          "[sharded]") {
  const auto strategy = GENERATE(muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1);
  const int world = GENERATE(1, 2, 3);
  INFO(muon::to_string(strategy) << " on " << world << " ranks");
  ShardedModel<double> reference;
  muon::Optimizer<muon::EigenBackend, double> single(sharded_options());
  const auto expected = late_and_cleared(reference, single, [&](int s) { reference.mean_gradients(world, s); });
  CHECK(expected == std::vector<std::size_t>{6, 6, 8, 6, 8, 8});
  std::vector<ShardedModel<double>> models(static_cast<std::size_t>(world));
  std::vector<std::vector<std::size_t>> updated(static_cast<std::size_t>(world));
  muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
    const auto r = static_cast<std::size_t>(comm.rank());
    Sharded<double> opt(comm, strategy, sharded_options());
    updated[r] = late_and_cleared(models[r], opt, [&](int s) { models[r].local_gradients(comm.rank(), s); });
  });
  for (std::size_t r = 0; r < models.size(); ++r) {
    INFO("rank " << r);
    CHECK(updated[r] == expected);
    CHECK(same_weights(models[r], reference));
  }
}

TEST_CASE("ranks whose group options or cleared gradients differ are refused together",
          "[sharded]") {
  const int world = 3;
  for (const char* what : {"lr at construction", "lr set later", "cleared gradient"}) {
    INFO(what);
    std::vector<std::string> errors(world);
    std::vector<char> unchanged(world, 0);  // not vector<bool>: ranks write concurrently
    muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
      const bool odd = comm.rank() == 1;
      const std::string w(what);
      muon::GroupOptions options = sharded_options();
      if (odd && w == "lr at construction") options.muon.lr *= 2;
      ShardedModel<float> model;
      Sharded<float> opt(comm, muon::ShardingStrategy::zero1, options);
      model.register_with(opt);
      model.local_gradients(comm.rank(), 0);
      if (w != "lr at construction") opt.step();
      if (odd && w == "lr set later") {
        options.muon.lr *= 2;
        opt.set_group_options({}, options);
      }
      if (odd && w == "cleared gradient") opt.clear_grad(muon::ParamId{3});
      const ShardedModel<float> before = model;
      try {
        opt.step();
      } catch (const muon::InvalidArgument& e) {
        errors[std::size_t(comm.rank())] = e.what();
      }
      unchanged[std::size_t(comm.rank())] = same_weights(model, before);
    });
    for (int r = 0; r < world; ++r) {
      CHECK_THAT(errors[std::size_t(r)], Contains("group options"));
      CHECK(unchanged[std::size_t(r)]);
    }
  }
}

TEST_CASE("a rank that throws before a collective stops the others instead of hanging them",
          "[sharded]") {
  const auto run = [] {
    muon::ThreadGroup::run(3, [](muon::ThreadCommunicator comm) {
      ShardedModel<float> model;
      Sharded<float> opt(comm, muon::ShardingStrategy::owner_compute, sharded_options());
      model.register_with(opt);
      model.local_gradients(comm.rank(), 0);
      if (comm.rank() == 1) throw std::runtime_error("rank 1 failed before its step");
      for (int s = 0; s < 3; ++s) opt.step();  // blocked on rank 1 without the abort
    });
  };
  CHECK_THROWS_WITH(run(), Contains("rank 1 failed before its step"));
}

TEST_CASE("MasterWeights over the sharded optimizer equals it over the single-process one",
          "[sharded][master_weights]") {
  // bf16 gradients k/8 with |k| < 32: a sum over 2 ranks and its half are exact in bf16 and
  // float, so both runs see the same mean gradient bit for bit.
  using bf16 = Eigen::bfloat16;
  using Mat16 = RowMat<bf16>;
  const int world = 2, steps = 4;
  const auto gradient = [](int rank, int step, Eigen::Index rows, Eigen::Index cols, unsigned salt) {
    std::mt19937_64 rng(977u * static_cast<unsigned>(rank + 1) + 131u * static_cast<unsigned>(step) + salt);
    std::uniform_int_distribution<int> d(-31, 31);
    RowMat<float> g(rows, cols);
    for (Eigen::Index i = 0; i < g.size(); ++i) g.data()[i] = static_cast<float>(d(rng)) / 8.0f;
    return g;
  };
  const RowMat<float> w0 = initial_weight<float>({"w", true, 6, 10}, 0);
  const RowMat<float> b0 = initial_weight<float>({"b", false, 1, 10}, 1);
  // Reference: one process, the mean gradient.
  Mat16 w = w0.cast<bf16>(), b = b0.cast<bf16>(), gw(6, 10), gb(1, 10);
  muon::Optimizer<muon::EigenBackend, float> single(sharded_options());
  muon::MasterWeights<muon::EigenBackend, float, bf16> mixed(single);
  mixed.add_muon("w", muon::view(w), muon::view(std::as_const(gw)));
  mixed.add_adamw("b", muon::view(b), muon::view(std::as_const(gb)));
  for (int s = 0; s < steps; ++s) {
    gw = ((gradient(0, s, 6, 10, 1) + gradient(1, s, 6, 10, 1)) * 0.5f).cast<bf16>();
    gb = ((gradient(0, s, 1, 10, 2) + gradient(1, s, 1, 10, 2)) * 0.5f).cast<bf16>();
    mixed.step();
  }
  std::vector<Mat16> ws(world), bs(world);
  muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
    const auto r = std::size_t(comm.rank());
    ws[r] = w0.cast<bf16>();
    bs[r] = b0.cast<bf16>();
    Mat16 lw(6, 10), lb(1, 10);
    Sharded<float> opt(comm, muon::ShardingStrategy::zero1, sharded_options());
    muon::MasterWeights<muon::EigenBackend, float, bf16, Sharded<float>> rank_mixed(opt);
    rank_mixed.add_muon("w", muon::view(ws[r]), muon::view(std::as_const(lw)));
    rank_mixed.add_adamw("b", muon::view(bs[r]), muon::view(std::as_const(lb)));
    for (int s = 0; s < steps; ++s) {
      lw = gradient(comm.rank(), s, 6, 10, 1).cast<bf16>();
      lb = gradient(comm.rank(), s, 1, 10, 2).cast<bf16>();
      rank_mixed.step();
    }
  });
  for (std::size_t r = 0; r < std::size_t(world); ++r) {
    CHECK(same_bits(ws[r], w));
    CHECK(same_bits(bs[r], b));
  }
  CHECK((w.cast<float>() - w0).norm() > 1e-2f);  // the weights moved
}

namespace {

/// An expert stack (3 experts of 6 x 4), a fused QKV (rows 4 + 4 + 4 of 12 x 5), per-head
/// columns (6 x 9 as 3 x 3) and a bias, with the sharded model's exact-sum gradients.
template <class T>
struct FusedModel {
  const std::vector<Shape> shapes = {{"experts", true, 3, 24}, {"qkv", true, 12, 5},
                                     {"heads", true, 6, 9},    {"bias", false, 1, 5}};
  std::vector<RowMat<T>> w, g;
  FusedModel() {
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      w.push_back(initial_weight<T>(shapes[i], i));
      g.push_back(RowMat<T>::Zero(shapes[i].rows, shapes[i].cols));
    }
  }
  template <class Opt>
  void register_with(Opt& opt) {
    opt.add_muon("experts", w[0], g[0], muon::Experts{6});
    opt.add_muon("qkv", w[1], g[1], muon::Split{0, {4, 4, 4}});
    opt.add_muon("heads", w[2], g[2], muon::Split{1, {3, 3, 3}});
    opt.add_adamw("bias", w[3], g[3]);
  }
  void gradients(int world, int rank, int step) {  // rank < 0: the mean over the world
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      RowMat<T> sum = RowMat<T>::Zero(shapes[i].rows, shapes[i].cols);
      for (int r = 0; r < world; ++r)
        if (rank < 0 || r == rank) sum += dyadic_gradient<T>(shapes[i], r, step, i);
      if (rank < 0 && world > 1) sum *= T(1) / static_cast<T>(world);
      overwrite(g[i], sum);
    }
  }
};

}  // namespace

TEMPLATE_TEST_CASE("expert stacks and split matrices shard bit for bit", "[sharded]", float,
                   double) {
  for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
    for (int world : {1, 2, 3, 4}) {
      INFO(muon::to_string(strategy) << " on " << world << " ranks");
      FusedModel<TestType> reference;
      muon::Optimizer<muon::EigenBackend, TestType> single(sharded_options());
      reference.register_with(single);
      for (int s = 0; s < 3; ++s) {
        reference.gradients(world, -1, s);
        single.step();
      }
      std::vector<FusedModel<TestType>> ranks(static_cast<std::size_t>(world));
      muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
        FusedModel<TestType>& model = ranks[static_cast<std::size_t>(comm.rank())];
        Sharded<TestType> opt(comm, strategy, sharded_options());
        model.register_with(opt);
        for (int s = 0; s < 3; ++s) {
          model.gradients(world, comm.rank(), s);
          opt.step();
        }
      });
      for (int r = 0; r < world; ++r)
        for (std::size_t i = 0; i < reference.w.size(); ++i) {
          INFO("rank " << r << ", " << reference.shapes[i].name);
          CHECK(same_bits(ranks[static_cast<std::size_t>(r)].w[i], reference.w[i]));
        }
    }
  }
}

TEST_CASE("a step before any registration does nothing on every rank and strategy",
          "[sharded]") {
  // Found by the API property test: owner_compute's status words had no room in an empty
  // layout, and the first step wrote before its segment.
  for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
    std::vector<std::size_t> updated(3, 1);
    muon::ThreadGroup::run(3, [&](muon::ThreadCommunicator comm) {
      Sharded<double> opt(comm, strategy, sharded_options());
      updated[static_cast<std::size_t>(comm.rank())] = opt.step().updated;
      ShardedModel<double> model;  // and registering afterwards works as ever
      model.register_with(opt);
      model.local_gradients(comm.rank(), 0);
      opt.step();
    });
    for (std::size_t u : updated) CHECK(u == 0);
  }
}

TEST_CASE("a sharded state file written by an independent writer loads and saves the same bytes",
          "[sharded][state]") {
  // tests/fuzz/make_corpus.py writes valid_sharded.bin from the documented layout in Python:
  // rank 0 of 1, owner_compute, steps 5, muon 'w' 3x2 and adamw 'b' 1x4 (7 AdamW steps).
  const std::string bytes = read_bytes(golden_path("../fuzz/corpus/state/valid_sharded.bin"));
  REQUIRE(!bytes.empty());
  std::string saved;
  std::uint64_t steps = 0;
  muon::ThreadGroup::run(1, [&](muon::ThreadCommunicator comm) {
    Mat<double> w = Mat<double>::Zero(3, 2), gw = Mat<double>::Zero(3, 2);
    Mat<double> b = Mat<double>::Zero(1, 4), gb = Mat<double>::Zero(1, 4);
    Sharded<double> opt(comm, muon::ShardingStrategy::owner_compute);
    opt.add_muon("w", w, gw);
    opt.add_adamw("b", b, gb);
    std::istringstream in(bytes);
    opt.load_state(in);
    steps = opt.step_count();
    std::ostringstream out;
    opt.save_state(out);
    saved = out.str();
  });
  CHECK(steps == 5);
  CHECK(saved == bytes);
}

// ---- every rule of muon::rules::All ------------------------------------------------------
// The contract each rule, present and future, keeps with the driver, the placements, the state
// files and MasterWeights: run here for every entry of the list (a new rule is tested by being
// listed). Its own mathematics is checked against its reference in test_golden.cpp.
namespace {

/// Every rule's options away from their defaults where that moves the weights visibly.
muon::GroupOptions every_rule_options() {
  muon::GroupOptions g = sharded_options();
  g.lion.lr = 0.003;
  g.lion.weight_decay = 0.1;
  // NorMuon's state per column of a wide matrix (dion's per row is NorMuon's default, checked
  // in test_golden.cpp)
  g.normuon.convention = muon::NorMuonConvention::emerging_optimizers;
  return g;
}

/// Registers the model's parameters that `Rule` takes: an orthogonalizing rule its matrices
/// (with `layouts`, "conv" as six experts of 3 x 4 and "square" split into column blocks of 3
/// and 5, so that zero1 slices at matrix boundaries and state per matrix has several matrices),
/// an elementwise rule every shape.
template <class Rule, class T, class Opt>
void register_rule(ShardedModel<T>& model, Opt& opt, bool layouts = true) {
  const auto& shapes = sharded_shapes();
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const std::string& name = shapes[i].name;
    if constexpr (Rule::orthogonalizes) {
      if (layouts && name == "conv")
        opt.add(Rule{}, name, model.w[i], model.g[i], muon::Experts{3});
      else if (layouts && name == "square")
        opt.add(Rule{}, name, model.w[i], model.g[i], muon::Split{1, {3, 5}});
      else if (shapes[i].muon)
        opt.add(Rule{}, name, model.w[i], model.g[i]);
    } else {
      opt.add(Rule{}, name, model.w[i], model.g[i]);
    }
  }
}

template <class Opt>
std::string state_bytes(Opt& opt) {
  std::ostringstream out;
  opt.save_state(out);
  return out.str();
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("every rule: sharded equals single-process bit for bit at 1-4 ranks",
                        "[sharded][rules]", muon::rules::All::types) {
  using Rule = TestType;
  for (const auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1})
    for (int world = 1; world <= 4; ++world) {
      INFO(Rule::name << ", " << muon::to_string(strategy) << " on " << world << " ranks");
      ShardedModel<float> reference;
      muon::Optimizer<muon::EigenBackend, float> single(every_rule_options());
      register_rule<Rule>(reference, single);
      for (int s = 0; s < 3; ++s) {
        reference.mean_gradients(world, s);
        single.step();
      }
      std::vector<ShardedModel<float>> ranks(static_cast<std::size_t>(world));
      muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
        ShardedModel<float>& model = ranks[static_cast<std::size_t>(comm.rank())];
        Sharded<float> opt(comm, strategy, every_rule_options());
        register_rule<Rule>(model, opt);
        for (int s = 0; s < 3; ++s) {
          model.local_gradients(comm.rank(), s);
          opt.step();
        }
      });
      for (const auto& model : ranks) CHECK(same_weights(model, reference));
      CHECK(!same_weights(reference, ShardedModel<float>()));  // the weights moved
    }
}

TEMPLATE_LIST_TEST_CASE("every rule: a saved state resumes bit for bit, a refused step changes "
                        "nothing, MasterWeights equals its masters' optimizer",
                        "[rules][state][master_weights]", muon::rules::All::types) {
  using Rule = TestType;
  const auto run = [](ShardedModel<float>& model, muon::Optimizer<muon::EigenBackend, float>& opt,
                      int from, int to) {
    for (int s = from; s < to; ++s) {
      model.local_gradients(0, s);
      opt.step();
    }
  };
  // Resumed: steps 0-1, saved, loaded into a fresh optimizer over copies, steps 2-3 on both.
  ShardedModel<float> a;
  muon::Optimizer<muon::EigenBackend, float> opt_a(every_rule_options());
  register_rule<Rule>(a, opt_a);
  run(a, opt_a, 0, 2);
  const std::string saved = state_bytes(opt_a);
  ShardedModel<float> b;
  for (std::size_t i = 0; i < a.w.size(); ++i) overwrite(b.w[i], a.w[i]);
  muon::Optimizer<muon::EigenBackend, float> opt_b(every_rule_options());
  register_rule<Rule>(b, opt_b);
  std::istringstream in(saved);
  opt_b.load_state(in);
  CHECK(state_bytes(opt_b) == saved);
  run(a, opt_a, 2, 4);
  run(b, opt_b, 2, 4);
  CHECK(same_weights(a, b));
  CHECK(state_bytes(opt_a) == state_bytes(opt_b));

  // Refused: a NaN in the last parameter's gradient; weights and state stay as they were.
  const ShardedModel<float> before = a;
  const std::string state_before = state_bytes(opt_a);
  a.local_gradients(0, 4);
  a.g.back()(0, 0) = std::numeric_limits<float>::quiet_NaN();
  if (Rule::orthogonalizes) a.g[4](0, 0) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(opt_a.step(), muon::NonFiniteGradient);
  CHECK(same_weights(a, before));
  CHECK(state_bytes(opt_a) == state_before);

  // MasterWeights over bf16 parameters: the masters follow the float optimizer on the
  // widened bf16 values and gradients, and the parameters are the masters rounded.
  using bf16 = Eigen::bfloat16;
  const auto& shapes = sharded_shapes();
  std::vector<RowMat<bf16>> w16, g16;
  ShardedModel<float> wide;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    w16.push_back(initial_weight<float>(shapes[i], i).cast<bf16>());
    g16.push_back(RowMat<bf16>::Zero(shapes[i].rows, shapes[i].cols));
    overwrite(wide.w[i], w16[i].cast<float>());
  }
  muon::Optimizer<muon::EigenBackend, float> masters(every_rule_options()), plain(every_rule_options());
  muon::MasterWeights<muon::EigenBackend, float, bf16> mixed(masters);
  for (std::size_t i = 0; i < shapes.size(); ++i)
    if (shapes[i].muon || !Rule::orthogonalizes)
      mixed.add(Rule{}, shapes[i].name, muon::view(w16[i]), muon::view(std::as_const(g16[i])));
  register_rule<Rule>(wide, plain, false);  // MasterWeights takes plain matrices
  for (int s = 0; s < 3; ++s) {
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      g16[i] = dyadic_gradient<float>(shapes[i], 0, s, i).cast<bf16>();
      overwrite(wide.g[i], g16[i].cast<float>());
    }
    mixed.step();
    plain.step();
  }
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    INFO(shapes[i].name);
    CHECK(same_bits(w16[i], RowMat<bf16>(wide.w[i].cast<bf16>())));
  }
  CHECK(state_bytes(masters) == state_bytes(plain));
}

TEST_CASE("QK-clip on the sharded placement takes the largest logit over the ranks and leaves "
          "every replica equal to the single-process result", "[sharded][qk_clip]") {
  const int dh = 4, heads = 3;
  const Mat<float> w0 = gaussian<float>(3 * heads * dh, 10, 1), g = gaussian<float>(3 * heads * dh, 10, 2);
  const auto heads_of = muon::AttentionHeads::contiguous(heads, dh, 0, heads * dh);
  const auto logits = [](int rank) {  // rank r's maxima; the largest over the ranks is the last's
    return std::vector<double>{30.0 + rank, 5.0, 120.0 + 3 * rank};
  };
  for (const auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
    for (int world : {1, 2, 4}) {  // the average of equal gradients is exact at these sizes
      INFO(muon::to_string(strategy) << " on " << world << " ranks");
      Mat<float> reference = w0;
      muon::Optimizer<muon::EigenBackend, float> single;
      const auto id = single.add_muon("qkv", reference, g);
      single.step();
      const auto c = single.add_qk_clip(id, id, heads_of, {25.0});
      const std::vector<double> largest = logits(world - 1);
      const muon::QkClipReport expected = single.clip_qk(c, std::span<const double>(largest));
      REQUIRE(expected.clipped == 2);

      std::vector<Mat<float>> replicas(static_cast<std::size_t>(world), w0);
      std::vector<muon::QkClipReport> reports(static_cast<std::size_t>(world));
      std::vector<char> refused(static_cast<std::size_t>(world), 0);  // refused, nothing moved
      std::vector<char> differ(static_cast<std::size_t>(world), 0);
      muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
        Mat<float>& w = replicas[static_cast<std::size_t>(comm.rank())];
        Sharded<float> opt(comm, strategy);
        const auto pid = opt.add_muon("qkv", w, g);
        opt.step();
        const auto clip = opt.add_qk_clip(pid, pid, heads_of, {25.0});
        const std::vector<double> mine = logits(comm.rank());
        reports[static_cast<std::size_t>(comm.rank())] = opt.clip_qk(clip, std::span<const double>(mine));
        // A NaN on one rank is refused on every rank, and nothing moves.
        std::vector<double> bad = mine;
        if (comm.rank() == world - 1) bad[1] = std::nan("");
        const Mat<float> before = w;
        try {
          opt.clip_qk(clip, std::span<const double>(bad));
        } catch (const muon::InvalidArgument&) {
          refused[static_cast<std::size_t>(comm.rank())] = same_bits(w, before);
        }
        // Clips registered differently (here the threshold) are refused on every rank.
        if (comm.size() == 1) return;
        const auto odd = opt.add_qk_clip(pid, pid, heads_of, {25.0 + comm.rank()});
        try {
          opt.clip_qk(odd, std::span<const double>(mine));
        } catch (const muon::InvalidArgument& e) {
          differ[static_cast<std::size_t>(comm.rank())] =
              std::string(e.what()).find("different QK-clips") != std::string::npos && same_bits(w, before);
        }
      });
      for (int r = 0; r < world; ++r) {
        CHECK(same_bits(replicas[static_cast<std::size_t>(r)], reference));
        CHECK(reports[static_cast<std::size_t>(r)].clipped == expected.clipped);
        CHECK(reports[static_cast<std::size_t>(r)].max_logit == expected.max_logit);
        CHECK(refused[static_cast<std::size_t>(r)] == 1);
        if (world > 1) CHECK(differ[static_cast<std::size_t>(r)] == 1);
      }
    }
  }
}
