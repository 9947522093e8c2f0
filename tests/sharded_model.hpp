#pragma once
// A small model for the sharded-optimizer tests (threads and MPI): Muon matrices of uneven
// shapes (tall, wide, fewer rows than some world sizes have ranks), a conv kernel, and AdamW
// vectors down to 1x1. Rank r's gradient at step s is a deterministic function of (r, s), so
// every process can also compute the single-process reference: the optimizer on the mean
// gradient. Gradients are multiples of 2^-6 of magnitude < 2^4, so their sums over ranks are
// exact in float and double whatever the reduction order, and "bitwise equal" is well posed.
#include <random>
#include <string>
#include <vector>

#include "muon/distributed/sharded_optimizer.hpp"
#include "muon/eigen.hpp"
#include "test_support.hpp"

namespace muon_test {

template <class T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct Shape {
  const char* name;
  bool muon;
  Eigen::Index rows, cols;
};
inline const std::vector<Shape>& sharded_shapes() {
  static const std::vector<Shape> shapes = {
      {"tall", true, 13, 5}, {"wide", true, 4, 11}, {"square", true, 8, 8},
      {"tiny", true, 2, 3},  {"conv", true, 6, 12}, {"bias", false, 1, 7},
      {"gain", false, 1, 1}, {"head", false, 3, 5}};
  return shapes;
}

template <class T>
RowMat<T> dyadic_gradient(const Shape& s, int rank, int step, std::size_t index) {
  std::mt19937_64 rng(1000003u * static_cast<unsigned>(rank + 1) + 7919u * static_cast<unsigned>(step) + index);
  std::uniform_int_distribution<int> d(-600, 600);
  RowMat<T> g(s.rows, s.cols);
  for (Eigen::Index i = 0; i < g.size(); ++i) g.data()[i] = static_cast<T>(d(rng)) / T(64);
  return g;
}

template <class T>
RowMat<T> initial_weight(const Shape& s, std::size_t index) {
  std::mt19937_64 rng(4242 + index);
  std::normal_distribution<double> d(0.0, 0.5);
  RowMat<T> w(s.rows, s.cols);
  for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<T>(d(rng));
  return w;
}

inline muon::GroupOptions sharded_options() {
  muon::GroupOptions g;
  g.muon.lr = 0.02;
  g.muon.weight_decay = 0.1;
  g.adamw.lr = 0.01;
  return g;
}

/// Weights and gradients of one rank (or of the single-process reference).
template <class T>
struct ShardedModel {
  std::vector<RowMat<T>> w, g;
  ShardedModel() {
    const auto& shapes = sharded_shapes();
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      w.push_back(initial_weight<T>(shapes[i], i));
      g.push_back(RowMat<T>::Zero(shapes[i].rows, shapes[i].cols));
    }
  }
  template <class Opt>
  void register_with(Opt& opt) {
    const auto& shapes = sharded_shapes();
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      if (shapes[i].muon)
        opt.add_muon(shapes[i].name, w[i], g[i]);
      else
        opt.add_adamw(shapes[i].name, w[i], g[i]);
    }
  }
  /// This rank's local gradients at `step`.
  void local_gradients(int rank, int step) {
    const auto& shapes = sharded_shapes();
    for (std::size_t i = 0; i < shapes.size(); ++i)
      overwrite(g[i], dyadic_gradient<T>(shapes[i], rank, step, i));
  }
  /// The mean over `world` ranks, computed as the sharded optimizer does: sum, then * (1/N).
  void mean_gradients(int world, int step) {
    const auto& shapes = sharded_shapes();
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      RowMat<T> sum = RowMat<T>::Zero(shapes[i].rows, shapes[i].cols);
      for (int r = 0; r < world; ++r) sum += dyadic_gradient<T>(shapes[i], r, step, i);
      if (world > 1) sum *= T(1) / static_cast<T>(world);
      overwrite(g[i], sum);
    }
  }
};

/// Every weight of `a` has the bits of `b`'s.
template <class T>
bool same_weights(const ShardedModel<T>& a, const ShardedModel<T>& b) {
  if (a.w.size() != b.w.size()) return false;
  for (std::size_t i = 0; i < a.w.size(); ++i)
    if (!same_bits(a.w[i], b.w[i])) return false;
  return true;
}

/// The single-process reference after `steps` steps at world size `world`.
template <class T>
ShardedModel<T> single_process_reference(int world, int steps) {
  ShardedModel<T> model;
  muon::Optimizer<muon::EigenBackend, T> opt(sharded_options());
  model.register_with(opt);
  for (int s = 0; s < steps; ++s) {
    model.mean_gradients(world, s);
    opt.step();
  }
  return model;
}

/// Registers all but "square" and "head" first, adds those two after two steps, clears the
/// gradients of "wide" and "bias" for step 3 and restores them for step 4; `gradients(s)`
/// fills the model's gradients for step s. Returns each step's StepReport::updated.
template <class T, class Opt, class Gradients>
std::vector<std::size_t> late_and_cleared(ShardedModel<T>& model, Opt& opt, Gradients gradients) {
  const auto& shapes = sharded_shapes();
  std::vector<muon::ParamId> ids(shapes.size());
  const auto add = [&](std::size_t i) {
    ids[i] = shapes[i].muon ? opt.add_muon(shapes[i].name, model.w[i], model.g[i])
                            : opt.add_adamw(shapes[i].name, model.w[i], model.g[i]);
  };
  for (std::size_t i = 0; i < shapes.size(); ++i)
    if (i != 2 && i != 7) add(i);
  std::vector<std::size_t> updated;
  for (int s = 0; s < 6; ++s) {
    if (s == 2) {
      add(2);
      add(7);
    }
    for (std::size_t i : {std::size_t(1), std::size_t(5)}) {
      if (s == 3) opt.clear_grad(ids[i]);
      if (s == 4) opt.set_grad(ids[i], cview(model.g[i]));
    }
    gradients(s);
    updated.push_back(opt.step().updated);
  }
  return updated;
}

}  // namespace muon_test
