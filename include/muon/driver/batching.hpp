#pragma once
// Internal: included by the library's own headers, not by programs.
// The driver's batches (OptimizerCore, driver/optimizer_core.hpp), for backends that run a
// stack of same-shape matrices through Newton-Schulz in one call (RunsBatched): which matrices
// stack together, and one stack's step.
#include <algorithm>
#include <vector>

#include "muon/driver/optimizer_core.hpp"

namespace muon::detail {

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::plan_batches(const std::vector<Unit>& units) {
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

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::run_batches() {
  if constexpr (RunsBatched<B, T>) {
    for (const Batch& b : batches_) (this->*work_[rules::All::index(b.rule)].batch)(b);
  }
}

template <class Derived, class B, class T, class ParamExtra>
template <class R>
void OptimizerCore<Derived, B, T, ParamExtra>::run_batch(const Batch& b) {
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
  for (std::size_t i = 0; i < present_.size(); ++i) {
    observe<R>(present_[i], ConstView(slot(batch_in_, i)), scratch);
    finish_matrix<R>(present_[i], ConstView(slot(batch_out_, i)), slot(batch_saved_, i), scratch,
                     all_finite);
  }
}

}  // namespace muon::detail
