#pragma once
// Internal: included by the library's own headers, not by programs.
// The one driver of every placement of the optimizer. It holds the parameter groups and their
// validated options, the registered parameters with their gradients and state buffers, and
// step(): the non-finite check, the elementwise rules on this process's piece of every
// parameter, and every matrix of the orthogonalizing rules (momentum, Newton-Schulz, check,
// apply), spread over the backend's workers where it has them. muon::Optimizer places every
// parameter whole on this process; muon::ShardedOptimizer places pieces on the ranks of a
// Communicator and adds the exchange. The update rules are policy objects (rules/rules.hpp).
//
// Derived (the placement) befriends this class and detail::PlacementAccess, and provides the
// hooks of the Placement concept (driver/placement.hpp, which lists them) and the state file's
// (driver/state_file.hpp, which defines save_state and load_state; a placement's header
// includes it).
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <istream>
#include <limits>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/algorithm/shape_scale.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/parts.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/serialize.hpp"
#include "muon/driver/placement.hpp"
#include "muon/rules/rules.hpp"

namespace muon {

/// How orthogonal one Muon matrix's update was (OptimizerOptions::telemetry).
struct NewtonSchulzTelemetry {
  ParamId param;
  double residual = 0;    ///< ||O O^T - I||_F / sqrt(min(m, n)) of the Newton-Schulz result O
  double update_rms = 0;  ///< RMS of s O, the step per unit learning rate (rms_factor under
                          ///< match_rms_adamw when O is orthogonal); weight decay not included
  int steps = 0;          ///< Newton-Schulz steps run, with those a tolerance added
  std::size_t part = 0;   ///< which matrix of the parameter (expert or split block); 0 if one
};

/// What a step() did.
struct StepReport {
  bool applied = true;             ///< false when NonFinitePolicy::skip refused the step
  std::size_t updated = 0;         ///< parameters updated (those with a gradient)
  std::string skipped_because;     ///< the parameter whose gradient (or update) was not finite
  std::size_t refused = 0;         ///< Muon parameters left alone: Newton-Schulz result not finite
  /// With OptimizerOptions::telemetry: one entry per Muon matrix this process orthogonalized,
  /// in registration order.
  std::vector<NewtonSchulzTelemetry> newton_schulz;
};

namespace detail {

/// The per-parameter placement data of an optimizer that updates every parameter whole: none.
struct WholeMatrix {};

/// Catches a second thread entering a busy optimizer (optimizers are not thread-safe): enter()
/// holds the flag for the call's duration, and a call that finds it held throws ConcurrentUse
/// before touching anything. One atomic exchange per call. Copies start free.
class EntryFlag {
 public:
  EntryFlag() = default;
  EntryFlag(const EntryFlag&) noexcept {}
  EntryFlag& operator=(const EntryFlag&) noexcept { return *this; }
  ~EntryFlag() = default;

  class Held {
   public:
    explicit Held(std::atomic<bool>& busy) : busy_(&busy) {}
    Held(const Held&) = delete;
    Held& operator=(const Held&) = delete;
    ~Held() { busy_->store(false, std::memory_order_release); }

   private:
    std::atomic<bool>* busy_;
  };
  [[nodiscard]] Held enter(const char* call) {
    if (busy_.exchange(true, std::memory_order_acquire))
      throw ConcurrentUse(std::string("muon: ") + call +
                          "() was called while another call was running in the same optimizer "
                          "(from another thread?); an optimizer is not thread-safe: give each "
                          "thread its own or serialize the calls. Nothing was changed by this one");
    return Held(busy_);
  }

 private:
  std::atomic<bool> busy_{false};
};

template <class Derived, class B, class T, class ParamExtra>
class OptimizerCore : public Registrar<Derived, T, typename B::memory_space> {
 public:
  using backend_type = B;
  using scalar_type = T;
  using Space = typename B::memory_space;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;

  // ---- groups ----------------------------------------------------------------------------
  GroupId add_group(const GroupOptions& options) {
    const auto entered = enter("add_group");
    groups_.push_back(make_group(options, groups_.size()));
    return {groups_.size() - 1};
  }
  /// Replaces a group's options (e.g. a learning-rate schedule); validated first, and nothing
  /// changes if they are refused.
  void set_group_options(GroupId id, const GroupOptions& options) {
    const auto entered = enter("set_group_options");
    check_group(id);
    Group group = make_group(options, id.value);
    bool replan = false;
    rules::All::for_each([&](auto rule) {
      using R = decltype(rule);
      if constexpr (R::orthogonalizes)
        replan |= R::options(options).newton_schulz.method !=
                  R::options(groups_[id.value].options).newton_schulz.method;
    });
    std::swap(groups_[id.value], group);
    if (!replan) return;  // a learning-rate schedule's every-step call stops here
    try {
      plan();  // a new Newton-Schulz method may need more workspace
    } catch (...) {
      std::swap(groups_[id.value], group);
      throw;
    }
  }
  [[nodiscard]] const GroupOptions& group_options(GroupId id = {}) const {
    check_group(id);
    return groups_[id.value].options;
  }
  [[nodiscard]] std::size_t num_groups() const noexcept { return groups_.size(); }

