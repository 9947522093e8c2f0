#pragma once
// muon::libtorch::Muon: the optimizer as a torch::optim::Optimizer, so a LibTorch program that
// holds a `torch::optim::Optimizer&` (its training loop, torch's LR schedulers, torch::save and
// torch::load) trains with Muon unchanged. Each param group follows one rule of
// muon::rules::All (its Options say which): Muon for the hidden matrices and AdamW for the
// rest, as torch.optim.Muon and Moonlight split a model:
//
//   auto routed = muon::libtorch::route(model->named_parameters());   // hidden matrices: Muon
//   std::cout << routed.table();                                       // every parameter's rule
//   muon::libtorch::Muon opt(routed);
//   torch::optim::StepLR schedule(opt, 100, 0.5);
//   for (...) { opt.zero_grad(); loss(model).backward(); opt.step(); schedule.step(); }
//
// The update is muon::Optimizer's (driver/optimizer_core.hpp) on views of the tensors' memory:
// nothing is copied. Gradients are looked at again in every step(): one that autograd set to
// None (zero_grad with set_to_none, the default in LibTorch 2.x) skips its parameter as torch
// does, one it reallocated is followed to its new storage, so no step reads freed memory.
// A param group added later (add_param_group) joins at the next step(); options changed by a
// scheduler or by hand take effect at the next step(). A parameter without a gradient, or one
// that no longer requires one (frozen), sits the step out untouched, and registration never
// creates a gradient. A param group that holds a tensor the optimizer refuses (another dtype or
// device) registers none of its new parameters: the error names the tensor, and step() works
// again once the group is mended. CPU tensors of float or double here;
// CUDA tensors through the CUDA backend (muon::libtorch::CudaMuon, libtorch_cuda.hpp).
//
// The engine underneath is any placement: muon::Optimizer by default, or a
// muon::ShardedOptimizer for a data-parallel program, one process (or thread) per replica of
// the model, each with its local gradients (muon::libtorch::ShardedMuon): step() averages them
// over the ranks and every replica's parameters end each step alike. Hand the engine over
// made, with its communicator and strategy:
//
//   muon::libtorch::ShardedMuon<muon::MpiCommunicator> opt(
//       routed, muon::ShardedOptimizer<muon::EigenBackend, float, muon::MpiCommunicator>(
//                   muon::MpiCommunicator(MPI_COMM_WORLD), muon::ShardingStrategy::zero1));
// Needs LibTorch (Debian: libtorch-dev); muon itself does not depend on it.
#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include <ATen/Functions.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <map>
#include <iterator>
#include <memory>
#include <optional>
#include <regex>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "muon/adapters/libtorch.hpp"
#include "muon/backend/eigen.hpp"
#include "muon/optimizer.hpp"

namespace muon::libtorch {

/// The options of one param group: the rule its parameters follow and the hyper-parameters
/// (muon::GroupOptions; the part of the group's rule is the one used). get_lr()/set_lr(),
/// which torch's LR schedulers call, read and write that rule's learning rate.
class Options : public torch::optim::OptimizerCloneableOptions<Options> {
 public:
  Options() = default;
  explicit Options(UpdateRule rule, GroupOptions options = {}) : rule_(rule), options_(options) {
    check_rule(rule_, "muon::libtorch::Options");
    validate(options_, "muon::libtorch::Options");
  }
  [[nodiscard]] UpdateRule rule() const noexcept { return rule_; }
  [[nodiscard]] GroupOptions& options() noexcept { return options_; }
  [[nodiscard]] const GroupOptions& options() const noexcept { return options_; }

  [[nodiscard]] double get_lr() const override {
    return rules::All::lr(rule_, options_);
  }
  void set_lr(const double lr) override { rules::All::lr(rule_, options_) = lr; }

