#pragma once
// Internal: included by the library's own headers, not by programs.
// The sharded step's communication: gradients reduce-scattered and averaged, each rank's
// results published into its segment and all-gathered, zero1's Newton-Schulz inputs read back
// from the gathered pieces, and a refused matrix's momentum slice put back.
#include <algorithm>
#include <cstddef>

#include "muon/distributed/sharded/placement.hpp"

namespace muon {

template <class B, class T, class C>
void ShardedOptimizer<B, T, C>::reduce_gradients() {
  const int world = comm_.size();
  const auto seg = static_cast<std::size_t>(segment_);
  for (Param& p : params_)
    if (p.takes_part())
      for (int r = 0; r < world; ++r) backend_.copy(block(p.grad, p.pieces[r]), packed(full_, r, p.pieces[r]));
  comm_.reduce_scatter_sum(data(full_, seg * world), data(reduced_, seg), seg);
  if (world > 1) backend_.scale(backend_.view(reduced_, 1, segment_), T(1) / static_cast<T>(world));
}

template <class B, class T, class C>
void ShardedOptimizer<B, T, C>::publish(Param& p, const Part* part) {
  const Piece mine = piece(p);
  if (part == nullptr)
    backend_.copy(ConstView(block(p.value, mine)), packed(out_, 0, mine));
  else if (strategy_ == ShardingStrategy::owner_compute)
    backend_.copy(ConstView(detail::part_view(p.value, *part)),
                  detail::part_view(packed(out_, 0, mine), *part, mine.row0, mine.col0));
}

template <class B, class T, class C>
detail::Tally ShardedOptimizer<B, T, C>::exchange(detail::Tally tally) {
  const int world = comm_.size(), me = comm_.rank();
  const auto seg = static_cast<std::size_t>(segment_);
  const bool status = carries_status();
  if (status) {
    const T words[2] = {static_cast<T>(tally.refused),
                        static_cast<T>(tally.refused > 0 ? tally.first + 1 : 0)};
    backend_.copy_from_host(words, status_view(out_, 0));
  }
  comm_.all_gather(data(out_, seg), data(full_, seg * world), seg);
  for (Param& p : params_) {
    if (!p.takes_part() || (orthogonalizes_after_exchange() && rules::All::orthogonalizes(p.rule)))
      continue;
    for (int r = 0; r < world; ++r)
      if (r != me) backend_.copy(ConstView(packed(full_, r, p.pieces[r])), block(p.value, p.pieces[r]));
  }
  if (!status) return tally;
  detail::Tally all;
  for (int r = 0; r < world; ++r) {
    backend_.copy_to_host(ConstView(status_view(full_, r)), status_host_.data());
    all.refused += static_cast<std::size_t>(status_host_[0]);
    if (status_host_[1] > 0) all.first = std::min(all.first, static_cast<std::size_t>(status_host_[1]) - 1);
  }
  return all;
}

template <class B, class T, class C>
void ShardedOptimizer<B, T, C>::gathered_input(const Param& p, const Part& part, View in) {
  for (int r = 0; r < comm_.size(); ++r) {
    const Piece& pr = p.pieces[r];
    if (p.parts.size() == 1)
      backend_.copy(ConstView(packed(full_, r, pr)), block(in, pr));
    else if (part.inside(pr.row0, pr.col0, pr.rows, pr.cols))
      backend_.copy(ConstView(detail::part_view(packed(full_, r, pr), part, pr.row0, pr.col0)), in);
  }
}

template <class B, class T, class C>
void ShardedOptimizer<B, T, C>::restore_momentum(Param& p, const Part& part) {
  const Piece mine = piece(p);
  if (mine.empty()) return;
  const View m = backend_.view(p.state[0], mine.rows, mine.cols);
  const View saved = packed(saved_, 0, mine);
  if (p.parts.size() == 1)
    backend_.copy(ConstView(saved), m);
  else if (part.inside(mine.row0, mine.col0, mine.rows, mine.cols))
    backend_.copy(ConstView(detail::part_view(saved, part, mine.row0, mine.col0)),
                  detail::part_view(m, part, mine.row0, mine.col0));
}

}  // namespace muon