  // ---- parameters ------------------------------------------------------------------------
  /// Runs `add_some` (calls of add_muon / add_adamw) all or nothing: if it throws, every
  /// parameter it registered is removed again, the optimizer is as it was, and the exception
  /// goes on (e.g. a framework's param group with one bad tensor among good ones).
  template <class F>
  void add_all_or_nothing(F&& add_some) {
    const std::size_t before = params_.size();
    auto units = units_;  // the plan as it is (copied first: restoring it cannot fail)
    auto order = order_;
    auto outcomes = outcomes_;
    auto batches = batches_;
    auto batched = batched_;
    try {
      std::forward<F>(add_some)();
    } catch (...) {
      params_.erase(params_.begin() + static_cast<std::ptrdiff_t>(before), params_.end());
      std::erase_if(watches_, [&](const Watch& w) { return w.param >= before; });
      units_.swap(units), order_.swap(order), outcomes_.swap(outcomes);
      batches_.swap(batches), batched_.swap(batched);
      throw;
    }
  }

  /// Points a parameter at a (new) gradient; it takes part in the next steps again.
  void set_grad(ParamId id, ConstView grad) {
    const auto entered = enter("set_grad");
    check_param(id);
    Param& p = params_[id.value];
    check_grad(params_, p.name, p.shape, p.value, grad, id.value);
    p.grad = grad;
    p.has_grad = true;
    std::erase_if(watches_, [&](const Watch& w) { return w.param == id.value && w.grad; });
  }
  /// The parameter has no gradient: step() leaves it and its state alone (no weight decay
  /// either), as torch does for a parameter whose .grad is None, until set_grad().
  void clear_grad(ParamId id) {
    const auto entered = enter("clear_grad");
    check_param(id);
    params_[id.value].has_grad = false;
  }

  // ---- introspection ---------------------------------------------------------------------
  [[nodiscard]] std::uint64_t step_count() const noexcept { return steps_; }
  [[nodiscard]] std::size_t num_params() const noexcept { return params_.size(); }
  [[nodiscard]] const std::string& name(ParamId id) const { return param(id).name; }
  [[nodiscard]] UpdateRule rule(ParamId id) const { return param(id).rule; }
  /// How many matrices Newton-Schulz orthogonalizes in this parameter (experts, split blocks);
  /// 0 for an elementwise rule.
  [[nodiscard]] std::size_t num_matrices(ParamId id) const { return param(id).parts.size(); }
  [[nodiscard]] B& backend() noexcept { return backend_; }

  // ---- the step --------------------------------------------------------------------------
  /// One optimizer step over every parameter that has a gradient. Gradients are checked for
  /// NaN/Inf first; if one is found nothing is modified (see NonFinitePolicy).
  StepReport step();  // defined below the class: see there

  // ---- state files (driver/state_file.hpp: the layout) -----------------------------------
  /// Writes the state: the step counts and each rule's buffers over the part of every
  /// parameter held here (ShardedOptimizer: collective, one file per rank).
  void save_state(std::ostream& out);
  /// Restores a state saved by an optimizer with the same parameters (names, rules, shapes, in
  /// registration order), Scalar and placement. On any error nothing changes (on any rank).
  void load_state(std::istream& in);

 protected:
  using Buffer = typename B::template Buffer<T>;
  struct Group {
    GroupOptions options;
    /// Each orthogonalizing rule's schedule (by its place in rules::All), resolved once so
    /// that step() never allocates.
    std::array<std::vector<Coefficients>, rules::All::count> schedules;
  };
  struct Param : ParamExtra {
    std::string name;
    UpdateRule rule{};  // set at registration
    std::size_t group = 0;
    std::vector<index_t> shape;  // as registered (N-D for flattened weights)
    View value;
    ConstView grad;
    bool has_grad = true;
    std::array<Buffer, rules::All::max_buffers> state;  // the rule's buffers, dense over the piece
    /// The rule's buffers per matrix row (Part::state_row0 says where each matrix's rows start),
    /// where its matrices are orthogonalized.
    std::array<Buffer, rules::All::max_row_buffers> row_state;
    std::uint64_t updates = 0;  // steps taken by this parameter (AdamW's bias correction)
    std::vector<Part> parts;    // orthogonalizing rules: the matrices Newton-Schulz runs on
    /// Whether step() updates it: it has a gradient and at least one element.
    [[nodiscard]] bool takes_part() const { return has_grad && !value.empty(); }
  };
  /// Batching backends: stacks of same-shape matrices of one group, run in one call.
  struct Batch {
    index_t rows, cols;
    std::size_t group;
    UpdateRule rule;  // the group's Newton-Schulz options are its rule's
    std::vector<std::size_t> units;
  };
  /// What a worker needs to carry one matrix through: Newton-Schulz workspace, and the
  /// matrix's momentum before its step while the step is checked.
  struct Worker {
    NewtonSchulzWorkspace<B, T> ns;
    Buffer saved;
    Buffer scratch;  // the rule's apply() scratch
  };

