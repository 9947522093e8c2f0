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
// hooks of the Placement concept (driver/placement.hpp, which lists them). This header holds
// the class, its bookkeeping (groups, registration, gradients, state buffers) and its
// declarations; the rest is defined out of the class body, by concern: driver/planning.hpp
// (the plan of a step's work), driver/batching.hpp (stacked Newton-Schulz), driver/step.hpp
// (the step protocol; it includes the other two) and driver/state_file.hpp (save_state,
// load_state). A placement's header includes step.hpp and state_file.hpp.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <istream>
#include <limits>
#include <ostream>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/algorithm/shape_scale.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/parts.hpp"
#include "muon/core/qk_clip.hpp"
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
                          ///< match_rms_adamw when O is orthogonal); weight decay not included;
                          ///< NaN for a rule whose step also scales with the matrix (PolarGrad)
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

/// True for an optimizer a library compiles (the compiled mode, muon/eigen.hpp): registering a
/// parameter there compiles no rule's step, the library has every rule's.
template <class Derived>
inline constexpr bool compiled_elsewhere = false;

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
    for (const Param& p : params_)
      if (p.group == id.value && matrix_state_size(p, options) != matrix_state_size(p))
        throw InvalidArgument("muon: set_group_options (group " + std::to_string(id.value) +
                              "): the new " + rules::All::describe(static_cast<std::uint8_t>(p.rule)) +
                              " options would resize the state of parameter '" + p.name + "' (" +
                              shape_string(p.shape) +
                              "), which is fixed once it is registered (NorMuonOptions::"
                              "convention: per row or per column); nothing was changed");
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
    const std::size_t clips = clips_.size();
    auto units = units_;  // the plan as it is (copied first: restoring it cannot fail)
    auto order = order_;
    auto outcomes = outcomes_;
    auto batches = batches_;
    auto batched = batched_;
    auto norm_slot = norm_slot_;
    auto zero_slots = zero_slots_;
    try {
      std::forward<F>(add_some)();
    } catch (...) {
      params_.erase(params_.begin() + static_cast<std::ptrdiff_t>(before), params_.end());
      std::erase_if(watches_, [&](const Watch& w) { return w.param >= before; });
      clips_.resize(clips);
      units_.swap(units), order_.swap(order), outcomes_.swap(outcomes);
      batches_.swap(batches), batched_.swap(batched), norm_slot_.swap(norm_slot);
      zero_slots_.swap(zero_slots);
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

  // ---- QK-clip (core/qk_clip.hpp says what it does) ---------------------------------------
  /// Registers one attention layer's query and key heads (the same parameter for a fused QKV)
  /// for clip_qk(). Sharded: on every rank, in the same order.
  QkClipId add_qk_clip(ParamId query, ParamId key, AttentionHeads heads, QkClipOptions options = {}) {
    const auto entered = enter("add_qk_clip");
    const std::string what = "muon: add_qk_clip (clip " + std::to_string(clips_.size()) + ")";
    check_qk_clip(heads, options, what);
    const Param& q = param(query);
    const Param& k = param(key);
    const auto extent = [&](const Param& p) { return heads.axis == 0 ? p.value.rows() : p.value.cols(); };
    std::vector<std::pair<index_t, index_t>> in_q, in_k;
    for (index_t first : heads.query) in_q.emplace_back(first, first + heads.head_dim);
    for (index_t first : heads.key) (query.value == key.value ? in_q : in_k).emplace_back(first, first + heads.head_dim);
    check_head_blocks(std::move(in_q), extent(q), what + ", heads of '" + q.name + "' (" + shape_string(q.shape) + ")");
    check_head_blocks(std::move(in_k), extent(k), what + ", key heads of '" + k.name + "' (" + shape_string(k.shape) + ")");
    clips_.push_back({query.value, key.value, std::move(heads), options, 0});
    clips_.back().fingerprint = clip_fingerprint(clips_.back());
    return {clips_.size() - 1};
  }
  /// Rescales the heads of clip `id` whose largest pre-softmax logit in the last forward pass
  /// (one per query head, `max_logits`) exceeded the threshold; call it after step(). Sharded:
  /// collective; each rank hands its own maxima and the largest over the ranks counts. A
  /// wrong count or a NaN or +Inf logit (on any rank) is refused and nothing changes.
  QkClipReport clip_qk(QkClipId id, std::span<const double> max_logits) {
    const auto entered = enter("clip_qk");
    std::string error;
    if (id.value >= clips_.size())
      error = "muon: clip_qk: no QK-clip with id " + std::to_string(id.value) + " (have " +
              std::to_string(clips_.size()) + ")";
    const Clip* c = error.empty() ? &clips_[id.value] : nullptr;
    std::vector<double> group_max(c ? c->heads.groups() : 0, -std::numeric_limits<double>::infinity());
    if (c && max_logits.size() != c->heads.query.size())
      error = "muon: clip_qk (clip " + std::to_string(id.value) + "): " +
              std::to_string(max_logits.size()) + " logits for " +
              std::to_string(c->heads.query.size()) + " query heads";
    for (std::size_t h = 0; error.empty() && h < max_logits.size(); ++h) {
      const double s = max_logits[h];
      if (std::isnan(s) || s == std::numeric_limits<double>::infinity())
        error = "muon: clip_qk (clip " + std::to_string(id.value) + "): the logit of query head " +
                std::to_string(h) + " is " + std::to_string(s) + "; nothing was rescaled";
      else
        group_max[c->heads.group_of(h)] = std::max(group_max[c->heads.group_of(h)], s);
    }
    if (self().agree_on_maxima(group_max, !error.empty(), c ? c->fingerprint : 0))
      throw InvalidArgument(error.empty() ? "muon: clip_qk: another rank refused it; nothing was rescaled" : error);
    QkClipReport report;
    const double tau = c->options.threshold;
    for (std::size_t g = 0; g < group_max.size(); ++g) {
      report.max_logit = std::max(report.max_logit, group_max[g]);
      if (!(group_max[g] > tau)) continue;
      const double eta = tau / group_max[g];
      ++report.clipped;
      report.min_eta = std::min(report.min_eta, eta);
      const T on_query = static_cast<T>(clip_factor(eta, c->options.alpha));
      for (std::size_t h = 0; h < c->heads.query.size(); ++h)
        if (c->heads.group_of(h) == g) backend_.scale(head_block(c->query, c->heads, c->heads.query[h]), on_query);
      if (!c->heads.key.empty())
        backend_.scale(head_block(c->key, c->heads, c->heads.key[g]),
                       static_cast<T>(clip_factor(eta, 1 - c->options.alpha)));
    }
    return report;
  }
  /// The same for single-precision logits.
  QkClipReport clip_qk(QkClipId id, std::span<const float> max_logits) {
    const std::vector<double> wide(max_logits.begin(), max_logits.end());
    return clip_qk(id, std::span<const double>(wide));
  }
  [[nodiscard]] std::size_t num_qk_clips() const noexcept { return clips_.size(); }
  /// The query and key parameters a clip rescales.
  [[nodiscard]] std::pair<ParamId, ParamId> qk_clip_params(QkClipId id) const {
    if (id.value >= clips_.size())
      throw InvalidArgument("muon: no QK-clip with id " + std::to_string(id.value) + " (have " +
                            std::to_string(clips_.size()) + ")");
    return {ParamId{clips_[id.value].query}, ParamId{clips_[id.value].key}};
  }

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
    /// The rule's buffers per matrix (Part::state_at says where each matrix's elements start),
    /// where its matrices are orthogonalized.
    std::array<Buffer, rules::All::max_matrix_buffers> matrix_state;
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
    const char* matrices;  // its buffers per matrix, if its rule has any
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
  [[nodiscard]] const Param* first_nonfinite_grad();

  /// Rule R's state buffers of p as dense views over a piece.
  template <class R>
  std::array<View, R::buffers> state_views(Param& p, const Piece& piece) {
    std::array<View, R::buffers> v{};
    std::size_t i = 0;
    for (View& buffer : v) buffer = backend_.view(p.state[i++], piece.rows, piece.cols);
    return v;
  }
  /// Sizes a parameter's state buffers for its piece, and its state per matrix where its
  /// matrices are orthogonalized (zeros).
  void size_state(Param& p, index_t elements) {
    for (std::size_t i = 0; i < rules::All::buffers(p.rule); ++i)
      backend_.resize(p.state[i], elements);
    const index_t n = matrix_state_size(p);
    for (std::size_t i = 0; i < rules::All::matrix_buffers(p.rule); ++i)
      backend_.resize(p.matrix_state[i], n);
  }
  /// The length of each of p's buffers per matrix held here: all its matrices' elements where
  /// they are orthogonalized, else 0.
  index_t matrix_state_size(const Param& p) { return matrix_state_size(p, groups_[p.group].options); }
  index_t matrix_state_size(const Param& p, const GroupOptions& options) {
    if (rules::All::matrix_buffers(p.rule) == 0 || !self().orthogonalizes_here(p)) return 0;
    index_t n = 0;
    for (const Part& part : p.parts)
      n += rules::All::matrix_state_elements(p.rule, part.rows, part.cols, options);
    return n;
  }
  /// A matrix's elements of rule R's buffers per matrix, each as a column (elements x 1).
  template <class R>
  std::array<View, matrix_buffers_of<R>()> matrix_views(Param& p, const Part& part) {
    std::array<View, matrix_buffers_of<R>()> v{};
    std::size_t i = 0;  // (a range-for: no comparison with a size that may be 0)
    for (View& buffer : v) {
      const View all = backend_.view(p.matrix_state[i], 1, static_cast<index_t>(p.matrix_state[i].size()));
      buffer = View(all.data() + part.state_at,
                    matrix_state_of<R>(part.rows, part.cols, R::options(groups_[p.group].options)), 1, 1, 1);
      ++i;
    }
    return v;
  }
  /// The rule's apply() scratch for a matrix, in a worker's buffer.
  template <class R>
  View scratch(Buffer& buf, const Part& part) {
    return backend_.view(buf, 1, muon::detail::scratch_of<R>(part.rows, part.cols));
  }
  /// Whether rule R reads each matrix's ||G||_F^2 (observe_gradient_norm: NAMO).
  template <class R>
  static constexpr bool reads_gradient_norm =
      requires(B& b, ConstView c, View v, const typename R::Options& o) {
        R::observe_gradient_norm(b, c, v, o);
      };
  /// Hands matrix u's Newton-Schulz input, and its gradient's squared norm, to its rule, for a
  /// rule that reads them in apply() (observe_input, observe_gradient_norm: each writes only
  /// the rule's scratch).
  template <class R>
  void observe(std::size_t u, ConstView in, View scratch) {
    const auto& options = R::options(groups_[params_[units_[u].param].group].options);
    if constexpr (reads_gradient_norm<R>)
      R::observe_gradient_norm(backend_, gradient_norm(u), scratch, options);
    if constexpr (requires { R::observe_input(backend_, in, scratch, options); })
      R::observe_input(backend_, in, scratch, options);
  }
  /// Matrix u's ||G||_F^2 as measured this step (1 x 1, in the backend's memory).
  ConstView gradient_norm(std::size_t u) {
    return ConstView(backend_.view(gradient_norms_, 1, static_cast<index_t>(gradient_norms_.size())).data() +
                         norm_slot_[u],
                     1, 1, 1, 1);
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
  void plan();

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

  /// Makes the step of rule Id's parameters ready: called by every registration before
  /// add_param, so that a program compiles the steps of the rules it registers and no other.
  template <UpdateRule Id, bool Elsewhere = compiled_elsewhere<Derived>>
  void use_rule() {
    if constexpr (Elsewhere) {
      use_every_rule();
    } else {
      rules::All::for_each([&](auto rule) {
        if constexpr (decltype(rule)::id == Id) use<decltype(rule)>();
      });
    }
  }
  /// Every listed rule's step (the compiled mode's library compiles this one; defined out of
  /// the class, so not inline, which g++ would compile again where it is declared extern).
  void use_every_rule();
  template <class R>
  void use() {
    RuleWork& w = work_[rules::All::index_of<R>()];
    if constexpr (R::orthogonalizes) {
      w.matrix = &OptimizerCore::run_matrix_of<R>;
      if constexpr (RunsBatched<B, T>) w.batch = &OptimizerCore::run_batch<R>;
      if constexpr (Derived::exchanges) w.exchange_input = &OptimizerCore::exchange_input_of<R>;
    } else {
      w.chunk = &OptimizerCore::run_chunk_of<R>;
    }
  }

  ParamId add_param(std::string name, UpdateRule rule, std::vector<index_t> shape, View value,
                    ConstView grad, GroupId group, const std::vector<Part>& parts) {
    const auto entered = enter("add");
    if (const RuleWork& w = work_[rules::All::index(rule)]; !w.matrix && !w.chunk)
      throw std::logic_error("muon: internal: a registration did not call use_rule() for " +
                             rules::All::describe(static_cast<std::uint8_t>(rule)));
    check_group(group);
    check_new_param(params_, name, shape, value, grad);
    Param p;
    p.name = std::move(name);
    p.rule = rule;
    p.group = group.value;
    p.shape = std::move(shape);
    p.value = value;
    p.grad = grad;
    if (rules::All::orthogonalizes(rule)) {
      p.parts = parts;
      index_t at = 0;
      for (Part& part : p.parts) {
        part.state_at = at;
        at += rules::All::matrix_state_elements(rule, part.rows, part.cols, groups_[group.value].options);
      }
    }
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

  /// One registered QK-clip: its parameters (by index) and heads.
  struct Clip {
    std::size_t query, key;
    AttentionHeads heads;
    QkClipOptions options;
    std::uint64_t fingerprint;  // what the ranks compare before a sharded clip_qk
  };
  /// What the ranks must agree on before a sharded clip_qk: the clip's registration.
  static std::uint64_t clip_fingerprint(const Clip& c) {
    StateWriter w;
    const auto heads = [&w](const std::vector<index_t>& firsts) {
      w.put<std::uint64_t>(firsts.size());
      for (index_t first : firsts) w.put<std::int64_t>(first);
    };
    w.put<std::uint64_t>(c.query);
    w.put<std::uint64_t>(c.key);
    heads(c.heads.query);
    heads(c.heads.key);
    w.put<std::int64_t>(c.heads.head_dim);
    w.put<std::int32_t>(c.heads.axis);
    w.put<double>(c.options.threshold);
    w.put<double>(c.options.alpha);
    return fnv1a64(w.finish());
  }
  /// A head's head_dim rows (or columns) from `first` of a parameter's flattened matrix.
  View head_block(std::size_t param, const AttentionHeads& heads, index_t first) const {
    const View v = params_[param].value;
    return heads.axis == 0 ? v.block(first, 0, heads.head_dim, v.cols())
                           : v.block(0, first, v.rows(), heads.head_dim);
  }

  const Part& part_of(const Unit& u) const { return params_[u.param].parts[u.part]; }

  /// Batching backends: the matrices this process runs, by shape and group, in stacks of two
  /// or more (a stack's matrices share Newton-Schulz options; a tolerance or telemetry, which
  /// need one matrix at a time, keep a group out), and room for the largest stack.
  void plan_batches(const std::vector<Unit>& units);
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
  void queue_elementwise(std::size_t i);

  /// One step of an elementwise rule on rows of this process's piece of a parameter (its
  /// step count moves once, after all its chunks).
  void run_chunk(const Chunk& c);

  /// Runs the queued elementwise chunks and, with `matrices`, every matrix of the
  /// orthogonalizing rules this process orthogonalizes this step: side by side over the
  /// backend's workers those it runs that way (costliest first, the chunks last, filling the
  /// workers' idle time), the others one after the other on worker 0. Which way a matrix goes
  /// depends on its shape only, so its result is the same bits however many others step with
  /// it.
  void run_tasks(bool matrices);

  /// One matrix through its rule (run_matrix_of, found once here): the Newton-Schulz input,
  /// Newton-Schulz, the finiteness check, apply.
  void run_matrix(std::size_t u, Worker& w);
  template <class R>
  void run_matrix_of(std::size_t u, Worker& w);
  template <class R>
  void run_chunk_of(const Chunk& c);
  /// Zero1, before the exchange: p's momentum step on this rank's slice, into the exchange's
  /// input (the momentum kept while the step is checked).
  template <class R>
  void exchange_input_of(Param& p);

  /// Writes matrix u's Newton-Schulz input into `in`: its momentum step here (its momentum
  /// kept in `saved` while the step is checked), or what the exchange gathered (zero1).
  template <class R>
  void prepare_input(std::size_t u, View in, View saved);

  /// Matrix u's Newton-Schulz result `o`: checked unless already `known_finite` (a non-finite
  /// one leaves the matrix and its momentum, put back from `saved`, as they were), applied
  /// (with the rule's state per matrix and its scratch), reported, published.
  template <class R>
  void finish_matrix(std::size_t u, ConstView o, View saved, View scratch, bool known_finite = false);

  /// Batching backends (RunsBatched): the same-shape matrices of one group and rule, stacked
  /// in batch_in_, go through Newton-Schulz in one call into batch_out_; then each is finished.
  void run_batches();
  template <class R>
  void run_batch(const Batch& b);

  /// The refusals of the matrices run here (units_ lists a parameter's matrices together).
  Tally local_tally() const;

  /// ||G||_F^2 of every matrix whose rule reads it (reads_gradient_norm), into its slot of
  /// gradient_norms_: over the block of it held here, then, zero1, summed over the ranks.
  void measure_gradient_norms();

  StepReport finish(std::size_t updated, const Tally& tally);

  /// The step's work of each rule, by its place in rules::All; use_rule() fills a rule's
  /// entry, so only the steps of registered rules are compiled (a parameter's rule is a
  /// run-time id: a switch over the list would compile all of them).
  struct RuleWork {
    void (OptimizerCore::*matrix)(std::size_t, Worker&) = nullptr;  // orthogonalizing rules
    void (OptimizerCore::*batch)(const Batch&) = nullptr;           // RunsBatched backends
    void (OptimizerCore::*exchange_input)(Param&) = nullptr;        // zero1
    void (OptimizerCore::*chunk)(const Chunk&) = nullptr;           // elementwise rules
  };
  const RuleWork& work_of(const Param& p) const { return work_[rules::All::index(p.rule)]; }
  std::array<RuleWork, rules::All::count> work_{};

  std::vector<Watch> watches_;        // OptimizerOptions::watch_storage
  std::vector<Clip> clips_;           // add_qk_clip
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
  /// Per unit whose rule reads ||G||_F^2, its slot in gradient_norms_ (the others: kNoSlot);
  /// after the slots, room for a block's row sums; zeros for the slots, on the host (one per
  /// slot: their count).
  static constexpr std::size_t kNoSlot = std::numeric_limits<std::size_t>::max();
  std::vector<std::size_t> norm_slot_;
  Buffer gradient_norms_;
  std::vector<T> zero_slots_;
};

}  // namespace detail
}  // namespace muon
