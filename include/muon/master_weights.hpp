#pragma once
// muon::MasterWeights<B, T, L, Opt>: parameters stored in a narrow type L (bf16 or fp16: the
// model's own tensors), updated through wider T masters (fp32) so that updates smaller than
// L's rounding step still accumulate. The wrapped optimizer (Opt: Optimizer<B, T> by default,
// or a ShardedOptimizer<B, T, Comm>, whose step() every rank then calls through its own
// MasterWeights) sees only T: the masters as its parameters and T copies of the gradients.
//
//   muon::Optimizer<muon::cuda::CudaBackend, float> opt(defaults, {}, gpu);
//   muon::MasterWeights<muon::cuda::CudaBackend, float, __nv_bfloat16> mixed(opt);
//   mixed.add_muon("w", w_bf16, grad_bf16);    // views of the model's 16-bit tensors
//   mixed.step();                              // widen grads, step in fp32, round into w
//
// Each step costs two passes more than a plain one: widening each gradient and rounding each
// master back. The backend must convert in copy() (EigenBackend: float <-> Eigen::bfloat16 /
// Eigen::half; CudaBackend: float <-> __nv_bfloat16 / __half).
//
// Checkpoints: the optimizer's save_state() holds the momenta, not the masters. To resume
// bit-exactly save the masters too (master(id)); otherwise sync_masters() after loading the
// 16-bit parameters restarts the masters from them, losing only what L cannot hold.
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "muon/core/error.hpp"
#include "muon/core/matrix_view.hpp"
#include "muon/optimizer.hpp"
#include "muon/rules/rules.hpp"

namespace muon {

template <class B, class T, class L, class Opt = Optimizer<B, T>>
class MasterWeights {
 public:
  using Space = typename B::memory_space;
  using NarrowView = MatrixView<L, Space>;
  using ConstNarrowView = MatrixView<const L, Space>;

  static_assert(std::is_same_v<typename Opt::backend_type, B> &&
                    std::is_same_v<typename Opt::scalar_type, T>,
                "muon::MasterWeights<B, T, L, Opt>: Opt must be an optimizer over backend B and "
                "Scalar T (muon::Optimizer<B, T> or muon::ShardedOptimizer<B, T, Comm>)");
  static_assert(!std::is_same_v<T, L>,
                "muon::MasterWeights<B, T, L>: L is the parameters' narrow type and must differ "
                "from the optimizer's Scalar T");
  static_assert(
      requires(B& b, ConstNarrowView narrow, MatrixView<T, Space> wide,
               MatrixView<const T, Space> cwide, NarrowView out) {
        b.copy(narrow, wide);
        b.copy(cwide, out);
      },
      "muon::MasterWeights<B, T, L>: the backend's copy() must convert between T and L");

  /// Parameters go to `optimizer` (its groups, options and state), which must outlive this.
  explicit MasterWeights(Opt& optimizer) : opt_(optimizer) {}

