#pragma once
// muon::ShardedOptimizer<Backend, Scalar, Communicator>: data-parallel Muon + AdamW. Every rank
// holds the full parameters and its own local gradients; step() averages the gradients over
// the ranks and updates the parameters identically on every rank, with the optimizer state
// sharded. Strategies:
//
//   owner_compute  Each Muon matrix is owned by one rank (balanced by its cost k^2 N, k <= N
//                  its sides); AdamW parameters are sliced as under zero1. Gradients are
//                  reduce-scattered, each owner runs momentum, Newton-Schulz and the update on
//                  whole matrices, and the new parameters are all-gathered. Every matrix is
//                  orthogonalized once in the world. Bitwise equal to muon::Optimizer given the
//                  same averaged gradients.
//   zero1          ZeRO-1 (Moonlight, arXiv:2502.16982): every parameter is split along its
//                  longer side into N padded slices. Gradients are reduce-scattered, each rank
//                  updates the momentum of its slice and contributes the slice of the Nesterov
//                  input U; U is all-gathered and every rank runs Newton-Schulz on the whole
//                  matrix and applies the update to its full copy (so the parameters of Muon
//                  matrices need no second all-gather; AdamW slices are all-gathered).
//
// Both issue one reduce-scatter and one all-gather per step, as ZeRO-1 AdamW does. zero1 moves
// exactly AdamW's bytes and holds 1/N of the single-process state; owner_compute pads every
// rank's segment to the busiest rank's Muon matrices, so its bytes and state exceed 1/N by the
// imbalance of the partition (bench/comm_volume prints both). Plus one full-size gather buffer.
//
// Every rank must register the same parameters in the same order, with the same group options,
// clear the same gradients, and call step(), save_state and load_state together. Each step
// checks that collectively with the non-finite check, in two all_reduce_max of one word (the
// flag and a fingerprint of registration, options and gradients present), so a disagreement is
// refused on every rank together. Under NonFinitePolicy::unchecked step() issues no such
// collective, except at the first step after a registration: an option changed on some ranks
// only then goes unnoticed. A rank that meets a non-finite gradient or a bad state file makes
// every rank refuse together. A parameter registered after steps is laid out after the others,
// so their state and AdamW step counts carry on unchanged (a state saved after such a late
// registration reloads into an optimizer registered in the same sequence).
//
// Newton-Schulz results are checked as muon::Optimizer checks them (NonFiniteUpdate): under
// owner_compute the owners' verdicts travel with the all-gather, two scalars per rank, so
// every rank reports the same refusals; under zero1 every rank orthogonalizes every matrix and
// reaches the verdict itself (the momentum slices are kept in a scratch segment meanwhile).
// Telemetry reports the matrices this rank orthogonalized.
//
// Multi-matrix parameters (expert stacks, split matrices): owner_compute gives the whole
// parameter to one rank; zero1 slices it along its split at matrix boundaries, so that every
// matrix's slice of U is on one rank.
//
// A rule's state per matrix row (NorMuon's second moment) lives where the matrix is
// orthogonalized: on its owner under owner_compute; on every rank under zero1, which keeps a
// whole copy that every rank updates identically from the same Newton-Schulz result (one
// value per row, 1/cols of the momentum's size, so it is not sliced).
//
// step() is detail::OptimizerCore's, the driver muon::Optimizer runs, and so are groups,
// registration, gradients, state buffers and the checks; this class is the placement: the
// layout of the pieces and the exchange.
#include <algorithm>
#include <array>
#include <cstdint>
#include <istream>
#include <numeric>
#include <ostream>
#include <string>
#include <vector>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/core/adapter.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/serialize.hpp"
#include "muon/distributed/communicator.hpp"
#include "muon/driver/optimizer_core.hpp"
#include "muon/driver/state_file.hpp"

