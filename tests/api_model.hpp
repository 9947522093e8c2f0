#pragma once
// A model of what muon's optimizers promise, for random sequences of API calls: the worlds the
// stateful property test (test_api_properties.cpp) and its fuzzer (fuzz/fuzz_api.cpp) drive.
// Each call is checked as it is made; what did not hold is collected in World::failures.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "muon/distributed/thread_communicator.hpp"
#include "sharded_model.hpp"

namespace muon_test::api {

using Mat = RowMat<double>;

struct Slot {
  const char* name;
  bool muon;
  Eigen::Index rows, cols;
};
inline constexpr Slot kSlots[] = {{"tall", true, 7, 3}, {"wide", true, 3, 6}, {"bias", false, 1, 5},
                           {"head", false, 2, 4}};
inline constexpr int kCount = 4;

enum class Kind {
  add,
  add_refused,
  set_grad,
  set_grad_refused,
  clear_grad,
  gradients,
  step,
  options,
  options_refused,
  save,
  load,
  load_corrupted,
  fork
};

/// One call with every random choice already made, so that every world (the twin, every rank)
/// makes the same call.
struct Call {
  Kind kind;
  int slot = 0;         // which parameter
  int variant = 0;      // which refusal, corruption, or storage
  std::uint64_t seed = 0;
  int bad_rank = -1;    // gradients: the rank whose gradient gets a NaN or Inf (-1: none)
  double value = 0;     // options: the new learning rate
};

/// A call from a source of numbers: next() (an RNG, or a fuzzer's bytes).
template <class Next>
Call make_call(Next&& next, int world) {
  static const Kind kinds[] = {Kind::add,       Kind::add,           Kind::add_refused,
                               Kind::set_grad,  Kind::set_grad_refused, Kind::clear_grad,
                               Kind::gradients, Kind::gradients,     Kind::step,
                               Kind::step,      Kind::step,          Kind::options,
                               Kind::options_refused, Kind::save,    Kind::load,
                               Kind::load_corrupted,  Kind::fork};
  Call c;
  c.kind = kinds[next() % std::size(kinds)];
  c.slot = static_cast<int>(next() % kCount);
  c.variant = static_cast<int>(next() % 4);
  c.seed = next();
  c.bad_rank = next() % 4 == 0 ? static_cast<int>(next() % static_cast<unsigned>(world)) : -1;
  c.value = 0.05 * static_cast<double>(next() % 100) / 100.0;
  return c;
}

/// What a refused call must leave alone: every weight's bytes and the saved state.
struct Snapshot {
  std::vector<Mat> weights;
  std::string state;
  bool operator==(const Snapshot& o) const {
    if (state != o.state || weights.size() != o.weights.size()) return false;
    for (std::size_t i = 0; i < weights.size(); ++i)
      if (!same_bits(weights[i], o.weights[i])) return false;
    return true;
  }
};

/// One optimizer with its model: weights, two gradient storages per parameter (set_grad moves
/// between them), and what the model says must hold.
template <class Opt>
struct World {
  std::unique_ptr<Opt> opt;
  muon::NonFinitePolicy policy;
  int rank = 0;
  std::vector<Mat> w, g[2];
  int registered = 0;
  std::vector<int> source = std::vector<int>(kCount, 0);  // which storage each gradient is in
  std::vector<bool> has_grad = std::vector<bool>(kCount, true);
  std::vector<std::string> checkpoints;  // save()d states, with the registrations they match
  std::vector<int> checkpoint_registered;
  std::function<bool()> bad_anywhere;    // set by the driver of a sharded world
  /// What did not hold, for the test's thread to report: Catch's assertions are not for the
  /// ranks' threads.
  std::vector<std::string> failures;
  std::string context;
  /// What the sequence exercised, so a test can tell it did more than refuse everything.
  struct Counts {
    int steps = 0, refused_steps = 0, refusals = 0, loads = 0;
  } counts;

  void expect(bool ok, const std::string& what) {
    if (!ok) failures.push_back(context + ": " + what);
  }
  template <class E, class F>
  void expect_throws(F&& call, const std::string& what) {
    try {
      call();
      failures.push_back(context + ": " + what + ": nothing was thrown");
    } catch (const E&) {
    } catch (const std::exception& e) {
      failures.push_back(context + ": " + what + ": another exception: " + e.what());
    }
  }

  World(std::unique_ptr<Opt> o, muon::NonFinitePolicy p, int r)
      : opt(std::move(o)), policy(p), rank(r) {
    for (int i = 0; i < kCount; ++i) {
      w.push_back(initial_weight<double>({kSlots[i].name, kSlots[i].muon, kSlots[i].rows, kSlots[i].cols},
                                         static_cast<std::size_t>(i)));
      for (auto& storage : g) storage.push_back(Mat::Zero(kSlots[i].rows, kSlots[i].cols));
    }
  }