  OptimizerCore(B backend, OptimizerOptions options, const GroupOptions& defaults)
      : backend_(std::move(backend)), options_(options) {
    validate(options);
    if (options.telemetry && !measures_residual<B, T>)
      throw InvalidArgument("muon: OptimizerOptions.telemetry: this backend cannot measure "
                            "residuals (it has no frobenius_norm(); EigenBackend has)");
    groups_.push_back(make_group(defaults, 0));
    if constexpr (RunsSideBySide<B>)
      workers_.resize(options.grouped ? static_cast<std::size_t>(std::max(1, backend_.workers())) : 1);
    else
      workers_.resize(1);
  }

  static Group make_group(const GroupOptions& options, std::size_t index) {
    validate(options, "group " + std::to_string(index));
    Group g{options, {}};
    rules::All::for_each([&](auto rule) {
      using R = decltype(rule);
      if constexpr (R::orthogonalizes) {
        const NewtonSchulzOptions& ns = R::options(options).newton_schulz;
        check_measurable<B, T>(ns, "group " + std::to_string(index) + "." + R::name);
        g.schedules[rules::All::index(R::id)] = ns.schedule.resolve(ns.steps);
      }
    });
    return g;
  }
  /// The Newton-Schulz options of an orthogonalizing parameter (planning; a step resolves
  /// the rule once per matrix and reads its options directly).
  const NewtonSchulzOptions& newton_schulz(const Param& p) const {
    return *rules::All::newton_schulz(p.rule, groups_[p.group].options);
  }
  template <class R>
  const std::vector<Coefficients>& schedule(const Param& p) const {
    return groups_[p.group].schedules[rules::All::index_of<R>()];
  }

  [[nodiscard]] bool checked() const { return options_.non_finite != NonFinitePolicy::unchecked; }
  [[nodiscard]] EntryFlag::Held enter(const char* call) { return entry_.enter(call); }

  /// Pass 1 of a load, on one parameter's n stored scalars: under error or skip, which promise
  /// that no NaN or Inf is ever written, a state holding one is refused (an unchecked run saved
  /// it); under unchecked it loads as saved.
  void check_loaded_state(const Param& p, const char* bytes, std::size_t n) const {
    if (checked() && !detail::all_finite_little_endian<T>(bytes, n))
      throw StateError("muon: load_state: the state of parameter '" + p.name + "' (" +
                       shape_string(p.shape) +
                       ") holds NaN or Inf, which NonFinitePolicy::error and skip never write "
                       "(saved under unchecked?); nothing was changed");
  }
  // State files (driver/state_file.hpp).
  struct LoadedRecord {
    std::uint64_t updates;
    const char* data;  // the parameter's buffers in the file's bytes
    const char* rows;  // its buffers per row, if its rule has any
  };
  static std::vector<std::uint64_t> state_extents(const Param& p, const Piece& piece);
  std::uint64_t parse_state(const std::string& bytes, std::vector<LoadedRecord>& records);

  [[nodiscard]] bool after_exchange() {
    if constexpr (Derived::exchanges)
      return self().orthogonalizes_after_exchange();
    else
      return false;
  }

  /// The first parameter taking part whose gradient holds a NaN or Inf; none when unchecked.
  /// One verdict for all gradients where the backend can (ScansFiniteTogether); the per-
  /// parameter scan then runs only to name the culprit.
  [[nodiscard]] const Param* first_nonfinite_grad() {
    if (!checked()) return nullptr;
    if constexpr (ScansFiniteTogether<B, T>) {
      backend_.begin_finite_scan();
      for (const Param& p : params_)
        if (p.takes_part()) backend_.scan_finite(p.grad);
      if (backend_.end_finite_scan()) return nullptr;
    }
    for (const Param& p : params_)
      if (p.takes_part() && !backend_.all_finite(p.grad)) return &p;
    return nullptr;
  }