namespace muon {

enum class ShardingStrategy : std::uint8_t { owner_compute = 0, zero1 = 1 };

inline const char* to_string(ShardingStrategy s) {
  return s == ShardingStrategy::zero1 ? "zero1" : "owner_compute";
}

namespace detail {
/// The sharded placement's data of one parameter: its piece on every rank.
struct ShardedPieces {
  std::vector<Piece> pieces;
};

/// A hash of everything the ranks must agree on in a group: every rule's options, with each
/// orthogonalizing rule's schedule as resolved.
inline std::uint64_t options_fingerprint(
    const GroupOptions& g,
    const std::array<std::vector<Coefficients>, rules::All::count>& schedules) {
  StateWriter w;
  rules::All::for_each([&](auto rule) {
    using R = decltype(rule);
    R::fields(R::options(g), [&](const char*, const auto& value) {
      w.put<double>(static_cast<double>(value));
    });
    if constexpr (R::orthogonalizes) {
      w.put<double>(R::options(g).newton_schulz.schedule.norm_scale());
      for (const Coefficients& c : schedules[rules::All::index(R::id)])
        for (double x : {c.a, c.b, c.c}) w.put<double>(x);
    }
  });
  return fnv1a64(w.finish());
}
}  // namespace detail

template <class B, class T, class C>
class ShardedOptimizer
    : public detail::OptimizerCore<ShardedOptimizer<B, T, C>, B, T, detail::ShardedPieces> {
  static_assert(SupportedScalar<T>,
                "muon::ShardedOptimizer<Backend, Scalar, Comm>: Scalar must be float or double.");
  static_assert(Backend<B, T>,
                "muon::ShardedOptimizer<Backend, Scalar, Comm>: Backend does not provide, for "
                "this Scalar, the operations listed by the muon::Backend concept.");
  static_assert(Communicator<C, T>,
                "muon::ShardedOptimizer<Backend, Scalar, Comm>: Comm does not provide the "
                "collectives listed by the muon::Communicator concept in "
                "muon/distributed/communicator.hpp.");
  static_assert(std::is_same_v<typename C::memory_space, typename B::memory_space>,
                "muon::ShardedOptimizer: the communicator and the backend must work in the same "
                "memory space");
  using Core = detail::OptimizerCore<ShardedOptimizer<B, T, C>, B, T, detail::ShardedPieces>;

 public:
  using typename Core::Space;
  using typename Core::View;
  using typename Core::ConstView;

  ShardedOptimizer(C comm, ShardingStrategy strategy, GroupOptions defaults = {},
                   OptimizerOptions options = {}, B backend = B{})
      : Core(std::move(backend), options, defaults), comm_(std::move(comm)), strategy_(strategy) {
    detail::require_enum(strategy, "ShardedOptimizer", "strategy", ShardingStrategy::owner_compute,
                         ShardingStrategy::zero1);
  }

  // Groups, add_muon / add_adamw and introspection: see detail::OptimizerCore
  // (muon/driver/optimizer_core.hpp) and detail::Registrar. What changes what the ranks must
  // agree on is checked again, collectively, at the next step.

  /// Replaces a group's options (e.g. a learning-rate schedule); call it on every rank.
  void set_group_options(GroupId id, const GroupOptions& options) {
    Core::set_group_options(id, options);
    fingerprint_stale_ = true;
  }
  /// Points a parameter at a (new) local gradient of the same shape.
  void set_grad(ParamId id, ConstView grad) {
    const bool had = this->param(id).has_grad;
    Core::set_grad(id, grad);
    if (!had) fingerprint_stale_ = true;
  }
  /// The parameter has no gradient on any rank this step (call it on every rank): step()
  /// leaves it and its state alone until set_grad().
  void clear_grad(ParamId id) {
    const bool had = this->param(id).has_grad;
    Core::clear_grad(id);
    if (had) fingerprint_stale_ = true;
  }

  // step(): detail::OptimizerCore's, collective here: call it on every rank. Gradients are
  // averaged over the ranks.

  // ---- introspection ---------------------------------------------------------------------
  [[nodiscard]] ShardingStrategy strategy() const noexcept { return strategy_; }
  [[nodiscard]] C& communicator() noexcept { return comm_; }
  /// Bytes of optimizer state (momenta, AdamW moments, state per matrix row) this rank holds.
  [[nodiscard]] std::size_t state_bytes() {
    lay_out();
    std::size_t n = 0;
    for (const Param& p : params_)
      n += static_cast<std::size_t>(p.pieces[comm_.rank()].size()) * rules::All::buffers(p.rule) +
           static_cast<std::size_t>(this->state_rows(p)) * rules::All::row_buffers(p.rule);
    return n * sizeof(T);
  }
  /// Bytes of the communication buffers: the full-size gather buffer and two 1/N segments.
  [[nodiscard]] std::size_t buffer_bytes() {
    lay_out();
    return static_cast<std::size_t>(segment_) * (static_cast<std::size_t>(comm_.size()) + 2) *
           sizeof(T);
  }
  /// The rows x cols block of parameter `id` whose optimizer state lives on this rank.
  struct Slice {
    index_t row0 = 0, col0 = 0, rows = 0, cols = 0;
  };
  [[nodiscard]] Slice local_slice(ParamId id) {
    this->check_param(id);
    lay_out();
    const Piece& p = params_[id.value].pieces[comm_.rank()];
    return {p.row0, p.col0, p.rows, p.cols};
  }

  // ---- state (per rank) ------------------------------------------------------------------
  // save_state(std::ostream&) writes this rank's state; load_state(std::istream&) restores a
  // state saved at the same world size, strategy and registration. Both are collective: if any
  // rank's state is refused, every rank throws and no rank changes anything. The layout is in
  // driver/state_file.hpp.

 private:
  friend Core;
  friend detail::PlacementAccess;
  using Piece = detail::Piece;
  using Part = detail::Part;
  using typename Core::Buffer;
  using typename Core::Param;
  using Core::backend_;
  using Core::groups_;
  using Core::options_;
  using Core::params_;
  using Core::steps_;
  using Core::block;
  static constexpr char kMagic[8] = {'\x89', 'M', 'U', 'O', 'N', 'D', 'P', '\x1a'};

  // ---- the state file's hooks (driver/state_file.hpp) ---------------------------------------
  static constexpr bool slices_state = true;
  static std::string_view state_magic() { return {kMagic, sizeof kMagic}; }
  static const char* state_kind() { return "sharded muon optimizer state"; }
  void write_state_header(detail::StateWriter& w) const {
    w.put<std::uint32_t>(static_cast<std::uint32_t>(comm_.size()));
    w.put<std::uint32_t>(static_cast<std::uint32_t>(comm_.rank()));
    w.put<std::uint8_t>(static_cast<std::uint8_t>(strategy_));
  }
  void read_state_header(detail::StateReader& r) const {
    const auto world = r.get<std::uint32_t>("world size");
    const auto rank = r.get<std::uint32_t>("rank");
    const auto strategy = r.get<std::uint8_t>("strategy");
    if (world != std::uint32_t(comm_.size()) || rank != std::uint32_t(comm_.rank()) ||
        strategy != std::uint8_t(strategy_))
      throw StateError("muon: load_state: the state was saved by rank " + std::to_string(rank) +
                       " of " + std::to_string(world) + " (strategy " + std::to_string(strategy) +
                       ") but this is rank " + std::to_string(comm_.rank()) + " of " +
                       std::to_string(comm_.size()) + " (" + to_string(strategy_) +
                       "); reload at the same world size and strategy");
  }
  void state_begin() { agree(false); }  // lays out, and checks the ranks agree
  void state_verdict(const std::string& error) {
    if (comm_.all_reduce_max(error.empty() ? 0 : 1) != 0)
      throw StateError(error.empty() ? "muon: load_state: the state was refused on another rank; "
                                       "nothing was changed"
                                     : error);
  }
  void state_written(bool ok) {
    if (comm_.all_reduce_max(ok ? 0 : 1) != 0)
      throw StateError("muon: save_state: writing the optimizer state failed on " +
                       std::string(ok ? "another rank" : "this rank"));
  }

  // ---- the placement hooks of detail::OptimizerCore ----------------------------------------
  static constexpr bool exchanges = true;
  void placed(Param&) {}  // laid out, with its state, at the next step
  void prepare_step() { lay_out(); }
  /// Validates before communicating: every rank learns whether any rank saw a NaN/Inf and
  /// whether the ranks agree (no collective when unchecked and nothing was registered).
  bool refused_together(const Param* bad) {
    return (options_.non_finite != NonFinitePolicy::unchecked || agreed_ != laid_out_) &&
           agree(bad != nullptr);
  }
  StepReport refuse(const Param* bad) const {
    const std::string who = bad != nullptr ? "parameter '" + bad->name + "' on rank " +
                                                 std::to_string(comm_.rank())
                                           : "a parameter on another rank";
    if (options_.non_finite == NonFinitePolicy::skip) return {false, 0, who, 0, {}};
    throw NonFiniteGradient("muon: step refused on every rank: the gradient of " + who +
                                " contains NaN or Inf; no parameter or state was changed",
                            bad != nullptr ? bad->name : std::string());
  }
  /// Packs every rank's slice of every local gradient, reduce-scatters and averages.
  void reduce_gradients() {
    const int world = comm_.size();
    const auto seg = static_cast<std::size_t>(segment_);
    for (Param& p : params_)
      if (p.takes_part())
        for (int r = 0; r < world; ++r) backend_.copy(block(p.grad, p.pieces[r]), packed(full_, r, p.pieces[r]));
    comm_.reduce_scatter_sum(data(full_, seg * world), data(reduced_, seg), seg);
    if (world > 1) backend_.scale(backend_.view(reduced_, 1, segment_), T(1) / static_cast<T>(world));
  }
  /// This rank's piece (none before the parameter is laid out).
  Piece piece(const Param& p) const {
    return p.pieces.empty() ? Piece{} : p.pieces[static_cast<std::size_t>(comm_.rank())];
  }
  ConstView gradient(const Param& p) { return packed(reduced_, 0, piece(p)); }
  /// Whether this rank orthogonalizes parameter p (zero1: every Muon matrix; owner: its own);
  /// false until p is laid out (its workspace is reserved then).
  bool orthogonalizes_here(const Param& p) const {
    return rules::All::orthogonalizes(p.rule) && !p.pieces.empty() &&
           (strategy_ == ShardingStrategy::zero1 || !piece(p).empty());
  }
  bool orthogonalizes_after_exchange() const { return strategy_ == ShardingStrategy::zero1; }
  /// What the others need of this rank's update goes into out_: the piece of an elementwise
  /// rule, or (owner_compute) a matrix just updated.
  void publish(Param& p, const Part* part) {
    const Piece mine = piece(p);
    if (part == nullptr)
      backend_.copy(ConstView(block(p.value, mine)), packed(out_, 0, mine));
    else if (strategy_ == ShardingStrategy::owner_compute)
      backend_.copy(ConstView(detail::part_view(p.value, *part)),
                    detail::part_view(packed(out_, 0, mine), *part, mine.row0, mine.col0));
  }
  /// All-gather; every rank completes its full copy of every parameter (zero1's Muon pieces
  /// are U, which the matrices read with gathered_input()). Under checked owner_compute the
  /// owners' refusals travel in the two status scalars at the end of each segment.
  detail::Tally exchange(detail::Tally tally) {
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
  View exchange_input(const Param& p) { return packed(out_, 0, piece(p)); }
  View saved_piece(const Param& p) { return packed(saved_, 0, piece(p)); }
  /// zero1: the matrix's U from the gathered pieces (a matrix of a multi-matrix parameter lies
  /// in one rank's piece).
  void gathered_input(const Param& p, const Part& part, View in) {
    for (int r = 0; r < comm_.size(); ++r) {
      const Piece& pr = p.pieces[r];
      if (p.parts.size() == 1)
        backend_.copy(ConstView(packed(full_, r, pr)), block(in, pr));
      else if (part.inside(pr.row0, pr.col0, pr.rows, pr.cols))
        backend_.copy(ConstView(detail::part_view(packed(full_, r, pr), part, pr.row0, pr.col0)), in);
    }
  }
  /// zero1: puts back this rank's slice of a refused matrix's momentum.
  void restore_momentum(Param& p, const Part& part) {
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
  bool carries_status() const {
    return strategy_ == ShardingStrategy::owner_compute &&
           options_.non_finite != NonFinitePolicy::unchecked && comm_.size() > 1;
  }
  /// The two status scalars at the end of rank r's segment of a packed buffer.
  View status_view(Buffer& buf, int r) {
    return packed(buf, r, Piece{0, 0, 1, 2, segment_ - 2});
  }

  /// Collective, two all_reduce_max of one word: whether any rank's `nonfinite` is true
  /// (returned), and otherwise whether every rank has the same fingerprint (registration, group
  /// options, gradients present); InvalidArgument on every rank if not. A rank whose word is not
  /// the largest sees the difference in the first maximum, one whose word is not the smallest
  /// in the second, so every rank sees it.
  bool agree(bool nonfinite) {
    lay_out();
    if (fingerprint_stale_) fingerprint_ = fingerprint();
    fingerprint_stale_ = false;
    constexpr std::uint64_t kFlag = std::uint64_t(1) << 63;
    const std::uint64_t flag = nonfinite ? kFlag : 0, low = fingerprint_ & ~kFlag,
                        high = ~fingerprint_ & ~kFlag;
    const std::uint64_t first = comm_.all_reduce_max(flag | low);
    const std::uint64_t second = comm_.all_reduce_max(flag | high);
    if ((first & kFlag) != 0) return true;  // refused on every rank; agreement checked next time
    if (first != low || second != high)
      throw InvalidArgument("muon: ShardedOptimizer: the ranks registered different parameters "
                            "or group options, or cleared different gradients (names, shapes, "
                            "rules, order, options or gradients present differ); nothing was "
                            "changed");
    agreed_ = laid_out_;
    return false;
  }
  std::uint64_t fingerprint() const {
    detail::StateWriter w;
    w.put_string(to_string(strategy_));
    w.put<std::uint8_t>(static_cast<std::uint8_t>(options_.non_finite));
    for (const auto& g : groups_) w.put<std::uint64_t>(detail::options_fingerprint(g.options, g.schedules));
    for (const Param& p : params_) {
      w.put_string(p.name);
      for (index_t e : {p.value.rows(), p.value.cols()}) w.put<std::uint64_t>(static_cast<std::uint64_t>(e));
      w.put<std::uint8_t>(static_cast<std::uint8_t>(p.rule));
      w.put<std::uint64_t>(p.group);
      w.put<std::uint8_t>(p.has_grad ? 1 : 0);
      w.put<std::uint64_t>(p.parts.size());
      for (const Part& part : p.parts)
        for (index_t e : {part.row0, part.col0, part.block_rows, part.block_cols, part.rows, part.cols})
          w.put<std::uint64_t>(static_cast<std::uint64_t>(e));
    }
    return detail::fnv1a64(w.finish());
  }

  /// Lays out the parameters registered since the last call (local, deterministic). Those laid
  /// out before keep their pieces, offsets and state; the new ones go after them.
  void lay_out() {
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
  /// zero1's slices of one parameter at offset `at` of every segment: its longer side split
  /// into `world` padded slices, or a multi-matrix parameter split along its matrices at
  /// matrix boundaries. Returns the slice length (elements) every segment reserves.
  index_t slice(Param& p, int world, index_t at) {
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
  static double cost(const Param& p) {
    double c = 0;
    for (const Part& q : p.parts)
      c += static_cast<double>(std::min(q.rows, q.cols)) * static_cast<double>(q.rows) *
           static_cast<double>(q.cols);
    return c;
  }

  // ---- views of pieces ---------------------------------------------------------------------
  T* data(Buffer& buf, std::size_t n) { return backend_.view(buf, 1, static_cast<index_t>(n)).data(); }
  /// Piece `p` of rank r's segment in a packed buffer, as a dense rows x cols view.
  View packed(Buffer& buf, int r, const Piece& p) {
    T* base = backend_.view(buf, 1, segment_ * comm_.size()).data();
    return View(base + static_cast<std::size_t>(r) * static_cast<std::size_t>(segment_) +
                    static_cast<std::size_t>(p.offset),
                p.rows, p.cols, p.cols, 1);
  }
  template <class X>
  static MatrixView<X, Space> block(MatrixView<X, Space> v, const Piece& p) {
    return v.block(p.row0, p.col0, p.rows, p.cols);
  }

  C comm_;
  ShardingStrategy strategy_;
  Buffer full_, reduced_, out_;
  Buffer saved_;                // zero1, checked: this rank's momentum slices during a step
  std::vector<T> status_host_;  // owner_compute, checked: one rank's status scalars
  index_t segment_ = 0;
  std::vector<index_t> used_;  // each rank's segment length so far
  std::vector<double> load_;   // owner_compute: each rank's Newton-Schulz cost so far
  std::size_t laid_out_ = 0;   // parameters laid out
  std::size_t agreed_ = 0;     // parameters laid out when the ranks last agreed
  std::uint64_t fingerprint_ = 0;
  bool fingerprint_stale_ = true;
};

}  // namespace muon