  /// Every rule's options under "<rule>.<field>" (muon.lr, adamw.beta2, muon.ns.steps) and each
  /// orthogonalizing rule's schedule under "<rule>.ns.schedule", .norm_scale, .coefficients.
  void serialize(torch::serialize::OutputArchive& archive) const override {
    fields(*this, [&](const std::string& key, const auto& value) {
      using V = std::decay_t<decltype(value)>;
      if constexpr (std::is_same_v<V, double> || std::is_same_v<V, bool>)
        archive.write(key, c10::IValue(value));
      else
        archive.write(key, c10::IValue(static_cast<int64_t>(value)));
    });
    rules::All::for_each([&](auto rule) {
      using R = decltype(rule);
      if constexpr (R::orthogonalizes) {
        const std::string at = std::string(R::name) + ".ns.";
        const NewtonSchulzOptions& ns = R::options(options_).newton_schulz;
        archive.write(at + "schedule", c10::IValue(ns.schedule.name()));
        archive.write(at + "norm_scale", c10::IValue(ns.schedule.norm_scale()));
        std::vector<double> c;
        for (const Coefficients& k : ns.schedule.resolve(ns.steps)) c.insert(c.end(), {k.a, k.b, k.c});
        archive.write(at + "coefficients", c10::IValue(c));
      }
    });
  }
  /// Reads what serialize() wrote. A rule of which the archive holds no field (saved before
  /// the rule existed) keeps its defaults, and so does a field the archive lacks (an option
  /// added since, as torch's optimizers default options new to a loaded state). Archives whose
  /// Newton-Schulz fields have no rule prefix ("ns.steps": written before each rule named its
  /// own) are read as Muon's.
  void serialize(torch::serialize::InputArchive& archive) override {
    Options o;
    o.rule_ = static_cast<UpdateRule>(read(archive, "rule").toInt());
    rules::All::for_each([&](auto rule) {
      using R = decltype(rule);
      const std::string prefix = std::string(R::name) + ".";
      bool any = false;
      R::fields(R::options(o.options_), [&](const char* field, auto&) {
        any = any || find(archive, prefix, field).has_value();
      });
      if (!any) return;
      R::fields(R::options(o.options_), [&](const char* field, auto& value) {
        using V = std::remove_reference_t<decltype(value)>;
        const auto v = find(archive, prefix, field);
        if (!v) return;
        if constexpr (std::is_same_v<V, double>) value = v->toDouble();
        else if constexpr (std::is_same_v<V, bool>) value = v->toBool();
        else value = static_cast<V>(v->toInt());
      });
      if constexpr (R::orthogonalizes) {
        NewtonSchulzOptions& ns = R::options(o.options_).newton_schulz;
        const auto field = [&](const char* name) {
          auto v = find(archive, prefix, std::string("ns.") + name);
          if (!v)
            throw StateError("muon::libtorch::Options: the archive has no '" + prefix + "ns." +
                             name + "'");
          return *v;
        };
        const std::string name = field("schedule").toStringRef();
        if (name == "custom") {
          const std::vector<double> c = field("coefficients").toDoubleVector();
          std::vector<Coefficients> list;
          for (std::size_t i = 0; i + 2 < c.size(); i += 3) list.push_back({c[i], c[i + 1], c[i + 2]});
          ns.schedule = Schedule::custom(std::move(list), field("norm_scale").toDouble());
        } else {
          ns.schedule = Schedule::from_name(name);
        }
      }
    });
    check_rule(o.rule_, "muon::libtorch::Options (from an archive)");
    validate(o.options_, "muon::libtorch::Options (from an archive)");
    *this = std::move(o);
  }

  /// Every option but the schedules, by key ("rule", then "<rule>.<field>"), to f(key, field):
  /// how serialize() and the optimizer's change detection see them.
  template <class O, class F>
  static void fields(O& o, F&& f) {
    f(std::string("rule"), o.rule_);
    rules::All::for_each([&](auto rule) {
      using R = decltype(rule);
      R::fields(R::options(o.options_), [&](const char* field, auto& value) {
        f(std::string(R::name) + "." + field, value);
      });
    });
  }

  /// Whether two options are the same in every field and schedule. Called at every step (a
  /// scheduler's change shows here), so it compares in place: no key, no container.
  friend bool operator==(const Options& a, const Options& b) {
    bool same = a.rule_ == b.rule_;
    rules::All::for_each([&](auto rule) {
      using R = decltype(rule);
      if (same) same = same_fields<R>(R::options(a.options_), R::options(b.options_));
      if constexpr (R::orthogonalizes) {
        const NewtonSchulzOptions& x = R::options(a.options_).newton_schulz;
        const NewtonSchulzOptions& y = R::options(b.options_).newton_schulz;
        same = same && same_schedule(x.schedule, y.schedule);
      }
    });
    return same;
  }

