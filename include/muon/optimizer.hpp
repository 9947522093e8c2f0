#pragma once
// muon::Optimizer<Backend, Scalar>: Muon for hidden weight matrices and AdamW for everything
// else, behind one step().
//
// Muon (K. Jordan et al. 2024; torch.optim.Muon semantics), per matrix W with gradient G:
//   M <- mu M + (1 - mu) G                 (MomentumForm::ema; ::sum is M <- mu M + G)
//   U <- (1 - mu) G + mu M  if nesterov    (::sum: U <- G + mu M), else U <- M
//   O <- NewtonSchulz(U)                   (algorithm/newton_schulz.hpp)
//   W <- W (1 - lr wd) - lr s(rows, cols) O   (decoupled decay once, unscaled lr; ScaleMode)
// AdamW (Loshchilov & Hutter 2019; torch.optim.AdamW semantics) for parameters routed to it.
//
// Routing is explicit: add_muon() for 2-D (or flattened N-D) hidden weights; add_adamw() for
// embeddings, output heads, biases and norm gains (Moonlight, arXiv:2502.16982).
// Parameters and gradients are views of the caller's memory (muon::view adapts Eigen and user
// types); the optimizer reads gradients, never writes them, and owns only its state.
//
// State file (save_state / load_state), little-endian:
//   magic "\x89MUON\r\n\x1a" | u32 version (1) | u32 scalar bytes | u64 steps | u64 params |
//   per parameter: u8 rule (0 muon, 1 adamw) | u64 len, name | u64 rows | u64 cols |
//                  u64 adamw steps | muon: M | adamw: m, v   (rows*cols scalars each) |
//   u64 FNV-1a checksum of all of the above.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/algorithm/shape_scale.hpp"
#include "muon/core/adapter.hpp"
#include "muon/core/backend.hpp"
#include "muon/serialize.hpp"

namespace muon {

struct GroupId {
  std::size_t value = 0;
};
struct ParamId {
  std::size_t value = 0;
};

/// What a step() did.
struct StepReport {
  bool applied = true;             ///< false when NonFinitePolicy::skip refused the step
  std::size_t updated = 0;         ///< parameters updated (those with a gradient)
  std::string skipped_because;     ///< the parameter whose gradient was not finite
};

enum class UpdateRule : std::uint8_t { muon = 0, adamw = 1 };

template <class B, class T>
class Optimizer {
  static_assert(SupportedScalar<T>,
                "muon::Optimizer<Backend, Scalar>: Scalar must be float or double; complex and "
                "integer parameters are not supported.");
  static_assert(Backend<B, T>,
                "muon::Optimizer<Backend, Scalar>: Backend does not provide, for this Scalar, "
                "the operations listed by the muon::Backend concept in muon/core/backend.hpp.");

 public:
  using backend_type = B;
  using scalar_type = T;
  using Space = typename B::memory_space;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;

  /// `defaults` become group 0, the group parameters join unless told otherwise.
  explicit Optimizer(GroupOptions defaults = {}, OptimizerOptions options = {}, B backend = B{})
      : backend_(std::move(backend)), options_(options) {
    add_group(defaults);
  }

  // ---- groups ----------------------------------------------------------------------------
  GroupId add_group(const GroupOptions& options) {
    groups_.push_back(make_group(options, groups_.size()));
    return {groups_.size() - 1};
  }
  /// Replaces a group's options (e.g. a learning-rate schedule); validated first.
  void set_group_options(GroupId id, const GroupOptions& options) {
    check_group(id);
    Group group = make_group(options, id.value);
    for (const Param& p : params_)  // a new NS method may need more workspace: size it now
      if (p.group == id.value && p.rule == UpdateRule::muon)
        ns_.reserve(backend_, p.value.rows(), p.value.cols(),
                    options.muon.newton_schulz.method);
    groups_[id.value] = std::move(group);
  }
  [[nodiscard]] const GroupOptions& group_options(GroupId id = {}) const {
    check_group(id);
    return groups_[id.value].options;
  }
  [[nodiscard]] std::size_t num_groups() const noexcept { return groups_.size(); }

