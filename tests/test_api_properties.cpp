// Stateful property test of the API: random sequences of registrations (valid and refused),
// set_grad / clear_grad, gradients with NaN or Inf, step() under each non-finite policy,
// set_group_options (valid and refused) and save_state / load_state (valid, corrupted,
// truncated, foreign), run against the model of api_model.hpp after every call:
//   - a refused call changes nothing: the weights and the saved state are the same bytes;
//   - a parameter without a gradient never changes in a step;
//   - under error and skip no NaN or Inf is ever written into a weight;
//   - a run resumed from a save (a fresh optimizer, registered alike, loading the state) takes
//     every later call to the same bits as the uninterrupted one.
// On muon::Optimizer and on ShardedOptimizer over threads (every rank makes the same calls on
// its own gradients; the resumed twin only for the single process, whose twin needs no second
// group of ranks). CI runs a few sequences; MUON_PROPERTY_SEQUENCES asks for more, and the
// fuzzer fuzz_api drives the same model from its inputs.
#include <catch2/catch.hpp>
#include <random>

#include "api_model.hpp"

using namespace muon_test;
using namespace muon_test::api;

namespace {
constexpr int kCalls = 40;
}  // namespace

TEST_CASE("random API call sequences keep the optimizer's promises (single process)",
          "[properties]") {
  const auto policy = GENERATE(muon::NonFinitePolicy::error, muon::NonFinitePolicy::skip,
                               muon::NonFinitePolicy::unchecked);
  World<Single>::Counts total;
  int twins = 0;
  for (int seq = 0; seq < sequences(50); ++seq) {
    INFO("policy " << static_cast<int>(policy) << ", sequence " << seq);
    std::mt19937_64 rng(static_cast<std::uint64_t>(seq) * 31 + static_cast<std::uint64_t>(policy));
    muon::OptimizerOptions o;
    o.non_finite = policy;
    World<Single> world(std::make_unique<Single>(sharded_options(), o), policy, 0);
    world.opt->add_group(group1());
    std::unique_ptr<World<Single>> twin;
    for (int n = 0; n < kCalls; ++n) {
      apply_with_twin(world, twin, make_call(rng, 1), n);
      for (const auto* w : {&world, twin.get()})
        if (w != nullptr)
          for (const std::string& f : w->failures) FAIL_CHECK(f);
      REQUIRE(world.failures.empty());
      REQUIRE((!twin || twin->failures.empty()));
    }
    total.steps += world.counts.steps;
    total.refused_steps += world.counts.refused_steps;
    total.refusals += world.counts.refusals;
    total.loads += world.counts.loads;
    twins += twin ? 1 : 0;
  }
  // The sequences did more than refuse: steps taken and refused, refusals, loads, twins.
  CHECK(total.steps > 20);
  CHECK(total.refusals > 20);
  CHECK(total.loads > 0);
  CHECK(twins > 2);
  if (policy != muon::NonFinitePolicy::unchecked) CHECK(total.refused_steps > 0);
}

TEST_CASE("random API call sequences keep the optimizer's promises (sharded, threads)",
          "[properties][sharded]") {
  const auto policy = GENERATE(muon::NonFinitePolicy::error, muon::NonFinitePolicy::skip,
                               muon::NonFinitePolicy::unchecked);
  const auto strategy = GENERATE(muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1);
  const int ranks = GENERATE(1, 3);
  for (int seq = 0; seq < sequences(8); ++seq) {
    INFO("policy " << static_cast<int>(policy) << ", " << muon::to_string(strategy) << " on "
                   << ranks << " ranks, sequence " << seq);
    std::mt19937_64 rng(static_cast<std::uint64_t>(seq) * 131 + static_cast<std::uint64_t>(policy));
    std::vector<Call> calls;
    for (int n = 0; n < kCalls; ++n) calls.push_back(make_call(rng, ranks));
    std::vector<std::vector<std::string>> failures(static_cast<std::size_t>(ranks));
    muon::ThreadGroup::run(ranks, [&](muon::ThreadCommunicator comm) {
      muon::OptimizerOptions o;
      o.non_finite = policy;
      World<Sharded> world(std::make_unique<Sharded>(comm, strategy, sharded_options(), o), policy,
                           comm.rank());
      world.opt->add_group(group1());
      world.bad_anywhere = [&] {
        return comm.all_reduce_max(std::uint64_t{world.any_bad_gradient() ? 1u : 0u}) != 0;
      };
      for (std::size_t n = 0; n < calls.size(); ++n) world.apply(calls[n], static_cast<int>(n));
      failures[static_cast<std::size_t>(comm.rank())] = world.failures;
    });
    for (const auto& rank : failures)
      for (const std::string& f : rank) FAIL_CHECK(f);
  }
}
