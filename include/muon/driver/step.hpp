#pragma once
// Internal: included by the library's own headers, not by programs.
// The driver's step protocol (OptimizerCore, driver/optimizer_core.hpp): the non-finite check,
// the placement's gradient reduction, the elementwise rules' chunks and every matrix of the
// orthogonalizing rules (momentum, Newton-Schulz, check, apply) over the backend's workers,
// the placement's exchange, and the report.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "muon/driver/optimizer_core.hpp"
#include "muon/driver/batching.hpp"
#include "muon/driver/planning.hpp"

namespace muon::detail {

// Out of the class body, so not implicitly inline: where a translation unit declares the
// optimizer's instantiation extern (MUON_COMPILED, muon/eigen.hpp), g++ then leaves step()
// and everything it calls to the compiled library instead of compiling them again.
template <class Derived, class B, class T, class ParamExtra>
StepReport OptimizerCore<Derived, B, T, ParamExtra>::step() {
  const auto entered = enter("step");
  check_watched_storage();
  Derived& d = self();
  d.prepare_step();
  const Param* bad = first_nonfinite_grad();
  if (d.refused_together(bad)) return d.refuse(bad);
  d.reduce_gradients();
  measure_gradient_norms();
  std::size_t updated = 0;
  chunks_.clear();
  for (std::size_t i = 0; i < params_.size(); ++i) {
    Param& p = params_[i];
    if (!p.takes_part()) continue;
    ++updated;
    if (!rules::All::orthogonalizes(p.rule)) {
      queue_elementwise(i);
      continue;
    }
    if constexpr (Derived::exchanges) {  // zero1: this rank's slice of U goes to the others
      if (d.orthogonalizes_after_exchange() && !d.piece(p).empty())
        (this->*work_of(p).exchange_input)(p);
    }
  }
  // The elementwise pieces, and the matrices whose inputs are here (not zero1's), together.
  const bool after = after_exchange();
  run_tasks(!after);
  for (Param& p : params_)
    if (p.takes_part() && !rules::All::orthogonalizes(p.rule)) {
      ++p.updates;
      d.publish(p, nullptr);
    }
  Tally tally = d.exchange(after ? Tally{} : local_tally());
  if (after) {
    chunks_.clear();
    run_tasks(true);
    tally = local_tally();
  }
  ++steps_;
  return finish(updated, tally);
}

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::use_every_rule() {
  rules::All::for_each([&](auto rule) { use<decltype(rule)>(); });
}

template <class Derived, class B, class T, class ParamExtra>
auto OptimizerCore<Derived, B, T, ParamExtra>::first_nonfinite_grad() -> const Param* {
  if (!checked()) return nullptr;
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

template <class Derived, class B, class T, class ParamExtra>
template <class R>
void OptimizerCore<Derived, B, T, ParamExtra>::exchange_input_of(Param& p) {
  Derived& d = self();
  const View m = state_views<R>(p, d.piece(p))[0];
  if (checked()) backend_.copy(ConstView(m), d.saved_piece(p));
  R::accumulate(backend_, m, d.gradient(p), d.exchange_input(p), R::options(groups_[p.group].options));
}

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::run_chunk(const Chunk& c) {
  (this->*work_of(params_[c.param]).chunk)(c);
}

template <class Derived, class B, class T, class ParamExtra>
template <class R>
void OptimizerCore<Derived, B, T, ParamExtra>::run_chunk_of(const Chunk& c) {
  Param& p = params_[c.param];
  const Piece mine = self().piece(p);
  auto state = state_views<R>(p, mine);
  for (View& v : state) v = v.block(c.row0, 0, c.rows, mine.cols);
  R::update(backend_, block(p.value, mine).block(c.row0, 0, c.rows, mine.cols),
            self().gradient(p).block(c.row0, 0, c.rows, mine.cols), state.data(),
            R::options(groups_[p.group].options), p.updates + 1);
}

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::run_tasks(bool matrices) {
  ready_.clear();
  spread_.clear();
  if (matrices)
    for (std::size_t u : order_) {
      outcomes_[u] = Outcome{};
      const Param& p = params_[units_[u].param];
      if (!p.takes_part() || !self().orthogonalizes_here(p) || part_of(units_[u]).empty() ||
          batched_[u])
        continue;
      (side_by_side(part_of(units_[u])) ? spread_ : ready_).push_back(u);
    }
  for (std::size_t c = 0; c < chunks_.size(); ++c) spread_.push_back(units_.size() + c);
  const auto task = [&](std::size_t i, int worker) {
    const std::size_t t = spread_[i];
    if (t < units_.size())
      run_matrix(t, workers_[static_cast<std::size_t>(worker)]);
    else
      run_chunk(chunks_[t - units_.size()]);
  };
  if constexpr (RunsSideBySide<B>) {
    if (!spread_.empty())  // even one matrix: its products then round as side by side
      backend_.side_by_side(spread_.size(), task);
  } else {
    for (std::size_t i = 0; i < spread_.size(); ++i) task(i, 0);
  }
  for (std::size_t u : ready_) run_matrix(u, workers_[0]);
  if (matrices) run_batches();
}

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::run_matrix(std::size_t u, Worker& w) {
  (this->*work_of(params_[units_[u].param]).matrix)(u, w);
}

template <class Derived, class B, class T, class ParamExtra>
template <class R>
void OptimizerCore<Derived, B, T, ParamExtra>::run_matrix_of(std::size_t u, Worker& w) {
  const Param& p = params_[units_[u].param];
  const Part& part = part_of(units_[u]);
  const View in = w.ns.input(backend_, part.rows, part.cols);
  const View saved = backend_.view(w.saved, part.rows, part.cols);
  prepare_input<R>(u, in, saved);
  const View scratch = this->scratch<R>(w.scratch, part);
  observe<R>(u, ConstView(in), scratch);
  const ConstView o = w.ns.run(backend_, part.rows, part.cols, schedule<R>(p),
                               R::options(groups_[p.group].options).newton_schulz,
                               options_.telemetry ? &outcomes_[u].ns : nullptr);
  finish_matrix<R>(u, o, saved, scratch);
}

template <class Derived, class B, class T, class ParamExtra>
template <class R>
void OptimizerCore<Derived, B, T, ParamExtra>::prepare_input(std::size_t u, View in, View saved) {
  Param& p = params_[units_[u].param];
  const Part& part = p.parts[units_[u].part];
  Derived& d = self();
  if (after_exchange()) {
    if constexpr (Derived::exchanges) d.gathered_input(p, part, in);
    return;
  }
  const Piece mine = d.piece(p);
  const View m = part_view(state_views<R>(p, mine)[0], part, mine.row0, mine.col0);
  if (checked()) backend_.copy(ConstView(m), saved);
  R::accumulate(backend_, m, part_view(d.gradient(p), part, mine.row0, mine.col0), in,
                R::options(groups_[p.group].options));
}

template <class Derived, class B, class T, class ParamExtra>
template <class R>
void OptimizerCore<Derived, B, T, ParamExtra>::finish_matrix(std::size_t u, ConstView o, View saved, View scratch, bool known_finite) {
  Param& p = params_[units_[u].param];
  const Part& part = p.parts[units_[u].part];
  Outcome& out = outcomes_[u];
  out.ran = true;
  Derived& d = self();
  const auto& options = R::options(groups_[p.group].options);
  if (checked() && !known_finite && !backend_.all_finite(o)) {
    out.refused = true;
    if (after_exchange()) {
      if constexpr (Derived::exchanges) d.restore_momentum(p, part);
    } else {
      const Piece mine = d.piece(p);
      backend_.copy(ConstView(saved), part_view(state_views<R>(p, mine)[0], part, mine.row0, mine.col0));
    }
    return;
  }
  const auto state = matrix_views<R>(p, part);
  R::apply(backend_, part_view(p.value, part), o, state.data(), scratch, options);
  if constexpr (measures_residual<B, T>)
    if (options_.telemetry)
      out.update_rms = !fixed_update_scale<R>()
                           ? std::numeric_limits<double>::quiet_NaN()
                           : R::update_scale(options, part.rows, part.cols) * backend_.frobenius_norm(o) /
                                 std::sqrt(static_cast<double>(part.rows) * static_cast<double>(part.cols));
  d.publish(p, &part);
}

template <class Derived, class B, class T, class ParamExtra>
Tally OptimizerCore<Derived, B, T, ParamExtra>::local_tally() const {
  Tally t;
  std::size_t last = std::numeric_limits<std::size_t>::max();
  for (std::size_t u = 0; u < units_.size(); ++u) {
    if (!outcomes_[u].refused || units_[u].param == last) continue;
    last = units_[u].param;
    t.first = std::min(t.first, last);
    ++t.refused;
  }
  return t;
}

template <class Derived, class B, class T, class ParamExtra>
StepReport OptimizerCore<Derived, B, T, ParamExtra>::finish(std::size_t updated, const Tally& tally) {
  StepReport report{true, updated - tally.refused, {}, tally.refused, {}};
  if (options_.telemetry)
    for (std::size_t u = 0; u < units_.size(); ++u)
      if (outcomes_[u].ran && !outcomes_[u].refused)
        report.newton_schulz.push_back({ParamId{units_[u].param}, outcomes_[u].ns.residual,
                                        outcomes_[u].update_rms, outcomes_[u].ns.steps,
                                        units_[u].part});
  if (tally.refused == 0) return report;
  const Param& p = params_[tally.first];
  report.skipped_because = p.name;
  if (options_.non_finite == NonFinitePolicy::skip) return report;
  throw NonFiniteUpdate("muon: the Newton-Schulz result of parameter '" + p.name + "' (" +
                            shape_string(p.shape) +
                            ") is not finite (its momentum overflowed?); that matrix and its "
                            "momentum were left as they were, the others took this step",
                        p.name);
}

}  // namespace muon::detail