 private:
  /// Walks a's fields, then b's, comparing the k-th value of b with the k-th of a (a rule's
  /// field list has a fixed order and length).
  template <class R>
  static bool same_fields(const typename R::Options& a, const typename R::Options& b) {
    constexpr std::size_t kMost = 64;
    double values[kMost];
    std::size_t n = 0, k = 0;
    R::fields(a, [&](const char*, const auto& x) {
      if (n < kMost) values[n] = static_cast<double>(x);
      ++n;
    });
    if (n > kMost) throw std::logic_error("muon::libtorch::Options: a rule has over 64 fields");
    bool same = true;
    R::fields(b, [&](const char*, const auto& x) {
      same = same && values[k++] == static_cast<double>(x);
    });
    return same;
  }
  static void check_rule(UpdateRule rule, const std::string& where) {
    if (!rules::All::known(rule))
      throw InvalidArgument("muon: " + where + ".rule = " + std::to_string(int(rule)) +
                            " is not the id of a rule in muon::rules::All");
  }
  /// A custom schedule's list is compared as given (its steps, a field, are compared above).
  static bool same_schedule(const Schedule& s, const Schedule& t) {
    if (s.kind() != t.kind() || s.name() != t.name() || s.norm_scale() != t.norm_scale())
      return false;
    if (s.kind() != Schedule::Kind::custom) return true;
    const auto &x = s.listed(), &y = t.listed();
    return std::equal(x.begin(), x.end(), y.begin(), y.end(), [](const Coefficients& p, const Coefficients& q) {
      return p.a == q.a && p.b == q.b && p.c == q.c;
    });
  }
  /// A rule's field under "<rule>.<field>", or (Muon's Newton-Schulz fields in archives
  /// written when only Muon orthogonalized) under "<field>" alone.
  static std::optional<c10::IValue> find(torch::serialize::InputArchive& archive,
                                         const std::string& prefix, const std::string& field) {
    c10::IValue v;
    if (archive.try_read(prefix + field, v)) return v;
    if (field.rfind("ns.", 0) == 0 && prefix == std::string(rules::Muon::name) + "." &&
        archive.try_read(field, v))
      return v;
    return std::nullopt;
  }
  static c10::IValue read(torch::serialize::InputArchive& archive, const std::string& key) {
    c10::IValue v;
    if (!archive.try_read(key, v))
      throw StateError("muon::libtorch::Options: the archive has no '" + key + "'");
    return v;
  }

  UpdateRule rule_ = rules::Muon::id;
  GroupOptions options_{};
};

/// How a parameter holds several matrices (optional, by parameter name).
struct Layout {
  std::optional<Split> split;
  std::optional<Experts> experts;
};

/// The rows of each expert of `p`: as given, or (Experts{}) p's second extent, as add_muon
/// infers them for an E x m x n stack.
inline index_t expert_rows(const Experts& experts, const torch::Tensor& p) {
  return experts.rows != 0 || p.dim() < 2 ? experts.rows : p.size(1);
}

/// One row of a routing table.
struct Route {
  std::string name;
  std::vector<int64_t> shape;
  UpdateRule rule = rules::Muon::id;
  double lr = 0;            ///< the group's learning rate
  double effective_lr = 0;  ///< orthogonalizing rules: lr times the update scale of its (first) matrix
};

/// What route() decided: the param groups (the matrices' first, then the others'), the names, the layouts
/// and the table that says where every parameter went.
struct Routing {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  std::unordered_map<const c10::TensorImpl*, std::string> names;
  std::map<std::string, Layout> layouts;
  std::vector<Route> routes;

