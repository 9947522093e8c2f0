#pragma once
// What every placement of the optimizer shares: parameter groups and their validated options,
// the registered parameters with their gradients and state buffers, the checks, the
// Newton-Schulz workspace and the non-finite scan. muon::Optimizer (one process) and
// muon::ShardedOptimizer (state sharded over a Communicator) are this core plus how they place
// the work: the Optimizer updates every parameter whole; the sharded one updates this rank's
// pieces and exchanges the rest.
//
// Derived provides (and befriends this class and detail::Registrar):
//   ParamId add(std::string, UpdateRule, std::vector<index_t> shape, View, ConstView, GroupId)
//     which calls register_param();
//   bool runs_newton_schulz(const Param&) const
//     whether this process orthogonalizes the parameter, so its workspace must fit it.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"

namespace muon::detail {

/// The per-parameter placement data of an optimizer that updates every parameter whole: none.
struct WholeMatrix {};

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
    groups_.push_back(make_group(options, groups_.size()));
    return {groups_.size() - 1};
  }
  /// Replaces a group's options (e.g. a learning-rate schedule); validated first, and nothing
  /// changes if they are refused.
  void set_group_options(GroupId id, const GroupOptions& options) {
    check_group(id);
    Group group = make_group(options, id.value);
    for (const Param& p : params_)  // a new NS method may need more workspace: size it now
      if (p.group == id.value && self().runs_newton_schulz(p))
        ns_.reserve(backend_, p.value.rows(), p.value.cols(), options.muon.newton_schulz.method);
    groups_[id.value] = std::move(group);
  }
  [[nodiscard]] const GroupOptions& group_options(GroupId id = {}) const {
    check_group(id);
    return groups_[id.value].options;
  }
  [[nodiscard]] std::size_t num_groups() const noexcept { return groups_.size(); }

  // ---- parameters ------------------------------------------------------------------------
  /// Points a parameter at a (new) gradient; it takes part in the next steps again.
  void set_grad(ParamId id, ConstView grad) {
    check_param(id);
    Param& p = params_[id.value];
    check_grad(params_, p.name, p.shape, p.value, grad, id.value);
    p.grad = grad;
    p.has_grad = true;
  }
  /// The parameter has no gradient: step() leaves it and its state alone (no weight decay
  /// either), as torch does for a parameter whose .grad is None, until set_grad().
  void clear_grad(ParamId id) {
    check_param(id);
    params_[id.value].has_grad = false;
  }

  // ---- introspection ---------------------------------------------------------------------
  [[nodiscard]] std::uint64_t step_count() const noexcept { return steps_; }
  [[nodiscard]] std::size_t num_params() const noexcept { return params_.size(); }
  [[nodiscard]] const std::string& name(ParamId id) const { return param(id).name; }
  [[nodiscard]] UpdateRule rule(ParamId id) const { return param(id).rule; }
  [[nodiscard]] B& backend() noexcept { return backend_; }

 protected:
  using Buffer = typename B::template Buffer<T>;
  struct Group {
    GroupOptions options;
    std::vector<Coefficients> schedule;  // resolved once, so step() never allocates
  };
  struct Param : ParamExtra {
    std::string name;
    UpdateRule rule = UpdateRule::muon;
    std::size_t group = 0;
    std::vector<index_t> shape;  // as registered (N-D for flattened weights)
    View value;
    ConstView grad;
    bool has_grad = true;
    Buffer m, v;  // muon: m = momentum; adamw: m, v = first and second moments
    std::uint64_t adam_steps = 0;
    /// Whether step() updates it: it has a gradient and at least one element.
    [[nodiscard]] bool takes_part() const { return has_grad && !value.empty(); }
  };

  OptimizerCore(B backend, OptimizerOptions options, const GroupOptions& defaults)
      : backend_(std::move(backend)), options_(options) {
    add_group(defaults);
  }

  static Group make_group(const GroupOptions& options, std::size_t index) {
    validate(options, "group " + std::to_string(index));
    check_measurable<B, T>(options.muon.newton_schulz, "group " + std::to_string(index));
    return {options,
            options.muon.newton_schulz.schedule.resolve(options.muon.newton_schulz.steps)};
  }

  /// The checks every new parameter passes; appends it (state buffers not yet sized).
  Param& register_param(std::string name, UpdateRule rule, std::vector<index_t> shape,
                        View value, ConstView grad, GroupId group) {
    check_group(group);
    check_new_param(params_, name, shape, value, grad);
    Param p;
    p.name = std::move(name);
    p.rule = rule;
    p.group = group.value;
    p.shape = std::move(shape);
    p.value = value;
    p.grad = grad;
    params_.push_back(std::move(p));
    return params_.back();
  }

  /// The first parameter taking part whose gradient holds a NaN or Inf; none when unchecked.
  /// One verdict for all gradients where the backend can (ScansFiniteTogether); the per-
  /// parameter scan then runs only to name the culprit.
  [[nodiscard]] const Param* first_nonfinite_grad() {
    if (options_.non_finite == NonFinitePolicy::unchecked) return nullptr;
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

  static std::size_t buffer_count(UpdateRule rule) { return rule == UpdateRule::muon ? 1 : 2; }
  static std::vector<Buffer*> state_buffers(Param& p) {
    if (p.rule == UpdateRule::muon) return {&p.m};
    return {&p.m, &p.v};
  }
  static std::string describe(std::uint8_t rule) {
    return rule == 0 ? "muon" : rule == 1 ? "adamw" : "rule " + std::to_string(rule);
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
  NewtonSchulzWorkspace<B, T> ns_;
  std::uint64_t steps_ = 0;

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
};

}  // namespace muon::detail
