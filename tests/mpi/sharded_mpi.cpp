// ShardedOptimizer over MPI (run by ctest under mpiexec with 1-4 processes): every rank's
// weights equal the single-process optimizer's bit for bit (also with late registration and
// cleared gradients), a NaN or differing group options on one rank are refused on all, and
// per-rank state reloads bit-identically. Exits 0 on every rank or 1 on every rank.
#include <mpi.h>

#include <cstdio>
#include <limits>
#include <sstream>

#include "muon/distributed/mpi.hpp"
#include "sharded_model.hpp"

namespace {

int failures = 0;
void expect(bool ok, const char* what, int rank) {
  if (!ok) {
    std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, what);
    ++failures;
  }
}

template <class T>
void check(muon::ShardingStrategy strategy) {
  using Opt = muon::ShardedOptimizer<muon::EigenBackend, T, muon::MpiCommunicator>;
  muon::MpiCommunicator comm(MPI_COMM_WORLD);
  const int rank = comm.rank(), world = comm.size();
  const auto reference = muon_test::single_process_reference<T>(world, 4);

  // 4 steps, saving after 2.
  muon_test::ShardedModel<T> model;
  Opt opt(comm, strategy, muon_test::sharded_options());
  model.register_with(opt);
  std::string state;
  muon_test::ShardedModel<T> at_2;
  for (int s = 0; s < 4; ++s) {
    if (s == 2) {
      std::ostringstream out;
      opt.save_state(out);
      state = out.str();
      at_2 = model;
    }
    model.local_gradients(rank, s);
    opt.step();
  }
  expect(muon_test::same_weights(model, reference), "weights equal the single-process optimizer's", rank);

  // Resume from the saved state in a fresh optimizer.
  muon_test::ShardedModel<T> resumed;
  for (std::size_t i = 0; i < resumed.w.size(); ++i) muon_test::overwrite(resumed.w[i], at_2.w[i]);
  Opt again(comm, strategy, muon_test::sharded_options());
  resumed.register_with(again);
  std::istringstream in(state);
  again.load_state(in);
  for (int s = 2; s < 4; ++s) {
    resumed.local_gradients(rank, s);
    again.step();
  }
  expect(muon_test::same_weights(resumed, model), "resumed run equals the uninterrupted one bit for bit", rank);

  // A NaN on the last rank: every rank refuses, nothing changes.
  const muon_test::ShardedModel<T> before = resumed;
  resumed.local_gradients(rank, 4);
  if (rank == world - 1) resumed.g[0](0, 0) = std::numeric_limits<T>::infinity();
  bool refused = false;
  try {
    again.step();
  } catch (const muon::NonFiniteGradient&) {
    refused = true;
  }
  expect(refused, "a non-finite gradient on one rank is refused on every rank", rank);
  expect(muon_test::same_weights(resumed, before) && again.step_count() == 4, "a refused step changes nothing", rank);

  // Parameters registered after two steps, gradients cleared for one: as the single process.
  muon_test::ShardedModel<T> single_model, late;
  muon::Optimizer<muon::EigenBackend, T> single(muon_test::sharded_options());
  const auto want = muon_test::late_and_cleared(
      single_model, single, [&](int s) { single_model.mean_gradients(world, s); });
  Opt late_opt(comm, strategy, muon_test::sharded_options());
  const auto got = muon_test::late_and_cleared(late, late_opt, [&](int s) { late.local_gradients(rank, s); });
  expect(got == want && muon_test::same_weights(late, single_model),
         "late registration and cleared gradients give the single-process result", rank);

  // Group options that differ on the last rank: refused on every rank, nothing changed.
  muon::GroupOptions odd = muon_test::sharded_options();
  if (rank == world - 1 && world > 1) odd.muon.lr *= 2;
  muon_test::ShardedModel<T> differing;
  Opt differing_opt(comm, strategy, odd);
  differing.register_with(differing_opt);
  differing.local_gradients(rank, 0);
  const muon_test::ShardedModel<T> untouched = differing;
  bool options_refused = false;
  try {
    differing_opt.step();
  } catch (const muon::InvalidArgument&) {
    options_refused = true;
  }
  expect(options_refused == (world > 1) && (world > 1) == muon_test::same_weights(differing, untouched),
         "ranks whose group options differ are refused together", rank);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  for (auto strategy : {muon::ShardingStrategy::owner_compute, muon::ShardingStrategy::zero1}) {
    check<float>(strategy);
    check<double>(strategy);
  }
  int any = failures > 0 ? 1 : 0, all = 0;
  MPI_Allreduce(&any, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) std::printf("%d ranks: %s\n", world, all ? "FAILED" : "all checks passed");
  MPI_Finalize();
  return all;
}