  /// The table as text: parameter, shape, rule, lr and effective lr, one line each.
  [[nodiscard]] std::string table() const {
    std::ostringstream out;
    out << "parameter                                shape             rule    lr          effective lr\n";
    for (const Route& r : routes) {
      std::string shape;
      for (std::size_t i = 0; i < r.shape.size(); ++i) shape += (i ? "x" : "") + std::to_string(r.shape[i]);
      char line[256];
      std::snprintf(line, sizeof line, "%-40s %-17s %-7s %-11.4g %.4g\n", r.name.c_str(),
                    shape.c_str(), rules::All::describe(static_cast<std::uint8_t>(r.rule)).c_str(),
                    r.lr, r.effective_lr);
      out << line;
    }
    return out.str();
  }
};

/// Which parameters route() gives to which rule, and with what options.
struct RoutingOptions {
  GroupOptions options{};  ///< every rule's hyper-parameters (each group uses its rule's)
  /// The rule of the hidden matrices, and of everything else.
  UpdateRule matrices = rules::Muon::id;
  UpdateRule others = rules::AdamW::id;
  /// Parameters of 2 or more dimensions are matrices unless their name matches this
  /// (embeddings and output heads go with the others: Moonlight, arXiv:2502.16982). Vectors
  /// (biases, norm gains) always do.
  std::string adamw_names = R"((^|[._])(embed\w*|wte|wpe|tok_embeddings|lm_head|head|output|classifier)([._]|$))";
  std::map<std::string, Layout> layouts;  ///< fused matrices and expert stacks, by name
};

/// Routes named parameters (model->named_parameters()) into a group of the matrices' rule and
/// one of the others' (each left out when empty).
inline Routing route(const torch::OrderedDict<std::string, torch::Tensor>& named,
                     const RoutingOptions& r = {}) {
  for (UpdateRule rule : {r.matrices, r.others})
    if (!rules::All::known(rule))
      throw InvalidArgument("muon::libtorch::route: rule id " + std::to_string(int(rule)) +
                            " is not the id of a rule in muon::rules::All");
  const std::regex others(r.adamw_names);
  std::vector<torch::Tensor> matrix_params, other_params;
  Routing out;
  for (const auto& item : named) {
    const torch::Tensor& p = item.value();
    const bool matrix = p.dim() >= 2 && !std::regex_search(item.key(), others);
    (matrix ? matrix_params : other_params).push_back(p);
    out.names[p.unsafeGetTensorImpl()] = item.key();
    const UpdateRule rule = matrix ? r.matrices : r.others;
    Route row{item.key(), p.sizes().vec(), rule, rules::All::lr(rule, r.options), 0};
    row.effective_lr = row.lr;
    rules::All::visit(rule, [&](auto ruler) {
      using R = decltype(ruler);
      if constexpr (R::orthogonalizes) {
        index_t rows = p.size(0), cols = p.numel() / std::max<int64_t>(1, p.size(0));
        const auto layout = r.layouts.find(item.key());
        if (layout != r.layouts.end() && layout->second.experts) {
          rows = expert_rows(*layout->second.experts, p);
          cols = p.size(0) == 0 || rows == 0 ? 0 : cols / rows;
        }
        else if (layout != r.layouts.end() && layout->second.split && !layout->second.split->sizes.empty())
          (layout->second.split->axis == 0 ? rows : cols) = layout->second.split->sizes[0];
        row.effective_lr *= R::update_scale(R::options(r.options), rows, cols);
      }
    });
    out.routes.push_back(row);
  }
  for (const auto& [name, layout] : r.layouts)
    if (!named.contains(name))
      throw InvalidArgument("muon::libtorch::route: a layout names '" + name +
                            "', which is not among the parameters");
  out.layouts = r.layouts;
  if (!matrix_params.empty())
    out.groups.emplace_back(std::move(matrix_params),
                            std::make_unique<Options>(r.matrices, r.options));
  if (!other_params.empty())
    out.groups.emplace_back(std::move(other_params),
                            std::make_unique<Options>(r.others, r.options));
  return out;
}

/// The rules of muon::rules::All as a torch::optim::Optimizer over tensors of element type T in backend B's
/// memory (EigenBackend: CPU tensors; cuda::CudaBackend: CUDA tensors, see CudaMuon), updated
/// by the placement E (muon::Optimizer<B, T>, or a muon::ShardedOptimizer<B, T, Comm>).
template <class T = float, class B = EigenBackend, class E = muon::Optimizer<B, T>>
class Muon : public torch::optim::Optimizer {
 public:
  using Engine = E;
  using Space = typename B::memory_space;
  static_assert(std::is_same_v<typename Engine::Space, Space>,
                "muon::libtorch::Muon<T, B, Engine>: the engine must work in B's memory space");

