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
