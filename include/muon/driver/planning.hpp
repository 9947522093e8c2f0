#pragma once
// Internal: included by the library's own headers, not by programs.
// The driver's plan (OptimizerCore, driver/optimizer_core.hpp): after a registration or a
// layout change, every matrix of the orthogonalizing rules in cost order, the workspaces of the
// workers that run them, and the elementwise rules' pieces in chunks of rows. Out of the class
// body, so not implicitly inline (see driver/step.hpp).
#include <algorithm>
#include <vector>

#include "muon/driver/optimizer_core.hpp"

namespace muon::detail {

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::plan() {
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
  std::vector<std::size_t> norm_slot(units.size(), kNoSlot);
  std::size_t slots = 0;
  index_t block_rows = 0;
  for (std::size_t u = 0; u < units.size(); ++u) {
    const Param& p = params_[units[u].param];
    rules::All::visit(p.rule, [&](auto rule) {
      if constexpr (reads_gradient_norm<decltype(rule)>) {
        norm_slot[u] = slots++;
        block_rows = std::max(block_rows, p.parts[units[u].part].block_rows);
      }
    });
  }
  if (slots > 0 && static_cast<index_t>(gradient_norms_.size()) < static_cast<index_t>(slots) + block_rows)
    backend_.resize(gradient_norms_, static_cast<index_t>(slots) + block_rows);
  std::vector<T> zeros(slots, T(0));
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
  norm_slot_ = std::move(norm_slot);
  zero_slots_ = std::move(zeros);
}

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::measure_gradient_norms() {
  const std::size_t count = zero_slots_.size();  // one slot per matrix whose rule reads it
  if (count == 0) return;
  Derived& d = self();
  T* const slots = backend_.view(gradient_norms_, 1, static_cast<index_t>(gradient_norms_.size())).data();
  const View row_sums(slots + count, static_cast<index_t>(gradient_norms_.size() - count), 1, 1, 1);
  const View all(slots, 1, static_cast<index_t>(count), static_cast<index_t>(count), 1);
  backend_.copy_from_host(zero_slots_.data(), all);  // one transfer; a block held elsewhere adds 0
  for (std::size_t u = 0; u < units_.size(); ++u) {
    if (norm_slot_[u] == kNoSlot) continue;  // its rule reads no gradient norm
    const Param& p = params_[units_[u].param];
    const View slot(slots + norm_slot_[u], 1, 1, 1, 1);
    // the part's block of the flattened matrix, where it meets the piece held here
    const Part& part = part_of(units_[u]);
    const Piece mine = d.piece(p);
    const index_t r0 = std::max(part.row0, mine.row0), c0 = std::max(part.col0, mine.col0),
                  r1 = std::min(part.row0 + part.block_rows, mine.row0 + mine.rows),
                  c1 = std::min(part.col0 + part.block_cols, mine.col0 + mine.cols);
    if (!p.takes_part() || r1 <= r0 || c1 <= c0) continue;
    const View sums = row_sums.block(0, 0, r1 - r0, 1);
    backend_.reduce_rows(stage::Square{}, sums, d.gradient(p).block(r0 - mine.row0, c0 - mine.col0, r1 - r0, c1 - c0));
    backend_.reduce_rows(stage::Identity{}, slot, ConstView(sums).transposed());
  }
  if constexpr (Derived::exchanges) d.sum_over_ranks(all);
}

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::queue_elementwise(std::size_t i) {
  const Piece mine = self().piece(params_[i]);
  if (workers_.size() < 2 || mine.empty()) {
    run_chunk({i, 0, mine.rows});
    return;
  }
  const index_t rows = chunk_rows(mine);
  for (index_t r = 0; r < mine.rows; r += rows) chunks_.push_back({i, r, std::min(rows, mine.rows - r)});
}

}  // namespace muon::detail