  // ---- parameters ------------------------------------------------------------------------
  /// A weight matrix updated by Muon.
  ParamId add_muon(std::string name, View param, ConstView grad, GroupId group = {}) {
    return add(std::move(name), UpdateRule::muon, {param.rows(), param.cols()}, param, grad,
               group);
  }
  /// An N-D weight (N >= 2, dense row-major, e.g. a conv kernel out x in x kh x kw), updated
  /// by Muon as the (shape[0], product of the rest) matrix.
  ParamId add_muon(std::string name, TensorView<T, Space> param, TensorView<const T, Space> grad,
                   GroupId group = {}) {
    if (param.shape.size() < 2)
      throw InvalidArgument("muon: parameter '" + name + "' (" +
                            detail::shape_string(param.shape) +
                            ") has fewer than 2 dimensions; Muon is for matrices, route it to "
                            "AdamW with add_adamw()");
    if (grad.shape != param.shape)
      throw InvalidArgument("muon: parameter '" + name + "' (" +
                            detail::shape_string(param.shape) + "): gradient has shape " +
                            detail::shape_string(grad.shape));
    return add(std::move(name), UpdateRule::muon, param.shape, param.flattened(),
               grad.flattened(), group);
  }
  /// A parameter updated by AdamW (any shape; vectors are 1 x n or n x 1 views).
  ParamId add_adamw(std::string name, View param, ConstView grad, GroupId group = {}) {
    return add(std::move(name), UpdateRule::adamw, {param.rows(), param.cols()}, param, grad,
               group);
  }
  ParamId add_adamw(std::string name, TensorView<T, Space> param,
                    TensorView<const T, Space> grad, GroupId group = {}) {
    if (grad.shape != param.shape)
      throw InvalidArgument("muon: parameter '" + name + "' (" +
                            detail::shape_string(param.shape) + "): gradient has shape " +
                            detail::shape_string(grad.shape));
    return add(std::move(name), UpdateRule::adamw, param.shape, param.flattened(),
               grad.flattened(), group);
  }
  /// Any adapted tensor types (Eigen objects, your own through muon::view).
  template <ViewableMatrix P, ViewableMatrix G>
  ParamId add_muon(std::string name, P& param, const G& grad, GroupId group = {}) {
    return add_muon(std::move(name), as_param(param), as_grad(grad), group);
  }
  template <ViewableMatrix P, ViewableMatrix G>
  ParamId add_adamw(std::string name, P& param, const G& grad, GroupId group = {}) {
    return add_adamw(std::move(name), as_param(param), as_grad(grad), group);
  }

  /// Points a parameter at a (new) gradient; it takes part in the next steps again.
  void set_grad(ParamId id, ConstView grad) {
    check_param(id);
    Param& p = params_[id.value];
    check_grad(p.name, p.shape, p.value, grad, id.value);
    p.grad = grad;
    p.has_grad = true;
  }
  /// The parameter has no gradient: step() leaves it and its state alone (no weight decay
  /// either), as torch does for a parameter whose .grad is None, until set_grad().
  void clear_grad(ParamId id) {
    check_param(id);
    params_[id.value].has_grad = false;
  }

  // ---- the step --------------------------------------------------------------------------
  /// One optimizer step over every parameter that has a gradient. Gradients are checked for
  /// NaN/Inf first; if one is found nothing is modified (see NonFinitePolicy).
  StepReport step() {
    for (const Param& p : params_) {
      if (!p.has_grad || p.value.empty() || backend_.all_finite(p.grad)) continue;
      if (options_.non_finite == NonFinitePolicy::skip) return {false, 0, p.name};
      throw NonFiniteGradient("muon: step refused: the gradient of parameter '" + p.name + "' (" +
                                  detail::shape_string(p.shape) +
                                  ") contains NaN or Inf; no parameter or state was changed",
                              p.name);
    }
    StepReport report;
    for (Param& p : params_) {
      if (!p.has_grad || p.value.empty()) continue;
      if (p.rule == UpdateRule::muon)
        muon_update(p);
      else
        adamw_update(p);
      ++report.updated;
    }
    ++steps_;
    return report;
  }

