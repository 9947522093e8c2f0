// libFuzzer harness for the stateful API model (tests/api_model.hpp): the input's first byte
// picks the non-finite policy, and every following group of bytes one call (registration,
// gradients, step, options, save and load, or the fork of a resumed twin). Any promise of the
// model that does not hold aborts with what failed.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "api_model.hpp"

using namespace muon_test::api;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  std::size_t at = 1;
  const auto next = [&]() -> std::uint64_t { return at < size ? data[at++] : 0; };
  const auto policy = static_cast<muon::NonFinitePolicy>(data[0] % 3);
  muon::OptimizerOptions o;
  o.non_finite = policy;
  World<Single> world(std::make_unique<Single>(muon_test::sharded_options(), o), policy, 0);
  world.opt->add_group(group1());
  std::unique_ptr<World<Single>> twin;
  for (int n = 0; at < size && n < 64; ++n) {
    apply_with_twin(world, twin, make_call(next, 1), n);
    for (const World<Single>* w : {&world, twin.get()})
      if (w != nullptr && !w->failures.empty()) {
        std::fprintf(stderr, "fuzz_api: %s\n", w->failures.front().c_str());
        std::abort();
      }
  }
  return 0;
}