  /// Param groups with their Options (a group without takes `defaults`, a Muon group by
  /// default); `names` and `layouts` from route() (parameters without a name are called
  /// "group.G.I").
  explicit Muon(std::vector<torch::optim::OptimizerParamGroup> groups, Options defaults = {},
                std::unordered_map<const c10::TensorImpl*, std::string> names = {},
                std::map<std::string, Layout> layouts = {}, OptimizerOptions engine = {},
                B backend = B{})
    requires std::is_same_v<Engine, muon::Optimizer<B, T>>
      : Muon(std::move(groups), std::move(defaults), std::move(names), std::move(layouts),
             Engine({}, engine, std::move(backend))) {}
  explicit Muon(const Routing& routing, OptimizerOptions engine = {}, B backend = B{})
    requires std::is_same_v<Engine, muon::Optimizer<B, T>>
      : Muon(routing, Engine({}, engine, std::move(backend))) {}
  /// Over an engine made by the caller (a sharded one: with its communicator and strategy),
  /// holding no parameters yet; each param group's Options replace its group options.
  Muon(std::vector<torch::optim::OptimizerParamGroup> groups, Options defaults,
       std::unordered_map<const c10::TensorImpl*, std::string> names,
       std::map<std::string, Layout> layouts, Engine engine)
      : torch::optim::Optimizer(std::move(groups), std::make_unique<Options>(defaults)),
        names_(std::move(names)),
        layouts_(std::move(layouts)),
        engine_(std::move(engine)) {
    if (engine_.num_params() != 0)
      throw InvalidArgument("muon::libtorch::Muon: the engine handed over already holds " +
                            std::to_string(engine_.num_params()) +
                            " parameters; hand over a new one");
    sync();
  }
  Muon(const Routing& routing, Engine engine)
      : Muon(routing.groups, Options{}, routing.names, routing.layouts, std::move(engine)) {}

  /// One step: the closure (if any) runs with gradients enabled and its loss is returned.
  torch::Tensor step(LossClosure closure = nullptr) override {
    torch::Tensor loss;
    if (closure) {
      at::AutoGradMode enable(true);
      loss = closure();
    }
    sync();
    last_ = engine_.step();
    for (const Entry& e : entries_)
      if (e.grad != nullptr) e.param.unsafeGetTensorImpl()->bump_version();
    return loss;
  }

  /// QK-clip (muon/core/qk_clip.hpp) of one attention layer: its query and key weights (one
  /// tensor for a fused QKV), parameters of this optimizer, and where their heads lie.
  QkClipId add_qk_clip(const torch::Tensor& query, const torch::Tensor& key, AttentionHeads heads,
                       QkClipOptions options = {}) {
    sync();
    return engine_.add_qk_clip(id_of(query, "query"), id_of(key, "key"), std::move(heads), options);
  }
  /// After step(): rescales the heads whose largest logit in the last forward pass (a 1-D
  /// tensor, one value per query head, any floating dtype and device) exceeded the threshold.
  QkClipReport clip_qk(QkClipId id, const torch::Tensor& max_logits) {
    if (max_logits.dim() != 1)
      throw InvalidArgument("muon::libtorch::Muon::clip_qk: max_logits has " +
                            std::to_string(max_logits.dim()) +
                            " dimensions; expected one value per query head");
    const torch::Tensor host = max_logits.detach().to(torch::kCPU, torch::kDouble).contiguous();
    const QkClipReport report = engine_.clip_qk(
        id, std::span<const double>(host.data_ptr<double>(), static_cast<std::size_t>(host.numel())));
    if (report.clipped != 0) {
      const auto [query, key] = engine_.qk_clip_params(id);
      for (const Entry& e : entries_)
        if (e.id.value == query.value || e.id.value == key.value) e.param.unsafeGetTensorImpl()->bump_version();
    }
    return report;
  }

  /// What the last step() did (parameters updated, refusals, telemetry).
  [[nodiscard]] const StepReport& last_report() const noexcept { return last_; }
  /// The placement underneath (its state, backend and introspection).
  [[nodiscard]] Engine& engine() noexcept { return engine_; }