  /// Rule R's state buffers of p as dense views over a piece.
  template <class R>
  std::array<View, R::buffers> state_views(Param& p, const Piece& piece) {
    std::array<View, R::buffers> v{};
    for (std::size_t i = 0; i < R::buffers; ++i) v[i] = backend_.view(p.state[i], piece.rows, piece.cols);
    return v;
  }
  /// Sizes a parameter's state buffers for its piece, and its state per row where its
  /// matrices are orthogonalized (zeros).
  void size_state(Param& p, index_t elements) {
    for (std::size_t i = 0; i < rules::All::buffers(p.rule); ++i)
      backend_.resize(p.state[i], elements);
    const index_t rows = state_rows(p);
    for (std::size_t i = 0; i < rules::All::row_buffers(p.rule); ++i) backend_.resize(p.row_state[i], rows);
  }
  /// The length of each of p's buffers per row held here: its matrices' rows where they are
  /// orthogonalized, else 0.
  index_t state_rows(const Param& p) {
    if (rules::All::row_buffers(p.rule) == 0 || !self().orthogonalizes_here(p)) return 0;
    index_t rows = 0;
    for (const Part& part : p.parts) rows += part.rows;
    return rows;
  }
  /// A matrix's rows of rule R's buffers per row, each rows x 1.
  template <class R>
  std::array<View, row_buffers_of<R>()> row_views(Param& p, const Part& part) {
    std::array<View, row_buffers_of<R>()> v{};
    for (std::size_t i = 0; i < v.size(); ++i)
      v[i] = View(backend_.view(p.row_state[i], 1, static_cast<index_t>(p.row_state[i].size())).data() +
                      part.state_row0,
                  part.rows, 1, 1, 1);
    return v;
  }
  /// The rule's apply() scratch for a matrix, in a worker's buffer.
  template <class R>
  View scratch(Buffer& buf, const Part& part) {
    return backend_.view(buf, 1, muon::detail::scratch_of<R>(part.rows, part.cols));
  }
  /// Grows a scratch buffer to what the rule of parameter p needs for `part`.
  void reserve_scratch(Buffer& buf, const Param& p, const Part& part) {
    rules::All::visit(p.rule, [&](auto rule) {
      const index_t n = muon::detail::scratch_of<decltype(rule)>(part.rows, part.cols);
      if (static_cast<index_t>(buf.size()) < n) backend_.resize(buf, n);
    });
  }
  template <class X>
  static MatrixView<X, Space> block(MatrixView<X, Space> v, const Piece& p) {
    return v.block(p.row0, p.col0, p.rows, p.cols);
  }

  /// Lists every matrix the orthogonalizing rules will run, costliest first, and sizes the
  /// workers' workspaces for those this process runs: worker 0 for all of them, the others
  /// for those the backend runs side by side. Call after a registration or layout change.
  void plan() {
    std::vector<Unit> units;
    for (std::size_t i = 0; i < params_.size(); ++i)
      for (std::size_t j = 0; j < params_[i].parts.size(); ++j) units.push_back({i, j});
    std::vector<std::size_t> order(units.size());
    for (std::size_t u = 0; u < order.size(); ++u) order[u] = u;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return cost(part_of(units[a])) > cost(part_of(units[b]));
    });
    plan_batches(units);
    for (std::size_t u = 0; u < units.size(); ++u) {
      const Param& p = params_[units[u].param];
      const Part& part = p.parts[units[u].part];
      if (!self().orthogonalizes_here(p) || part.empty()) continue;
      reserve_scratch(workers_[0].scratch, p, part);  // batches use worker 0's
      if (batched_[u]) continue;
      const NewtonSchulzMethod method = newton_schulz(p).method;
      const std::size_t count = side_by_side(part) ? workers_.size() : 1;
      for (std::size_t w = 0; w < count; ++w) {
        workers_[w].ns.reserve(backend_, part.rows, part.cols, method);
        if (static_cast<index_t>(workers_[w].saved.size()) < part.size())
          backend_.resize(workers_[w].saved, part.size());
        reserve_scratch(workers_[w].scratch, p, part);
      }
    }
    outcomes_.assign(units.size(), Outcome{});
    std::size_t chunks = 0;  // when every parameter takes part
    for (const Param& p : params_)
      if (!rules::All::orthogonalizes(p.rule)) {
        const Piece mine = self().piece(p);
        const index_t rows = chunk_rows(mine);
        chunks += static_cast<std::size_t>((mine.rows + rows - 1) / rows);
      }
    chunks_.reserve(chunks);
    ready_.reserve(units.size());
    spread_.reserve(units.size() + chunks);
    units_ = std::move(units);
    order_ = std::move(order);
  }

  const Param& param(ParamId id) const {
    check_param(id);
    return params_[id.value];
  }
  void check_param(ParamId id) const {
    if (id.value >= params_.size())
      throw InvalidArgument("muon: no parameter with id " + std::to_string(id.value) + " (have " +
                            std::to_string(params_.size()) + ")");
  }
  void check_group(GroupId id) const {
    if (id.value >= groups_.size())
      throw InvalidArgument("muon: no parameter group with id " + std::to_string(id.value) +
                            " (have " + std::to_string(groups_.size()) + ")");
  }

