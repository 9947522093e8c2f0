#pragma once
// Internal: included by the library's own headers, not by programs.
// Where each piece of every parameter lives under each strategy: zero1's slices of every
// parameter along its longer side (or its matrices), owner_compute's whole matrices given to
// the least loaded rank by Newton-Schulz cost, every elementwise parameter sliced, and the
// exchange buffers' segments they fill.
#include <algorithm>
#include <cstddef>
#include <vector>

#include "muon/distributed/sharded/placement.hpp"

namespace muon {

template <class B, class T, class C>
void ShardedOptimizer<B, T, C>::lay_out() {
  if (laid_out_ == params_.size() && !used_.empty()) return;  // laid out once, even empty
  const int world = comm_.size();
  const std::size_t first = laid_out_;
  std::vector<index_t> used = used_;
  if (used.empty()) used.assign(static_cast<std::size_t>(world), 0);
  // Slices: every parameter under zero1, AdamW parameters under owner_compute too (they are
  // elementwise, and one embedding would otherwise unbalance the segments). They sit at the
  // same offset on every rank, after everything laid out so far.
  index_t common = *std::max_element(used.begin(), used.end());
  bool sliced = false;
  for (std::size_t i = first; i < params_.size(); ++i) {
    Param& p = params_[i];
    if (strategy_ == ShardingStrategy::owner_compute && rules::All::orthogonalizes(p.rule)) continue;
    common += slice(p, world, common);
    sliced = true;
  }
  if (sliced) used.assign(static_cast<std::size_t>(world), common);
  if (strategy_ == ShardingStrategy::owner_compute) {
    // Muon matrices whole, longest-processing-time-first: the costliest (k^2 N) goes to the
    // least loaded rank.
    std::vector<std::size_t> order;
    for (std::size_t i = first; i < params_.size(); ++i)
      if (rules::All::orthogonalizes(params_[i].rule)) order.push_back(i);
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return cost(params_[a]) > cost(params_[b]);
    });
    if (load_.empty()) load_.assign(static_cast<std::size_t>(world), 0.0);
    for (std::size_t i : order) {
      Param& p = params_[i];
      const auto owner = static_cast<std::size_t>(std::min_element(load_.begin(), load_.end()) - load_.begin());
      load_[owner] += cost(p);
      p.pieces.assign(static_cast<std::size_t>(world), Piece{});
      p.pieces[owner] = Piece{0, 0, p.value.rows(), p.value.cols(), used[owner]};
      used[owner] += p.value.size();
    }
  }
  // The status scalars (carries_status) follow the data.
  const index_t segment = *std::max_element(used.begin(), used.end()) + (carries_status() ? 2 : 0);
  if (segment != segment_) {  // scratch: nothing in them outlives a step
    backend_.resize(full_, segment * world);
    backend_.resize(reduced_, segment);
    backend_.resize(out_, segment);
    if (strategy_ == ShardingStrategy::zero1 && options_.non_finite != NonFinitePolicy::unchecked)
      backend_.resize(saved_, segment);
  }
  for (std::size_t i = first; i < params_.size(); ++i)
    this->size_state(params_[i], params_[i].pieces[comm_.rank()].size());
  status_host_.resize(2);
  used_ = std::move(used);
  segment_ = segment;
  laid_out_ = params_.size();
  fingerprint_stale_ = true;
  this->plan();
}

template <class B, class T, class C>
index_t ShardedOptimizer<B, T, C>::slice(Param& p, int world, index_t at) {
  const index_t rows = p.value.rows(), cols = p.value.cols();
  const bool split = p.parts.size() > 1;
  const bool by_rows = split ? std::all_of(p.parts.begin(), p.parts.end(), [&](const Part& q) {
    return q.col0 == 0 && q.block_cols == cols;
  }) : rows >= cols;
  const index_t len = by_rows ? rows : cols;
  // bounds[r] .. bounds[r + 1]: rank r's slice
  std::vector<index_t> bounds(static_cast<std::size_t>(world) + 1, len);
  bounds[0] = 0;
  if (!split) {
    const index_t chunk = (len + world - 1) / world;
    for (int r = 1; r < world; ++r) bounds[r] = std::min(len, r * chunk);
  } else {  // the first matrix boundary at or after an even share
    std::size_t q = 0;
    for (int r = 1; r < world; ++r) {
      const index_t target = len * r / world;
      while (q < p.parts.size() && (by_rows ? p.parts[q].row0 : p.parts[q].col0) < target) ++q;
      bounds[r] = q < p.parts.size() ? (by_rows ? p.parts[q].row0 : p.parts[q].col0) : len;
      bounds[r] = std::max(bounds[r], bounds[r - 1]);
    }
  }
  index_t chunk = 0;
  p.pieces.assign(static_cast<std::size_t>(world), Piece{});
  for (int r = 0; r < world; ++r) {
    const index_t begin = bounds[r], count = bounds[r + 1] - begin;
    chunk = std::max(chunk, count);
    p.pieces[r] = by_rows ? Piece{begin, 0, count, cols, at} : Piece{0, begin, rows, count, at};
  }
  return chunk * (by_rows ? cols : rows);
}

}  // namespace muon