  /// The options (per group) and muon's state in one archive (torch::save / torch::load).
  void save(torch::serialize::OutputArchive& archive) const override {
    const_cast<Muon*>(this)->sync();
    archive.write("muon/groups", c10::IValue(static_cast<int64_t>(param_groups_.size())));
    for (std::size_t g = 0; g < param_groups_.size(); ++g) {
      torch::serialize::OutputArchive group(archive.compilation_unit());
      param_groups_[g].options().serialize(group);
      archive.write("muon/group/" + std::to_string(g), group);
    }
    std::ostringstream bytes;
    const_cast<Engine&>(engine_).save_state(bytes);
    const std::string s = bytes.str();
    archive.write("muon/state", torch::from_blob(const_cast<char*>(s.data()),
                                                 {static_cast<int64_t>(s.size())}, torch::kUInt8)
                                    .clone());
  }
  /// Restores what save() wrote into an optimizer over the same parameters and groups; on any
  /// error nothing changes.
  void load(torch::serialize::InputArchive& archive) override {
    sync();
    c10::IValue count;
    if (!archive.try_read("muon/groups", count) ||
        count.toInt() != static_cast<int64_t>(param_groups_.size()))
      throw StateError("muon::libtorch::Muon::load: the archive is not a muon optimizer's with " +
                       std::to_string(param_groups_.size()) + " param groups");
    std::vector<Options> options(param_groups_.size());
    for (std::size_t g = 0; g < options.size(); ++g) {
      torch::serialize::InputArchive group;
      archive.read("muon/group/" + std::to_string(g), group);
      options[g].serialize(group);
      if (options[g].rule() != as_options(g).rule())
        throw StateError("muon::libtorch::Muon::load: param group " + std::to_string(g) +
                         " follows another rule in the archive");
    }
    torch::Tensor state;
    archive.read("muon/state", state);
    std::istringstream bytes(std::string(static_cast<const char*>(state.data_ptr()),
                                         static_cast<std::size_t>(state.numel())));
    engine_.load_state(bytes);  // refuses a mismatch, changing nothing
    for (std::size_t g = 0; g < options.size(); ++g) as_options(g) = options[g];
    sync();
  }

 private:
  struct Entry {
    torch::Tensor param;
    ParamId id;
    const void* data = nullptr;  // the parameter memory the engine writes
    const void* grad = nullptr;  // the gradient memory the engine reads, or null if none
    std::vector<int64_t> grad_strides;
  };