  B backend_;
  OptimizerOptions options_;
  std::vector<Group> groups_;
  std::vector<Param> params_;
  std::vector<Worker> workers_;  // [0] serves every matrix; the others, side by side with it
  std::uint64_t steps_ = 0;
  EntryFlag entry_;

 private:
  friend class Registrar<Derived, T, Space>;
  /// One matrix Newton-Schulz orthogonalizes: part `part` of parameter `param`.
  struct Unit {
    std::size_t param, part;
  };
  /// What happened to one matrix this step.
  struct Outcome {
    bool ran = false, refused = false;
    NewtonSchulzReport ns;
    double update_rms = 0;
  };

  Derived& self() {
    static_assert(Placement<Derived>,
                  "muon: this placement lacks a hook the driver calls, or has one of another "
                  "signature: see the Placement concept in muon/driver/placement.hpp");
    return static_cast<Derived&>(*this);
  }

  ParamId add_param(std::string name, UpdateRule rule, std::vector<index_t> shape, View value,
                    ConstView grad, GroupId group, const std::vector<Part>& parts) {
    const auto entered = enter("add");
    check_group(group);
    check_new_param(params_, name, shape, value, grad);
    Param p;
    p.name = std::move(name);
    p.rule = rule;
    p.group = group.value;
    p.shape = std::move(shape);
    p.value = value;
    p.grad = grad;
    if (rules::All::orthogonalizes(rule)) p.parts = parts;
    params_.push_back(std::move(p));
    try {
      self().placed(params_.back());
      plan();
    } catch (...) {  // out of memory: the optimizer stays as it was
      params_.pop_back();
      throw;
    }
    return {params_.size() - 1};
  }

  /// An object registered through add_muon / add_adamw, watched (OptimizerOptions::
  /// watch_storage) for holding other memory than it was registered with.
  struct Watch {
    std::size_t param;
    bool grad;
    const void* object;
    const void* (*data_of)(const void*);
    const void* data;  // as registered
  };
  void watch_object(ParamId id, bool grad, const void* object, const void* (*data_of)(const void*)) {
    if (!options_.watch_storage) return;
    watches_.push_back({id.value, grad, object, data_of, data_of(object)});
  }
  void check_watched_storage() const {
    for (const Watch& w : watches_) {
      const Param& p = params_[w.param];
      if ((w.grad && !p.has_grad) || w.data_of(w.object) == w.data) continue;
      throw InvalidArgument(
          describe_param(p.name, p.shape) + ": the " + (w.grad ? "gradient" : "parameter") +
          " object registered for it no longer holds the memory it was registered with (was a "
          "new matrix assigned to it? `G = make_grad();` moves the new storage in and leaves the "
          "optimizer's view on freed memory: write into it instead, `G = expression;` or "
          "`G.noalias() = ...`, or call set_grad); step() changed nothing");
    }
  }

  const Part& part_of(const Unit& u) const { return params_[u.param].parts[u.part]; }

  /// Batching backends: the matrices this process runs, by shape and group, in stacks of two
  /// or more (a stack's matrices share Newton-Schulz options; a tolerance or telemetry, which
  /// need one matrix at a time, keep a group out), and room for the largest stack.
  void plan_batches(const std::vector<Unit>& units) {
    std::vector<Batch> batches;
    std::vector<char> batched(units.size(), 0);
    if constexpr (RunsBatched<B, T>) {
      if (options_.grouped && !options_.telemetry) {
        for (std::size_t u = 0; u < units.size(); ++u) {
          const Param& p = params_[units[u].param];
          const Part& part = p.parts[units[u].part];
          if (!self().orthogonalizes_here(p) || part.empty() ||
              newton_schulz(p).tolerance > 0)
            continue;
          auto it = std::find_if(batches.begin(), batches.end(), [&](const Batch& b) {
            return b.rows == part.rows && b.cols == part.cols && b.group == p.group && b.rule == p.rule;
          });
          if (it == batches.end()) it = batches.insert(batches.end(), Batch{part.rows, part.cols, p.group, p.rule, {}});
          it->units.push_back(u);
        }
        std::erase_if(batches, [](const Batch& b) { return b.units.size() < 2; });
        index_t most = 0;
        std::size_t count = 0;
        for (const Batch& b : batches) {
          most = std::max(most, b.rows * b.cols * static_cast<index_t>(b.units.size()));
          count = std::max(count, b.units.size());
          for (std::size_t u : b.units) batched[u] = 1;
        }
        for (Buffer* buf : {&batch_in_, &batch_out_, &batch_saved_})
          if (static_cast<index_t>(buf->size()) < most && (buf != &batch_saved_ || checked()))
            backend_.resize(*buf, most);
        present_.reserve(count);
      }
    }
    batches_ = std::move(batches);
    batched_ = std::move(batched);
  }
  static double cost(const Part& p) {  // Newton-Schulz flops ~ k^2 N
    const auto k = static_cast<double>(std::min(p.rows, p.cols));
    return k * static_cast<double>(p.rows) * static_cast<double>(p.cols);
  }
  bool side_by_side(const Part& part) {
    if constexpr (RunsSideBySide<B>)
      return workers_.size() > 1 && backend_.side_by_side_fits(part.rows, part.cols);
    else
      return false;
  }

