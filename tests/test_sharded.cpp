// ShardedOptimizer on the in-process thread communicator: results equal the single-process
// optimizer, every rank agrees, state is sharded, bad input is refused on every rank together.
// The same checks run under MPI in tests/mpi/sharded_mpi.cpp.
#include <catch2/catch.hpp>
#include <cstring>
#include <limits>
#include <sstream>

#include "muon/distributed/thread_communicator.hpp"
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

template <class T>
bool bitwise_equal(const ShardedModel<T>& a, const ShardedModel<T>& b) {
  for (std::size_t i = 0; i < a.w.size(); ++i)
    if (a.w[i].size() != b.w[i].size() ||
        std::memcmp(a.w[i].data(), b.w[i].data(), sizeof(T) * a.w[i].size()) != 0)
      return false;
  return true;
}

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
    CHECK(bitwise_equal(ranks[static_cast<std::size_t>(r)], ranks[0]));  // ranks agree exactly
    CHECK(bitwise_equal(ranks[static_cast<std::size_t>(r)], reference));
  }
  // The weights moved: the comparison above is not between two untouched copies.
  CHECK(!bitwise_equal(reference, ShardedModel<TestType>()));
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
      unchanged[std::size_t(comm.rank())] = bitwise_equal(model, before) && opt.step_count() == 1;
    });
    const int expected = policy == muon::NonFinitePolicy::skip ? 1 : 2;
    for (int r = 0; r < world; ++r) {
      CHECK(refused[std::size_t(r)] == expected);
      CHECK(unchanged[std::size_t(r)]);
    }
  }
}

TEST_CASE("telemetry is refused by the sharded optimizer, naming the option", "[sharded]") {
  muon::OptimizerOptions options;
  options.telemetry = true;
  muon::ThreadGroup::run(1, [&](muon::ThreadCommunicator comm) {
    CHECK_THROWS_WITH(Sharded<float>(comm, muon::ShardingStrategy::zero1, sharded_options(), options),
                      Catch::Matchers::Contains("telemetry"));
  });
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

TEST_CASE("per-rank state saves and reloads bit-identically; a bad file stops every rank",
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
      CHECK(bitwise_equal(resumed[r], uninterrupted[r]));
      CHECK(untouched[r]);
      CHECK_THAT(errors[r], Contains(r == 2 ? "checksum" : "refused on another rank"));
    }
  }
}