  std::string save() {
    std::ostringstream out;
    opt->save_state(out);
    return out.str();
  }
  Snapshot snapshot() { return {w, save()}; }
  bool active(int i) const { return i < registered && has_grad[static_cast<std::size_t>(i)]; }

  /// Applies one call and checks the model.
  void apply(const Call& c, int index) {
    context = "rank " + std::to_string(rank) + ", call " + std::to_string(index) + " (kind " +
              std::to_string(static_cast<int>(c.kind)) + ", slot " + std::to_string(c.slot) +
              ", variant " + std::to_string(c.variant) + ")";
    const Snapshot before = snapshot();
    const auto refused = [&](auto&& call) {
      ++counts.refusals;
      expect_throws<muon::Error>(call, "a refusal");
      expect(snapshot() == before, "the refused call changed something");
    };
    const std::size_t s = static_cast<std::size_t>(c.slot);
    switch (c.kind) {
      case Kind::add:
        if (registered == kCount) return;
        add(registered);
        ++registered;
        return;
      case Kind::add_refused:
        refused([&] { add_refused(c.variant); });
        return;
      case Kind::set_grad:
        if (c.slot >= registered) return;
        source[s] = c.variant % 2;
        opt->set_grad(muon::ParamId{s}, cview(g[source[s]][s]));
        has_grad[s] = true;
        return;
      case Kind::set_grad_refused:
        if (c.slot >= registered) return;
        refused([&] { opt->set_grad(muon::ParamId{s}, cview(g[0][(s + 1) % kCount])); });
        return;
      case Kind::clear_grad:
        if (c.slot >= registered) return;
        opt->clear_grad(muon::ParamId{s});
        has_grad[s] = false;
        return;
      case Kind::gradients:
        gradients(c);
        return;
      case Kind::step:
        step(before);
        return;
      case Kind::options:
        options(c, false);
        return;
      case Kind::options_refused:
        refused([&] { options(c, true); });
        return;
      case Kind::save:
        checkpoints.push_back(before.state);
        checkpoint_registered.push_back(registered);
        return;
      case Kind::load:
      case Kind::load_corrupted:
        load(c, before);
        return;
      case Kind::fork:
        return;  // the driver makes the twin
    }
  }

  void add(int i) {
    const std::size_t s = static_cast<std::size_t>(i);
    const muon::GroupId group{s % 2};
    if (kSlots[i].muon)
      opt->add_muon(kSlots[i].name, w[s], g[source[s]][s], group);
    else
      opt->add_adamw(kSlots[i].name, w[s], g[source[s]][s], group);
    if (!has_grad[s]) opt->clear_grad(muon::ParamId{s});
  }

  void add_refused(int variant) {
    Mat other = Mat::Zero(2, 2), g_other = Mat::Zero(2, 3);
    switch (variant) {
      case 0:  // the gradient's shape differs
        opt->add_adamw("other", other, g_other);
        break;
      case 1:  // a name taken (or, before any registration, a name that is empty)
        opt->add_adamw(registered > 0 ? kSlots[0].name : "", other, g_other.leftCols(2));
        break;
      case 2:  // rows on top of each other
        opt->add_adamw("aliased", muon::MatrixView<double>{other.data(), 2, 2, 0, 1},
                       cview(g_other).block(0, 0, 2, 2));
        break;
      default:  // a group that does not exist
        opt->add_muon("grouped", other, g_other.leftCols(2), muon::GroupId{7});
        break;
    }
  }

  void gradients(const Call& c) {
    std::mt19937_64 rng(c.seed + 7919u * static_cast<unsigned>(rank));
    std::uniform_int_distribution<int> d(-600, 600);  // multiples of 2^-6: rank sums are exact
    for (auto& storage : g)
      for (Mat& m : storage)
        for (Eigen::Index k = 0; k < m.size(); ++k) m.data()[k] = d(rng) / 64.0;
    if (c.bad_rank == rank) {
      const std::size_t s = static_cast<std::size_t>(c.slot);
      Mat& m = g[source[s]][s];
      m.data()[c.seed % static_cast<std::uint64_t>(m.size())] =
          c.variant % 2 ? std::numeric_limits<double>::quiet_NaN()
                        : std::numeric_limits<double>::infinity();
    }
  }

  bool any_bad_gradient() const {
    for (int i = 0; i < registered; ++i) {
      const std::size_t s = static_cast<std::size_t>(i);
      if (active(i) && !g[source[s]][s].allFinite()) return true;
    }
    return false;
  }