  /// Rows of an elementwise rule's piece per task: enough to amortize a task, few enough to
  /// fill the workers' idle time at the end of the Newton-Schulz runs.
  static constexpr index_t kChunkElements = index_t(1) << 16;
  static index_t chunk_rows(const Piece& piece) {
    return std::max<index_t>(1, kChunkElements / std::max<index_t>(1, piece.cols));
  }

  /// An elementwise rule's piece of parameter `param`, rows [row0, row0 + rows) of it.
  struct Chunk {
    std::size_t param;
    index_t row0, rows;
  };

  /// Where the backend runs tasks side by side, the parameter's piece is queued in chunks of
  /// rows for run_tasks(); elsewhere it is updated now.
  void queue_elementwise(std::size_t i) {
    const Piece mine = self().piece(params_[i]);
    if (workers_.size() < 2 || mine.empty()) {
      run_chunk({i, 0, mine.rows});
      return;
    }
    const index_t rows = chunk_rows(mine);
    for (index_t r = 0; r < mine.rows; r += rows) chunks_.push_back({i, r, std::min(rows, mine.rows - r)});
  }

  /// One step of an elementwise rule on rows of this process's piece of a parameter (its
  /// step count moves once, after all its chunks).
  void run_chunk(const Chunk& c) {
    Param& p = params_[c.param];
    rules::All::visit(p.rule, [&](auto rule) {
      using R = decltype(rule);
      if constexpr (!R::orthogonalizes) {
        const Piece mine = self().piece(p);
        auto state = state_views<R>(p, mine);
        for (View& v : state) v = v.block(c.row0, 0, c.rows, mine.cols);
        R::update(backend_, block(p.value, mine).block(c.row0, 0, c.rows, mine.cols),
                  self().gradient(p).block(c.row0, 0, c.rows, mine.cols), state.data(),
                  R::options(groups_[p.group].options), p.updates + 1);
      }
    });
  }

  /// Runs the queued elementwise chunks and, with `matrices`, every matrix of the
  /// orthogonalizing rules this process orthogonalizes this step: side by side over the
  /// backend's workers those it runs that way (costliest first, the chunks last, filling the
  /// workers' idle time), the others one after the other on worker 0. Which way a matrix goes
  /// depends on its shape only, so its result is the same bits however many others step with
  /// it.
  void run_tasks(bool matrices) {
    ready_.clear();
    spread_.clear();
    if (matrices)
      for (std::size_t u : order_) {
        outcomes_[u] = Outcome{};
        const Param& p = params_[units_[u].param];
        if (!p.takes_part() || !self().orthogonalizes_here(p) || part_of(units_[u]).empty() ||
            batched_[u])
          continue;
        (side_by_side(part_of(units_[u])) ? spread_ : ready_).push_back(u);
      }
    for (std::size_t c = 0; c < chunks_.size(); ++c) spread_.push_back(units_.size() + c);
    const auto task = [&](std::size_t i, int worker) {
      const std::size_t t = spread_[i];
      if (t < units_.size())
        run_matrix(t, workers_[static_cast<std::size_t>(worker)]);
      else
        run_chunk(chunks_[t - units_.size()]);
    };
    if constexpr (RunsSideBySide<B>) {
      if (!spread_.empty())  // even one matrix: its products then round as side by side
        backend_.side_by_side(spread_.size(), task);
    } else {
      for (std::size_t i = 0; i < spread_.size(); ++i) task(i, 0);
    }
    for (std::size_t u : ready_) run_matrix(u, workers_[0]);
    if (matrices) run_batches();
  }

  /// One matrix through its rule, resolved once here: the Newton-Schulz input, Newton-Schulz,
  /// the finiteness check, apply.
  void run_matrix(std::size_t u, Worker& w) {
    rules::All::visit(params_[units_[u].param].rule, [&](auto rule) {
      using R = decltype(rule);
      if constexpr (R::orthogonalizes) {
        const Param& p = params_[units_[u].param];
        const Part& part = part_of(units_[u]);
        const View in = w.ns.input(backend_, part.rows, part.cols);
        const View saved = backend_.view(w.saved, part.rows, part.cols);
        prepare_input<R>(u, in, saved);
        const ConstView o = w.ns.run(backend_, part.rows, part.cols, schedule<R>(p),
                                     R::options(groups_[p.group].options).newton_schulz,
                                     options_.telemetry ? &outcomes_[u].ns : nullptr);
        finish_matrix<R>(u, o, saved, scratch<R>(w.scratch, part));
      }
    });
  }

