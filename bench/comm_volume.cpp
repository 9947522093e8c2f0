// Bytes each rank sends and receives per step, and optimizer-state bytes per rank, for the
// GPT-2-small parameter set under each sharding strategy, against ZeRO-1 AdamW (every
// parameter on AdamW, zero1 sharding) at the same world size. Ranks are threads of this
// process (ThreadCommunicator); volumes are counted with the ring algorithms' formulas
// (CountingCommunicator), so they are what NCCL or MPI would move for the same collectives.
//
//   comm_volume [world sizes...]        (default: 2 4 8)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "muon/distributed/thread_communicator.hpp"
#include "muon/distributed/sharded_optimizer.hpp"
#include "muon/eigen.hpp"

namespace {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Counted = muon::CountingCommunicator<muon::ThreadCommunicator>;
using Sharded = muon::ShardedOptimizer<muon::EigenBackend, float, Counted>;

struct Param {
  Mat w, g;
  bool muon;
};

/// GPT-2 small: 12 blocks of {768x2304, 768x768, 768x3072, 3072x768} on Muon; AdamW on the
/// blocks' vectors and the 50257 x 768 embedding (tied head).
std::vector<Param> gpt2_small(bool all_adamw) {
  std::vector<Param> ps;
  for (int b = 0; b < 12; ++b) {
    for (auto [r, c] : {std::pair{768, 2304}, {768, 768}, {768, 3072}, {3072, 768}})
      ps.push_back({Mat::Constant(r, c, 0.01f), Mat::Constant(r, c, 0.001f), !all_adamw});
    for (int len : {768, 768, 2304, 768, 768, 768, 3072, 768})
      ps.push_back({Mat::Constant(1, len, 0.01f), Mat::Constant(1, len, 0.001f), false});
  }
  ps.push_back({Mat::Constant(50257, 768, 0.01f), Mat::Constant(50257, 768, 0.001f), false});
  return ps;
}

struct Row {
  muon::CommVolume volume;
  std::size_t state = 0, buffers = 0;
};

Row measure(int world, muon::ShardingStrategy strategy, bool all_adamw) {
  std::vector<Row> rows(static_cast<std::size_t>(world));
  muon::ThreadGroup::run(world, [&](muon::ThreadCommunicator comm) {
    auto params = gpt2_small(all_adamw);
    Sharded opt(Counted(comm), strategy);
    for (std::size_t i = 0; i < params.size(); ++i) {
      const std::string name = "p" + std::to_string(i);
      if (params[i].muon)
        opt.add_muon(name, params[i].w, params[i].g);
      else
        opt.add_adamw(name, params[i].w, params[i].g);
    }
    opt.step();
    Row& row = rows[static_cast<std::size_t>(comm.rank())];
    row.volume = opt.communicator().volume();
    row.state = opt.state_bytes();
    row.buffers = opt.buffer_bytes();
  });
  Row worst;  // the busiest rank
  for (const Row& r : rows) {
    worst.volume.sent = std::max(worst.volume.sent, r.volume.sent);
    worst.volume.received = std::max(worst.volume.received, r.volume.received);
    worst.state = std::max(worst.state, r.state);
    worst.buffers = std::max(worst.buffers, r.buffers);
  }
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> worlds;
  for (int i = 1; i < argc; ++i) worlds.push_back(std::atoi(argv[i]));
  if (worlds.empty()) worlds = {2, 4, 8};
  // Single-process state: Muon one buffer per matrix, AdamW two.
  std::size_t single = 0;
  for (const Param& p : gpt2_small(false)) single += std::size_t(p.w.size()) * (p.muon ? 1 : 2) * 4;
  std::printf("GPT-2 small, float32, busiest rank per step. Single-process optimizer state: %.1f MB\n",
              single / 1e6);
  std::printf("%5s  %-22s %10s %10s %9s %11s %10s %12s\n", "ranks", "strategy", "sent MB",
              "recv MB", "vs AdamW", "state MB", "x(1/N)", "buffers MB");
  for (int world : worlds) {
    const Row adamw = measure(world, muon::ShardingStrategy::zero1, true);
    const double adamw_single = [] {
      std::size_t n = 0;
      for (const Param& p : gpt2_small(true)) n += std::size_t(p.w.size()) * 2 * 4;
      return double(n);
    }();
    std::printf("%5d  %-22s %10.1f %10.1f %9.3f %11.1f %10.3f %12.1f\n", world, "zero1 AdamW (baseline)",
                adamw.volume.sent / 1e6, adamw.volume.received / 1e6, 1.0, adamw.state / 1e6,
                adamw.state / (adamw_single / world), adamw.buffers / 1e6);
    for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
      const Row r = measure(world, strategy, false);
      std::printf("%5d  %-22s %10.1f %10.1f %9.3f %11.1f %10.3f %12.1f\n", world,
                  (std::string(muon::to_string(strategy)) + " Muon").c_str(), r.volume.sent / 1e6,
                  r.volume.received / 1e6, double(r.volume.sent) / double(adamw.volume.sent),
                  r.state / 1e6, r.state / (double(single) / world), r.buffers / 1e6);
    }
  }
  return 0;
}
