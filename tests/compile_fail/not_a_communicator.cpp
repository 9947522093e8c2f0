// A communicator without the collectives of the muon::Communicator concept is refused by name.
// With -DMUON_COMPILE_FAIL_CONTROL the same program uses SingleProcessCommunicator.
#include "muon/distributed/sharded_optimizer.hpp"
#include "muon/adapters/eigen.hpp"  // not muon/eigen.hpp: its SVD tools add ~25 s a compile
#include "muon/backend/eigen.hpp"
#include "muon/optimizer.hpp"

struct RankOnly {  // knows its rank and size, but has no all-gather, reduce-scatter, ...
  using memory_space = muon::HostSpace;
  [[nodiscard]] int rank() const { return 0; }
  [[nodiscard]] int size() const { return 1; }
};

#ifdef MUON_COMPILE_FAIL_CONTROL
using Comm = muon::SingleProcessCommunicator<>;
#else
using Comm = RankOnly;
#endif

int main() {
  muon::ShardedOptimizer<muon::EigenBackend, float, Comm> opt(Comm{},
                                                               muon::ShardingStrategy::zero1);
  return static_cast<int>(opt.num_params());
}