  ParamId id_of(const torch::Tensor& t, const char* which) const {
    for (const Entry& e : entries_)
      if (e.param.unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return e.id;
    throw InvalidArgument(std::string("muon::libtorch::Muon::add_qk_clip: the ") + which +
                          " tensor is not a parameter of this optimizer");
  }

  Options& as_options(std::size_t g) {
    if (!param_groups_[g].has_options())
      param_groups_[g].set_options(defaults_->clone());
    auto* o = dynamic_cast<Options*>(&param_groups_[g].options());
    if (o == nullptr)
      throw InvalidArgument("muon::libtorch::Muon: param group " + std::to_string(g) +
                            " has options of another optimizer (expected muon::libtorch::Options)");
    return *o;
  }

  /// Brings the engine up to date: groups and parameters added since, options changed since,
  /// and every gradient where autograd left it.
  void sync() {
    registered_.resize(param_groups_.size(), 0);
    for (std::size_t g = 0; g < param_groups_.size(); ++g) {
      const Options& o = as_options(g);
      if (g == groups_.size()) {  // a new param group (group 0 is the engine's first)
        groups_.push_back(g == 0 ? GroupId{0} : engine_.add_group(o.options()));
        if (g == 0) engine_.set_group_options(groups_[0], o.options());
        seen_.push_back(o);
      } else if (!(seen_[g] == o)) {  // a scheduler's new lr, or options changed by hand
        engine_.set_group_options(groups_[g], o.options());
        seen_[g] = o;
      }
    }
    // The parameters added since, all or nothing: one that is refused (its dtype, device or
    // layout) leaves every parameter unregistered, so step() can be called again once the
    // param group is mended. Most steps add nothing and skip this (it copies the engine's plan).
    bool pending = false;
    for (std::size_t g = 0; g < param_groups_.size(); ++g)
      pending |= registered_[g] < param_groups_[g].params().size();
    if (pending) register_pending();
    for (Entry& e : entries_) follow(e);
  }

  /// Registers the param groups' new tensors in one all-or-nothing batch.
  void register_pending() {
    std::vector<Entry> added;
    engine_.add_all_or_nothing([&] {
      for (std::size_t g = 0; g < param_groups_.size(); ++g)
        for (std::size_t i = registered_[g]; i < param_groups_[g].params().size(); ++i)
          added.push_back(register_param(g, i, as_options(g).rule()));
    });
    for (std::size_t g = 0; g < param_groups_.size(); ++g)
      registered_[g] = param_groups_[g].params().size();
    entries_.insert(entries_.end(), std::make_move_iterator(added.begin()),
                    std::make_move_iterator(added.end()));
  }

  /// Registers a parameter without its gradient: registration never creates a .grad on the
  /// user's tensor (a frozen parameter would then be decayed), so the engine gets a stand-in
  /// that it never reads, and follow() points it at the real gradient when there is one.
  Entry register_param(std::size_t g, std::size_t i, UpdateRule rule) {
    const torch::Tensor& p = param_groups_[g].params()[i];
    const auto named = names_.find(p.unsafeGetTensorImpl());
    const std::string name = named != names_.end() ? named->second
                                                   : "group." + std::to_string(g) + "." + std::to_string(i);
    const MatrixView<T, Space> value = libtorch::view<T, Space>(p, "parameter '" + name + "'");
    static const T nothing{};
    const MatrixView<const T, Space> absent(&nothing, value.rows(), value.cols(), 0, 0);
    const auto layout = layouts_.find(name);
    ParamId id;
    rules::All::visit(rule, [&](auto r) {
      if constexpr (decltype(r)::orthogonalizes) {  // a split or expert layout, if it has one
        if (layout != layouts_.end() && layout->second.split) {
          id = engine_.add(r, name, value, absent, *layout->second.split, groups_[g]);
          return;
        }
        if (layout != layouts_.end() && layout->second.experts) {
          id = engine_.add(r, name, value, absent,
                           Experts{expert_rows(*layout->second.experts, p)}, groups_[g]);
          return;
        }
      }
      id = engine_.add(r, name, value, absent, groups_[g]);
    });
    engine_.clear_grad(id);
    return {p, id, value.data(), nullptr, {}};
  }

  /// A gradient set to None, or a parameter that no longer requires one (frozen): the
  /// parameter sits this step out, its state kept. New memory: the engine reads it from now
  /// on. A parameter whose memory moved (set_data, to()) is refused: its state belongs to the
  /// tensor it was.
  void follow(Entry& e) {
    if (e.param.data_ptr() != e.data)
      throw InvalidArgument("muon::libtorch::Muon: parameter '" + engine_.name(e.id) +
                            "' no longer lives where it was registered (set_data or to() "
                            "moved it); make the optimizer after moving the model");
    const torch::Tensor& g = e.param.grad();
    if (!g.defined() || !e.param.requires_grad()) {
      if (e.grad != nullptr) engine_.clear_grad(e.id);
      e.grad = nullptr;
      return;
    }
    if (e.grad == g.data_ptr() && e.grad_strides == g.strides()) return;
    engine_.set_grad(e.id, libtorch::view<const T, Space>(g, "gradient of '" + engine_.name(e.id) + "'"));
    e.grad = g.data_ptr();
    e.grad_strides = g.strides().vec();
  }

  std::unordered_map<const c10::TensorImpl*, std::string> names_;
  std::map<std::string, Layout> layouts_;
  Engine engine_;
  std::vector<GroupId> groups_;   // the engine's group of each param group
  std::vector<Options> seen_;     // the options the engine has of each
  std::vector<std::size_t> registered_;       // parameters registered of each param group
  std::vector<Entry> entries_;
  StepReport last_;
};

}  // namespace muon::libtorch

namespace muon {
template <class B, class T, class C>
class ShardedOptimizer;  // muon/distributed/sharded_optimizer.hpp, which a sharded program includes
}

namespace muon::libtorch {
/// muon::libtorch::Muon over the sharded placement on communicator Comm: a data-parallel
/// LibTorch program's optimizer, one per rank.
template <class Comm, class T = float, class B = EigenBackend>
using ShardedMuon = Muon<T, B, ShardedOptimizer<B, T, Comm>>;
}  // namespace muon::libtorch