  // ---- introspection ---------------------------------------------------------------------
  [[nodiscard]] std::uint64_t step_count() const noexcept { return steps_; }
  [[nodiscard]] std::size_t num_params() const noexcept { return params_.size(); }
  [[nodiscard]] const std::string& name(ParamId id) const { return param(id).name; }
  [[nodiscard]] UpdateRule rule(ParamId id) const { return param(id).rule; }
  /// Muon's momentum buffer M, or AdamW's first moment m, as a dense view.
  [[nodiscard]] ConstView momentum_buffer(ParamId id) {
    check_param(id);
    Param& p = params_[id.value];
    return backend_.view(p.m, p.value.rows(), p.value.cols());
  }
  [[nodiscard]] B& backend() noexcept { return backend_; }

  // ---- state -----------------------------------------------------------------------------
  void save_state(std::ostream& out) {
    detail::StateWriter w;
    w.put_raw(std::string_view(detail::kStateMagic, sizeof detail::kStateMagic));
    w.put<std::uint32_t>(detail::kStateVersion);
    w.put<std::uint32_t>(sizeof(T));
    w.put<std::uint64_t>(steps_);
    w.put<std::uint64_t>(params_.size());
    std::vector<T> host;
    for (Param& p : params_) {
      w.put<std::uint8_t>(static_cast<std::uint8_t>(p.rule));
      w.put_string(p.name);
      w.put<std::uint64_t>(p.value.rows());
      w.put<std::uint64_t>(p.value.cols());
      w.put<std::uint64_t>(p.adam_steps);
      host.resize(static_cast<std::size_t>(p.value.size()));
      for (auto* buf : state_buffers(p)) {
        backend_.copy_to_host(ConstView(backend_.view(*buf, p.value.rows(), p.value.cols())),
                              host.data());
        w.put_array(host.data(), host.size());
      }
    }
    const std::string bytes = w.finish();
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw StateError("muon: save_state: writing the optimizer state failed");
  }

