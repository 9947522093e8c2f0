// Data-parallel training with muon::ShardedOptimizer over MPI: the quickstart's MLP on 512
// teacher samples per step, split evenly over the ranks. Each rank computes gradients on its
// share; step() averages them, shards the optimizer state and keeps the weights identical on
// every rank (checked at the end: the ranks' weights are compared bit for bit). The loss curve
// is the same at any world size that divides 512 up to the rounding of the gradient average,
// which differs with the world size and which training amplifies near the loss floor:
//
//   mpiexec -n 4 ./build/examples/distributed_mpi            (zero1, the default)
//   mpiexec -n 1 ./build/examples/distributed_mpi owner_compute
#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include <muon/distributed/mpi.hpp>
#include <muon/distributed/sharded_optimizer.hpp>

#include "mlp.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  muon::MpiCommunicator comm(MPI_COMM_WORLD);
  const auto strategy = argc > 1 && std::strcmp(argv[1], "owner_compute") == 0
                            ? muon::ShardingStrategy::owner_compute
                            : muon::ShardingStrategy::zero1;
  const int batch = 512;
  if (batch % comm.size() != 0) {
    if (comm.rank() == 0) std::fprintf(stderr, "the world size must divide %d\n", batch);
    MPI_Finalize();
    return 1;
  }
  // double: the world sizes then differ only in the rounding of the gradient average, far
  // below the 5 digits printed (in float, 300 steps amplify it into the 3rd digit).
  using Matrix = Mlp<double>::Matrix;
  Matrix x, y;
  teacher_data<double>(batch, x, y);
  const int share = batch / comm.size();  // this rank's columns of the global batch
  const Matrix local_x = x.middleCols(comm.rank() * share, share);
  const Matrix local_y = y.middleCols(comm.rank() * share, share);

  auto model = Mlp<double>::quickstart(3);  // the same initial weights on every rank
  muon::GroupOptions options;
  options.muon.lr = 0.02;
  options.muon.weight_decay = 0.01;
  options.adamw.lr = 3e-3;
  muon::ShardedOptimizer<muon::EigenBackend, double, muon::MpiCommunicator> opt(comm, strategy,
                                                                              options);
  for (int l = 0; l < 3; ++l) {
    opt.add_muon("w" + std::to_string(l), model.w[l], model.gw[l]);
    opt.add_adamw("b" + std::to_string(l), model.b[l], model.gb[l]);
  }
  const std::size_t state = opt.state_bytes();
  if (comm.rank() == 0)
    std::printf("%d ranks, %s; optimizer state per rank: %zu bytes\nstep   loss\n", comm.size(),
                muon::to_string(strategy), state);
  for (int step = 0; step <= 300; ++step) {
    // The global loss is the mean of the ranks' local means (equal shares).
    double loss = model.loss_and_gradients(local_x, local_y) / comm.size();
    MPI_Allreduce(MPI_IN_PLACE, &loss, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    if (step % 50 == 0 && comm.rank() == 0) std::printf("%4d   %.5g\n", step, loss);
    // Linear decay to zero, on every rank alike.
    options.muon.lr = 0.02 * (1 - step / 300.0);
    options.adamw.lr = 3e-3 * (1 - step / 300.0);
    opt.set_group_options({}, options);
    opt.step();
  }
  // The replicas must not drift apart: every rank holds the same bits.
  std::uint64_t hash = 1469598103934665603ULL;  // FNV-1a over the weights' bytes
  const auto add = [&hash](const double* data, Eigen::Index size) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < sizeof(double) * static_cast<std::size_t>(size); ++i)
      hash = (hash ^ bytes[i]) * 1099511628211ULL;
  };
  for (int l = 0; l < 3; ++l) {
    add(model.w[l].data(), model.w[l].size());
    add(model.b[l].data(), model.b[l].size());
  }
  std::vector<std::uint64_t> hashes(static_cast<std::size_t>(comm.size()));
  MPI_Allgather(&hash, 1, MPI_UINT64_T, hashes.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD);
  bool same = true;
  for (std::uint64_t h : hashes) same = same && h == hashes[0];
  if (comm.rank() == 0)
    std::printf("weights bit-identical on all %d ranks: %s\n", comm.size(), same ? "yes" : "NO");
  MPI_Finalize();
  return 0;
}
