// Seed 000, "When does Muon work? Model depth is a key factor" (Ziming Liu, 2026):
// Adam vs Muon on a linear teacher, students of depth 1, 2, 5 and 10, linear and SiLU, each
// optimizer at learning rates 1e-4 ... 1e-2; the best final loss per cell decides the winner.
//
//   depth_experiment [--steps 1000] [--batch 128] [--seed 0] [--jobs N] [--csv FILE]
//
// Prints one row per (activation, depth) and writes every run to the CSV (default
// depth_experiment.csv), which examples/plot_depth_experiment.py turns into a plot.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>
#include <vector>

#include "teacher_regression.hpp"

int main(int argc, char** argv) {
  RegressionRun base;
  std::string csv_path;
  unsigned jobs = 0;
  try {
    base.steps = int_option(argc, argv, "--steps", 1000);
    base.batch = std::max(1, int_option(argc, argv, "--batch", 128));
    base.seed = unsigned(int_option(argc, argv, "--seed", 0));
    jobs = unsigned(int_option(argc, argv, "--jobs", int(std::thread::hardware_concurrency())));
    csv_path = option(argc, argv, "--csv", "depth_experiment.csv");
  } catch (const std::exception& e) {
    std::fprintf(stderr,
                 "%s\nusage: depth_experiment [--steps N] [--batch B] [--seed S] [--jobs J] "
                 "[--csv FILE]\n",
                 e.what());
    return 2;
  }
  const Activation activations[] = {Activation::linear, Activation::silu};
  const int depths[] = {1, 2, 5, 10};
  const double lrs[] = {1e-4, 3e-4, 1e-3, 3e-3, 1e-2};

  std::vector<RegressionRun> runs;
  for (Activation act : activations)
    for (int depth : depths)
      for (bool muon : {false, true})
        for (double lr : lrs) {
          RegressionRun r = base;
          r.activation = act;
          r.depth = depth;
          r.muon = muon;
          r.lr = lr;
          runs.push_back(r);
        }
  // Independent runs on `jobs` threads; each run is deterministic, so the order does not matter.
  std::vector<double> loss(runs.size());
  std::atomic<std::size_t> next{0};
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> workers;
  for (unsigned j = 0; j < std::max(1u, jobs); ++j)
    workers.emplace_back([&] {
      for (std::size_t i; (i = next++) < runs.size();) loss[i] = train_regression(runs[i]).final_loss;
    });
  for (auto& w : workers) w.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::ofstream csv(csv_path);
  csv << "activation,depth,optimizer,lr,final_loss\n";
  for (std::size_t i = 0; i < runs.size(); ++i)
    csv << to_string(runs[i].activation) << ',' << runs[i].depth << ','
        << (runs[i].muon ? "muon" : "adam") << ',' << runs[i].lr << ',' << loss[i] << '\n';
  if (!csv) {
    std::fprintf(stderr, "could not write %s\n", csv_path.c_str());
    return 1;
  }

  std::printf("%d steps, batch %d, seed %u: best final test MSE of each optimizer over lr in "
              "{1e-4, 3e-4, 1e-3, 3e-3, 1e-2}\n\n",
              base.steps, base.batch, base.seed);
  std::printf("activation  depth   Adam loss  (lr)      Muon loss  (lr)      winner\n");
  for (std::size_t cell = 0; cell < runs.size(); cell += 2 * std::size(lrs)) {
    std::size_t best[2] = {cell, cell + std::size(lrs)};  // adam, muon
    for (int o = 0; o < 2; ++o)
      for (std::size_t k = 0; k < std::size(lrs); ++k) {
        const std::size_t i = cell + o * std::size(lrs) + k;
        if (loss[i] < loss[best[o]]) best[o] = i;
      }
    std::printf("%-10s  %5d   %9.3e  (%.0e)   %9.3e  (%.0e)   %s\n",
                to_string(runs[cell].activation), runs[cell].depth, loss[best[0]],
                runs[best[0]].lr, loss[best[1]], runs[best[1]].lr,
                loss[best[1]] < loss[best[0]] ? "Muon" : "Adam");
  }
  std::printf("\n%zu runs in %.1f s on %u threads; all runs in %s\n", runs.size(), seconds,
              std::max(1u, jobs), csv_path.c_str());
  return 0;
}