  /// Writes matrix u's Newton-Schulz input into `in`: its momentum step here (its momentum
  /// kept in `saved` while the step is checked), or what the exchange gathered (zero1).
  template <class R>
  void prepare_input(std::size_t u, View in, View saved) {
    Param& p = params_[units_[u].param];
    const Part& part = p.parts[units_[u].part];
    Derived& d = self();
    if (after_exchange()) {
      if constexpr (Derived::exchanges) d.gathered_input(p, part, in);
      return;
    }
    const Piece mine = d.piece(p);
    const View m = part_view(state_views<R>(p, mine)[0], part, mine.row0, mine.col0);
    if (checked()) backend_.copy(ConstView(m), saved);
    R::accumulate(backend_, m, part_view(d.gradient(p), part, mine.row0, mine.col0), in,
                  R::options(groups_[p.group].options));
  }

  /// Matrix u's Newton-Schulz result `o`: checked unless already `known_finite` (a non-finite
  /// one leaves the matrix and its momentum, put back from `saved`, as they were), applied
  /// (with the rule's state per row and its scratch), reported, published.
  template <class R>
  void finish_matrix(std::size_t u, ConstView o, View saved, View scratch, bool known_finite = false) {
    Param& p = params_[units_[u].param];
    const Part& part = p.parts[units_[u].part];
    Outcome& out = outcomes_[u];
    out.ran = true;
    Derived& d = self();
    const auto& options = R::options(groups_[p.group].options);
    if (checked() && !known_finite && !backend_.all_finite(o)) {
      out.refused = true;
      if (after_exchange()) {
        if constexpr (Derived::exchanges) d.restore_momentum(p, part);
      } else {
        const Piece mine = d.piece(p);
        backend_.copy(ConstView(saved), part_view(state_views<R>(p, mine)[0], part, mine.row0, mine.col0));
      }
      return;
    }
    const auto rows = row_views<R>(p, part);
    R::apply(backend_, part_view(p.value, part), o, rows.data(), scratch, options);
    if constexpr (measures_residual<B, T>)
      if (options_.telemetry)
        out.update_rms = R::update_scale(options, part.rows, part.cols) * backend_.frobenius_norm(o) /
                         std::sqrt(static_cast<double>(part.rows) * static_cast<double>(part.cols));
    d.publish(p, &part);
  }

  /// Batching backends (RunsBatched): the same-shape matrices of one group and rule, stacked
  /// in batch_in_, go through Newton-Schulz in one call into batch_out_; then each is finished.
  void run_batches() {
    if constexpr (RunsBatched<B, T>) {
      for (const Batch& b : batches_)
        rules::All::visit(b.rule, [&](auto rule) {
          if constexpr (decltype(rule)::orthogonalizes) run_batch<decltype(rule)>(b);
        });
    }
  }
  template <class R>
  void run_batch(const Batch& b) {
    present_.clear();
    for (std::size_t u : b.units)
      if (params_[units_[u].param].takes_part()) present_.push_back(u);
    if (present_.empty()) return;
    const index_t size = b.rows * b.cols;
    const auto slot = [&](Buffer& buf, std::size_t i) {
      return View(backend_.view(buf, 1, size * static_cast<index_t>(b.units.size())).data() +
                      static_cast<index_t>(i) * size,
                  b.rows, b.cols, b.cols, 1);
    };
    for (std::size_t i = 0; i < present_.size(); ++i)
      prepare_input<R>(present_[i], slot(batch_in_, i), slot(batch_saved_, i));
    const Param& first = params_[units_[present_[0]].param];
    const NewtonSchulzOptions& ns = R::options(groups_[first.group].options).newton_schulz;
    backend_.newton_schulz_stack(ConstView(slot(batch_in_, 0)), size, slot(batch_out_, 0), size,
                                 static_cast<index_t>(present_.size()), schedule<R>(first),
                                 ns.schedule.norm_scale(), ns.eps, ns.method);
    // One verdict for the whole stack where the backend can give one (on a GPU, one host
    // read); matrices are checked one by one only when it finds a NaN or Inf.
    bool all_finite = false;
    if constexpr (ScansFiniteTogether<B, T>)
      if (checked()) {
        backend_.begin_finite_scan();
        backend_.scan_finite(ConstView(backend_.view(batch_out_, 1, size * static_cast<index_t>(present_.size()))));
        all_finite = backend_.end_finite_scan();
      }
    const View scratch = this->scratch<R>(workers_[0].scratch, part_of(units_[present_[0]]));
    for (std::size_t i = 0; i < present_.size(); ++i)
      finish_matrix<R>(present_[i], ConstView(slot(batch_out_, i)), slot(batch_saved_, i), scratch,
                       all_finite);
  }