  void step(const Snapshot& before) {
    // Whether some rank sees a NaN/Inf: every rank knows (the calls are the same everywhere),
    // so the single-process world passes its own verdict and a rank asks the others.
    const bool bad = policy != muon::NonFinitePolicy::unchecked && any_bad_gradient_anywhere();
    if (bad) ++counts.refused_steps;
    if (bad && policy == muon::NonFinitePolicy::error) {
      expect_throws<muon::NonFiniteGradient>([&] { opt->step(); }, "a refused step");
      expect(snapshot() == before, "a refused step changed something");
      return;
    }
    const muon::StepReport report = opt->step();
    if (bad) {
      expect(!report.applied, "a skipped step reported as applied");
      expect(snapshot() == before, "a skipped step changed something");
      return;
    }
    ++counts.steps;
    for (int i = 0; i < kCount; ++i) {
      const std::size_t s = static_cast<std::size_t>(i);
      if (!active(i))
        expect(same_bits(w[s], before.weights[s]), std::string(kSlots[i].name) + " moved without a gradient");
      if (policy != muon::NonFinitePolicy::unchecked)
        expect(w[s].allFinite(), std::string(kSlots[i].name) + " holds NaN or Inf");
    }
  }
  bool any_bad_gradient_anywhere() { return bad_anywhere ? bad_anywhere() : any_bad_gradient(); }

  void options(const Call& c, bool refused) {
    const muon::GroupId group{static_cast<std::size_t>(c.slot % 2)};
    muon::GroupOptions o = opt->group_options(group);
    o.muon.lr = c.value;
    o.adamw.lr = c.value / 2;
    if (refused) {
      if (c.variant == 0) o.muon.lr = -c.value - 1;
      if (c.variant == 1) o.adamw.beta2 = 1;
      if (c.variant == 2) o.muon.scale = static_cast<muon::ScaleMode>(9);
      if (c.variant == 3) o.muon.newton_schulz.steps = 0;
    }
    opt->set_group_options(group, o);
  }

  void load(const Call& c, const Snapshot& before) {
    if (checkpoints.empty()) return;
    const std::size_t k = c.seed % checkpoints.size();
    std::string bytes = checkpoints[k];
    const bool foreign = checkpoint_registered[k] != registered;
    if (c.kind == Kind::load_corrupted) {
      if (c.variant % 2 == 0)
        bytes[c.seed % bytes.size()] ^= static_cast<char>(1 + c.seed % 255);
      else
        bytes.resize(c.seed % bytes.size());
    }
    std::istringstream in(bytes);
    if (foreign || c.kind == Kind::load_corrupted) {
      expect_throws<muon::StateError>([&] { opt->load_state(in); }, "a refused load");
      expect(snapshot() == before, "a refused load changed something");
    } else {
      opt->load_state(in);
      ++counts.loads;
      expect(save() == bytes, "the loaded state is not the one saved");
    }
  }
};

using Single = muon::Optimizer<muon::EigenBackend, double>;
using Sharded = muon::ShardedOptimizer<muon::EigenBackend, double, muon::ThreadCommunicator>;

inline muon::GroupOptions group1() {
  muon::GroupOptions g = sharded_options();
  g.muon.momentum_form = muon::MomentumForm::sum;
  g.muon.nesterov = false;
  g.adamw.weight_decay = 0.2;
  return g;
}

inline int sequences(int ci) {
  const char* env = std::getenv("MUON_PROPERTY_SEQUENCES");
  return env != nullptr ? std::max(1, std::atoi(env)) : ci;
}

/// A fresh single-process world registered like `w`, loaded with its state: the resumed run.
inline std::unique_ptr<World<Single>> resumed_twin(World<Single>& w) {
  muon::OptimizerOptions o;
  o.non_finite = w.policy;
  auto twin = std::make_unique<World<Single>>(
      std::make_unique<Single>(w.opt->group_options(muon::GroupId{0}), o), w.policy, 0);
  twin->opt->add_group(w.opt->group_options(muon::GroupId{1}));
  twin->w = w.w;
  for (int k = 0; k < 2; ++k) twin->g[k] = w.g[k];
  twin->source = w.source;
  twin->has_grad = w.has_grad;
  for (int i = 0; i < w.registered; ++i) twin->add(i);
  twin->registered = w.registered;
  twin->checkpoints = w.checkpoints;
  twin->checkpoint_registered = w.checkpoint_registered;
  std::istringstream in(w.save());
  twin->opt->load_state(in);
  return twin;
}


/// One call to a single-process world and, once a fork call made it, to its resumed twin,
/// which must stay the same bits as the world.
inline void apply_with_twin(World<Single>& world, std::unique_ptr<World<Single>>& twin,
                            const Call& c, int index) {
  world.apply(c, index);
  if (twin) {
    twin->apply(c, index);
    world.expect(twin->snapshot() == world.snapshot(), "the resumed run differs");
  }
  if (c.kind == Kind::fork && !twin) twin = resumed_twin(world);
}

}  // namespace muon_test::api