  /// A 16-bit parameter updated through a T master (initialized from it) by any rule of
  /// muon::rules::All, as the optimizer's add(rule, ...) registers it.
  template <RulePolicy Rule>
  ParamId add(Rule rule, std::string name, NarrowView param, ConstNarrowView grad,
              GroupId group = {}) {
    const std::string what = "muon: MasterWeights: parameter '" + name + "' (" +
                             detail::shape_string(param.rows(), param.cols()) + ")";
    if (grad.rows() != param.rows() || grad.cols() != param.cols())
      throw InvalidArgument(what + ": gradient has shape " +
                            detail::shape_string(grad.rows(), grad.cols()));
    if (!param.empty() && (param.data() == nullptr || grad.data() == nullptr))
      throw InvalidArgument(what + ": a data pointer is null");
    for (const Entry& e : entries_)
      if (detail::views_overlap(ConstNarrowView(param), ConstNarrowView(e.param)) ||
          detail::views_overlap(ConstNarrowView(param), e.grad) ||
          detail::views_overlap(grad, ConstNarrowView(e.param)))
        throw InvalidArgument(what + ": shares memory with a parameter or gradient already "
                                     "registered here");
    B& b = opt_.backend();
    Entry e{{}, param, grad, {}, {}};
    b.resize(e.master, param.size());
    b.resize(e.grad_copy, param.size());
    b.copy(ConstNarrowView(param), wide(e.master, e));
    // The optimizer's own checks (name, group) run last, so a refusal leaves nothing behind.
    const MatrixView<T, Space> master = wide(e.master, e);
    const MatrixView<const T, Space> g = wide(e.grad_copy, e);
    e.id = opt_.add(rule, std::move(name), master, g, group);
    entries_.push_back(std::move(e));
    return entries_.back().id;
  }
  /// A 16-bit weight matrix updated by Muon through a T master.
  ParamId add_muon(std::string name, NarrowView param, ConstNarrowView grad, GroupId group = {}) {
    return add(rules::Muon{}, std::move(name), param, grad, group);
  }
  /// A 16-bit parameter updated by AdamW through a T master.
  ParamId add_adamw(std::string name, NarrowView param, ConstNarrowView grad,
                    GroupId group = {}) {
    return add(rules::AdamW{}, std::move(name), param, grad, group);
  }

  /// Widens every gradient into its T copy, steps the optimizer on the masters, and rounds
  /// the updated masters into the 16-bit parameters. If the optimizer refuses the step
  /// (a NaN/Inf gradient), neither the masters nor the parameters change; a parameter whose
  /// update it refused (NonFiniteUpdate) keeps its value.
  StepReport step() {
    B& b = opt_.backend();
    for (Entry& e : entries_) b.copy(e.grad, wide(e.grad_copy, e));
    StepReport report;
    try {
      report = opt_.step();
    } catch (const NonFiniteUpdate&) {  // the others took the step: their masters moved
      round_masters();
      throw;
    }
    if (report.applied) round_masters();
    return report;
  }

  /// QK-clip (the optimizer's add_qk_clip, given the ids add() returned here) on the masters;
  /// the clip's two parameters are rounded into their 16-bit copies when a head was rescaled.
  template <class Logit>
  QkClipReport clip_qk(QkClipId id, std::span<const Logit> max_logits) {
    const QkClipReport report = opt_.clip_qk(id, max_logits);
    if (report.clipped != 0) {
      const auto [query, key] = opt_.qk_clip_params(id);
      for (Entry& e : entries_)
        if (e.id.value == query.value || e.id.value == key.value) round_master(e);
    }
    return report;
  }

  /// The T master of a parameter registered here (e.g. to checkpoint it).
  [[nodiscard]] MatrixView<const T, Space> master(ParamId id) {
    Entry& e = entry(id);
    return wide(e.master, e);
  }
  /// Restarts every master from its 16-bit parameter (after loading the parameters).
  void sync_masters() {
    for (Entry& e : entries_) opt_.backend().copy(ConstNarrowView(e.param), wide(e.master, e));
  }

  [[nodiscard]] Opt& optimizer() noexcept { return opt_; }

 private:
  using Buffer = typename B::template Buffer<T>;
  struct Entry {
    ParamId id;
    NarrowView param;
    ConstNarrowView grad;
    Buffer master, grad_copy;
  };

  void round_master(Entry& e) {
    opt_.backend().copy(MatrixView<const T, Space>(wide(e.master, e)), e.param);
  }
  void round_masters() {
    for (Entry& e : entries_) round_master(e);
  }
  MatrixView<T, Space> wide(Buffer& buf, const Entry& e) {
    return opt_.backend().view(buf, e.param.rows(), e.param.cols());
  }
  Entry& entry(ParamId id) {
    for (Entry& e : entries_)
      if (e.id.value == id.value) return e;
    throw InvalidArgument("muon: MasterWeights: parameter id " + std::to_string(id.value) +
                          " was not registered through this MasterWeights");
  }

  Opt& opt_;
  std::vector<Entry> entries_;
};

}  // namespace muon