  /// The refusals of the matrices run here (units_ lists a parameter's matrices together).
  Tally local_tally() const {
    Tally t;
    std::size_t last = std::numeric_limits<std::size_t>::max();
    for (std::size_t u = 0; u < units_.size(); ++u) {
      if (!outcomes_[u].refused || units_[u].param == last) continue;
      last = units_[u].param;
      t.first = std::min(t.first, last);
      ++t.refused;
    }
    return t;
  }

  StepReport finish(std::size_t updated, const Tally& tally) {
    StepReport report{true, updated - tally.refused, {}, tally.refused, {}};
    if (options_.telemetry)
      for (std::size_t u = 0; u < units_.size(); ++u)
        if (outcomes_[u].ran && !outcomes_[u].refused)
          report.newton_schulz.push_back({ParamId{units_[u].param}, outcomes_[u].ns.residual,
                                          outcomes_[u].update_rms, outcomes_[u].ns.steps,
                                          units_[u].part});
    if (tally.refused == 0) return report;
    const Param& p = params_[tally.first];
    report.skipped_because = p.name;
    if (options_.non_finite == NonFinitePolicy::skip) return report;
    throw NonFiniteUpdate("muon: the Newton-Schulz result of parameter '" + p.name + "' (" +
                              shape_string(p.shape) +
                              ") is not finite (its momentum overflowed?); that matrix and its "
                              "momentum were left as they were, the others took this step",
                          p.name);
  }

  std::vector<Watch> watches_;        // OptimizerOptions::watch_storage
  std::vector<Unit> units_;           // every matrix of the orthogonalizing rules, in order
  std::vector<std::size_t> order_;    // units_, costliest first
  std::vector<Outcome> outcomes_;     // per unit, this step
  std::vector<std::size_t> ready_;    // this step's units for worker 0 (capacity reserved)
  std::vector<std::size_t> spread_;   // this step's tasks side by side: units, then chunks_
  std::vector<Chunk> chunks_;         // this step's elementwise chunks (capacity reserved)
  std::vector<Batch> batches_;
  std::vector<char> batched_;             // per unit: runs in a batch
  std::vector<std::size_t> present_;      // a batch's units taking part this step (reserved)
  Buffer batch_in_, batch_out_, batch_saved_;
};

// Out of the class body, so not implicitly inline: where a translation unit declares the
// optimizer's instantiation extern (MUON_COMPILED, muon/eigen.hpp), g++ then leaves step()
// and everything it calls to the compiled library instead of compiling them again.
template <class Derived, class B, class T, class ParamExtra>
StepReport OptimizerCore<Derived, B, T, ParamExtra>::step() {
  const auto entered = enter("step");
  check_watched_storage();
  Derived& d = self();
  d.prepare_step();
  const Param* bad = first_nonfinite_grad();
  if (d.refused_together(bad)) return d.refuse(bad);
  d.reduce_gradients();
  std::size_t updated = 0;
  chunks_.clear();
  for (std::size_t i = 0; i < params_.size(); ++i) {
    Param& p = params_[i];
    if (!p.takes_part()) continue;
    ++updated;
    if (!rules::All::orthogonalizes(p.rule)) {
      queue_elementwise(i);
      continue;
    }
    if constexpr (Derived::exchanges) {  // zero1: this rank's slice of U goes to the others
      const Piece mine = d.piece(p);
      if (!d.orthogonalizes_after_exchange() || mine.empty()) continue;
      rules::All::visit(p.rule, [&](auto rule) {
        using R = decltype(rule);
        if constexpr (R::orthogonalizes) {
          const View m = state_views<R>(p, mine)[0];
          if (checked()) backend_.copy(ConstView(m), d.saved_piece(p));
          R::accumulate(backend_, m, d.gradient(p), d.exchange_input(p),
                        R::options(groups_[p.group].options));
        }
      });
    }
  }
  // The elementwise pieces, and the matrices whose inputs are here (not zero1's), together.
  const bool after = after_exchange();
  run_tasks(!after);
  for (Param& p : params_)
    if (p.takes_part() && !rules::All::orthogonalizes(p.rule)) {
      ++p.updates;
      d.publish(p, nullptr);
    }
  Tally tally = d.exchange(after ? Tally{} : local_tally());
  if (after) {
    chunks_.clear();
    run_tasks(true);
    tally = local_tally();
  }
  ++steps_;
  return finish(updated, tally);
}

}  // namespace detail
}  // namespace muon