  /// Restores state saved by an optimizer with the same parameters (names, rules, shapes, in
  /// registration order) and Scalar. On any error the optimizer is left exactly as it was.
  void load_state(std::istream& in) {
    const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    detail::StateReader r(bytes);
    if (bytes.size() < sizeof detail::kStateMagic ||
        std::string_view(r.take(8, 1, "magic"), 8) !=
            std::string_view(detail::kStateMagic, sizeof detail::kStateMagic))
      throw StateError("muon: load_state: not a muon optimizer state (bad magic bytes)");
    const auto version = r.get<std::uint32_t>("version");
    if (version != detail::kStateVersion)
      throw StateError("muon: load_state: state format version " + std::to_string(version) +
                       " is not supported (this build reads version " +
                       std::to_string(detail::kStateVersion) + ")");
    if (bytes.size() < 8 + 8 ||
        detail::fnv1a64(std::string_view(bytes).substr(0, bytes.size() - 8)) !=
            detail::StateReader(std::string_view(bytes).substr(bytes.size() - 8))
                .get<std::uint64_t>("checksum"))
      throw StateError("muon: load_state: checksum mismatch: the state is truncated or corrupted");
    const auto scalar = r.get<std::uint32_t>("scalar size");
    if (scalar != sizeof(T))
      throw StateError("muon: load_state: the state holds " + std::to_string(scalar) +
                       "-byte scalars but this optimizer's Scalar has " +
                       std::to_string(sizeof(T)) + " bytes");
    const auto steps = r.get<std::uint64_t>("step count");
    const auto count = r.get<std::uint64_t>("parameter count");
    if (count != params_.size())
      throw StateError("muon: load_state: the state has " + std::to_string(count) +
                       " parameters but this optimizer has " + std::to_string(params_.size()));
    // Pass 1: check every record against the registered parameters; remember where data is.
    struct Record {
      std::uint64_t adam_steps;
      const char* data;
    };
    std::vector<Record> records;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const Param& p = params_[i];
      const auto rule = r.get<std::uint8_t>("rule");
      const std::string name = r.get_string(1 << 20, "parameter name");
      const auto rows = r.get<std::uint64_t>("rows");
      const auto cols = r.get<std::uint64_t>("cols");
      const auto adam_steps = r.get<std::uint64_t>("adamw step count");
      if (rule > 1 || name != p.name || rows != std::uint64_t(p.value.rows()) ||
          cols != std::uint64_t(p.value.cols()))
        throw StateError("muon: load_state: parameter " + std::to_string(i) + " is '" + name +
                         "' (" + describe(rule) + ", " + std::to_string(rows) + "x" +
                         std::to_string(cols) + ") in the state but '" + p.name + "' (" +
                         describe(static_cast<std::uint8_t>(p.rule)) + ", " +
                         detail::shape_string(p.value.rows(), p.value.cols()) +
                         ") in this optimizer");
      const std::size_t n = static_cast<std::size_t>(p.value.size()) * buffer_count(p.rule);
      records.push_back({adam_steps, r.take(n, sizeof(T), "state buffer")});
    }
    if (r.remaining() != 8)
      throw StateError("muon: load_state: " + std::to_string(r.remaining() - 8) +
                       " unexpected bytes after the last parameter");
    // Pass 2: nothing can fail from here on; commit.
    std::vector<T> host;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Param& p = params_[i];
      const auto n = static_cast<std::size_t>(p.value.size());
      host.resize(n);
      const char* src = records[i].data;
      for (auto* buf : state_buffers(p)) {
        detail::from_little_endian(src, n, host.data());
        backend_.copy_from_host(host.data(), backend_.view(*buf, p.value.rows(), p.value.cols()));
        src += n * sizeof(T);
      }
      p.adam_steps = records[i].adam_steps;
    }
    steps_ = steps;
  }

  /// Writes to `path` through a temporary file and a rename, so a crash mid-write never leaves
  /// a half-written checkpoint under the real name.
  void save_state(const std::filesystem::path& path) {
    const std::filesystem::path tmp = path.string() + ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) throw StateError("muon: save_state: cannot open '" + tmp.string() + "'");
      save_state(out);
    }
    std::filesystem::rename(tmp, path);
  }
  void load_state(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw StateError("muon: load_state: cannot open '" + path.string() + "'");
    load_state(in);
  }

 private:
  using Buffer = typename B::template Buffer<T>;

  struct Group {
    GroupOptions options;
    std::vector<Coefficients> schedule;  // resolved once, so step() never allocates
  };
  struct Param {
    std::string name;
    UpdateRule rule;
    std::size_t group;
    std::vector<index_t> shape;  // as registered (N-D for flattened weights)
    View value;
    ConstView grad;
    bool has_grad = true;
    Buffer m, v;  // muon: m = momentum; adamw: m, v = first and second moments
    std::uint64_t adam_steps = 0;
  };

  static Group make_group(const GroupOptions& options, std::size_t index) {
    validate(options, "group " + std::to_string(index));
    return {options,
            options.muon.newton_schulz.schedule.resolve(options.muon.newton_schulz.steps)};
  }

  static std::string describe(std::uint8_t rule) {
    return rule == 0 ? "muon" : rule == 1 ? "adamw" : "rule " + std::to_string(rule);
  }

  template <class P>
  static View as_param(P& param) {
    auto v = muon::view(param);
    using Elem = typename decltype(v)::element_type;
    static_assert(!std::is_const_v<Elem>,
                  "muon: a parameter must be mutable, but this is a view of const elements");
    static_assert(std::is_same_v<Elem, T>,
                  "muon: the parameter's element type differs from the optimizer's Scalar");
    static_assert(std::is_same_v<typename decltype(v)::memory_space, Space>,
                  "muon: the parameter lives in another memory space than the backend's");
    return v;
  }
  template <class G>
  static ConstView as_grad(const G& grad) {
    auto v = muon::view(grad);
    static_assert(std::is_same_v<std::remove_const_t<typename decltype(v)::element_type>, T>,
                  "muon: the gradient's element type differs from the optimizer's Scalar");
    return v;
  }

  static std::size_t buffer_count(UpdateRule rule) { return rule == UpdateRule::muon ? 1 : 2; }
  std::vector<Buffer*> state_buffers(Param& p) {
    if (p.rule == UpdateRule::muon) return {&p.m};
    return {&p.m, &p.v};
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

  /// Shape match, no null data, and no memory shared with a parameter (other than `self`).
  void check_grad(const std::string& name, const std::vector<index_t>& shape, View value,
                  ConstView grad, std::size_t self) const {
    const std::string what = "muon: parameter '" + name + "' (" + detail::shape_string(shape) + ")";
    if (grad.rows() != value.rows() || grad.cols() != value.cols())
      throw InvalidArgument(what + ": gradient has shape " +
                            detail::shape_string(grad.rows(), grad.cols()) + ", expected " +
                            detail::shape_string(value.rows(), value.cols()));
    if (!grad.empty() && grad.data() == nullptr)
      throw InvalidArgument(what + ": gradient data pointer is null");
    if (detail::views_overlap(grad, ConstView(value)))
      throw InvalidArgument(what + ": gradient shares memory with the parameter itself");
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (i != self && detail::views_overlap(grad, ConstView(params_[i].value)))
        throw InvalidArgument(what + ": gradient shares memory with parameter '" +
                              params_[i].name + "', which step() writes");
  }

  ParamId add(std::string name, UpdateRule rule, std::vector<index_t> shape, View value,
              ConstView grad, GroupId group) {
    check_group(group);
    const std::string what = "muon: parameter '" + name + "' (" + detail::shape_string(shape) + ")";
    if (name.empty()) throw InvalidArgument("muon: parameter name must not be empty");
    for (index_t e : shape)
      if (e < 0) throw InvalidArgument(what + ": negative extent");
    if (!value.empty() && value.data() == nullptr)
      throw InvalidArgument(what + ": parameter data pointer is null");
    for (const Param& p : params_) {
      if (p.name == name)
        throw InvalidArgument(what + ": a parameter named '" + name + "' is already registered");
      if (detail::views_overlap(ConstView(value), ConstView(p.value)))
        throw InvalidArgument(what + ": shares memory with parameter '" + p.name + "' (" +
                              detail::shape_string(p.shape) +
                              "); is the same parameter registered twice?");
      if (p.has_grad && detail::views_overlap(ConstView(value), p.grad))
        throw InvalidArgument(what + ": shares memory with the gradient of '" + p.name + "'");
    }
    check_grad(name, shape, value, grad, params_.size());

    Param p{std::move(name), rule, group.value, std::move(shape), value, grad, true, {}, {}, 0};
    backend_.resize(p.m, value.size());
    if (rule == UpdateRule::adamw) backend_.resize(p.v, value.size());
    if (rule == UpdateRule::muon)
      ns_.reserve(backend_, value.rows(), value.cols(),
                  groups_[group.value].options.muon.newton_schulz.method);
    params_.push_back(std::move(p));
    return {params_.size() - 1};
  }

  void muon_update(Param& p) {
    const Group& g = groups_[p.group];
    const MuonOptions& o = g.options.muon;
    const index_t rows = p.value.rows(), cols = p.value.cols();
    backend_.momentum(backend_.view(p.m, rows, cols), p.grad, ns_.input(backend_, rows, cols),
                      MomentumStep{o.momentum, o.momentum_form, o.nesterov});
    const ConstView update =
        ns_.run(backend_, rows, cols, g.schedule, o.newton_schulz.schedule.norm_scale(),
                o.newton_schulz.eps, o.newton_schulz.method);
    backend_.apply_update(p.value, update, 1 - o.lr * o.weight_decay,
                          o.lr * shape_scale(o.scale, rows, cols, o.rms_factor));
  }

  void adamw_update(Param& p) {
    const AdamWOptions& o = groups_[p.group].options.adamw;
    ++p.adam_steps;
    const double t = static_cast<double>(p.adam_steps);
    const double bias1 = 1 - std::pow(o.beta1, t), bias2 = 1 - std::pow(o.beta2, t);
    const index_t rows = p.value.rows(), cols = p.value.cols();
    backend_.adamw(p.value, p.grad, backend_.view(p.m, rows, cols), backend_.view(p.v, rows, cols),
                   AdamWStep{1 - o.lr * o.weight_decay, o.beta1, o.beta2, o.eps, o.lr / bias1,
                             std::sqrt(bias2)});
  }

  B backend_;
  OptimizerOptions options_;
  std::vector<Group> groups_;
  std::vector<Param> params_;
  NewtonSchulzWorkspace<B, T> ns_;
  std::uint64_t steps_ = 0;
};

}  // namespace muon
