#pragma once
// Internal: included by the library's own headers, not by programs
// (<muon/distributed/sharded_optimizer.hpp> is the public one, and says what the class does).
// muon::ShardedOptimizer's class: its public interface, its state and the placement hooks the
// driver calls; the larger members are defined by concern in layout.hpp, exchange.hpp and
// agreement.hpp beside it.
#include <algorithm>
#include <array>
#include <cstdint>
#include <istream>
#include <numeric>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/core/adapter.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/serialize.hpp"
#include "muon/distributed/communicator.hpp"
#include "muon/driver/step.hpp"
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
           static_cast<std::size_t>(this->matrix_state_size(p)) * rules::All::matrix_buffers(p.rule);
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
  void reduce_gradients();
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
  void publish(Param& p, const Part* part);
  /// All-gather; every rank completes its full copy of every parameter (zero1's Muon pieces
  /// are U, which the matrices read with gathered_input()). Under checked owner_compute the
  /// owners' refusals travel in the two status scalars at the end of each segment.
  detail::Tally exchange(detail::Tally tally);
  View exchange_input(const Param& p) { return packed(out_, 0, piece(p)); }
  View saved_piece(const Param& p) { return packed(saved_, 0, piece(p)); }
  /// zero1: the matrix's U from the gathered pieces (a matrix of a multi-matrix parameter lies
  /// in one rank's piece).
  void gathered_input(const Param& p, const Part& part, View in);
  /// zero1: puts back this rank's slice of a refused matrix's momentum.
  void restore_momentum(Param& p, const Part& part);
  /// zero1: each value becomes its sum over the ranks (a matrix's ||G||_F^2 from the slices
  /// of its gradient); owner_compute's owner holds the whole gradient already.
  void sum_over_ranks(View v) {
    if (strategy_ == ShardingStrategy::zero1) comm_.all_reduce_sum(v.data(), static_cast<std::size_t>(v.size()));
  }
  bool carries_status() const {
    return strategy_ == ShardingStrategy::owner_compute &&
           options_.non_finite != NonFinitePolicy::unchecked && comm_.size() > 1;
  }
  /// The two status scalars at the end of rank r's segment of a packed buffer.
  View status_view(Buffer& buf, int r) {
    return packed(buf, r, Piece{0, 0, 1, 2, segment_ - 2});
  }

  /// Collective, two all_reduce_max of one word: whether any rank's `refused` is true
  /// (returned), and otherwise whether every rank has the same `fingerprint`; InvalidArgument
  /// with `disagreement` on every rank if not. A rank whose word is not the largest sees the
  /// difference in the first maximum, one whose word is not the smallest in the second, so
  /// every rank sees it.
  bool handshake(bool refused, std::uint64_t fingerprint, const char* disagreement);
  /// The handshake before a step or a state file changes anything, on `nonfinite` and the
  /// fingerprint of the registration, the group options and the gradients present.
  bool agree(bool nonfinite);
  std::uint64_t fingerprint() const;
  /// Collective, for QK-clip: the handshake on `bad` and the clip's fingerprint, then one
  /// all_reduce_max per value (each rank holds every parameter whole, so each rescales its own
  /// copy by the same factors).
  bool agree_on_maxima(std::span<double> maxima, bool bad, std::uint64_t fingerprint);

  /// Lays out the parameters registered since the last call (local, deterministic). Those laid
  /// out before keep their pieces, offsets and state; the new ones go after them.
  void lay_out();
  /// zero1's slices of one parameter at offset `at` of every segment: its longer side split
  /// into `world` padded slices, or a multi-matrix parameter split along its matrices at
  /// matrix boundaries. Returns the slice length (elements) every segment reserves.
  index_t slice(Param& p, int world, index_t at);
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
