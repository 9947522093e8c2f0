#pragma once
// Internal: included by the library's own headers, not by programs.
// What the driver (OptimizerCore, driver/optimizer_core.hpp) asks of a placement, the
// class that says where each piece of a parameter lives and derives from the driver:
// muon::Optimizer (every parameter whole, here) and muon::ShardedOptimizer (pieces on ranks).
// The hooks are private to the placement; it befriends the driver and PlacementAccess, through
// which the Placement concept below sees them. The driver checks the concept once it knows the
// placement, so a missing or misspelt hook is one error that names it.
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>

#include "muon/core/parts.hpp"
#include "muon/core/serialize.hpp"

namespace muon::detail {

/// A rows x cols block of a parameter's flattened matrix, stored densely at `offset` of a
/// segment (the sharded placement's exchange buffers).
struct Piece {
  index_t row0 = 0, col0 = 0, rows = 0, cols = 0, offset = 0;
  [[nodiscard]] index_t size() const { return rows * cols; }
  [[nodiscard]] bool empty() const { return rows == 0 || cols == 0; }
};

/// The orthogonalizing rules' refusals of one step: how many parameters, and the first.
struct Tally {
  std::size_t refused = 0;
  std::size_t first = std::numeric_limits<std::size_t>::max();
};

struct PlacementAccess {
  // The step's hooks, in the order step() calls them.
  template <class D, class Param = typename D::Param>
  static constexpr bool steps = requires(D& d, Param& p, const Param* bad, const Part* part,
                                         Tally t) {
    { D::exchanges } -> std::convertible_to<bool>;
    d.placed(p);          // a parameter was registered (size its state now, or at the next step)
    d.prepare_step();     // lay out what was registered since
    { d.refused_together(bad) } -> std::same_as<bool>;  // any rank saw a NaN/Inf gradient
    d.refuse(bad);        // the step is refused: throw, or return the skip report
    d.reduce_gradients();  // average the gradients over the ranks
    { d.piece(p) } -> std::same_as<Piece>;  // the block of the parameter this process updates
    { d.gradient(p) } -> std::convertible_to<typename D::ConstView>;  // that block's gradient
    { d.orthogonalizes_here(p) } -> std::same_as<bool>;  // this process runs its matrices
    d.publish(p, part);   // the piece (or one matrix) was updated here
    { d.exchange(t) } -> std::same_as<Tally>;  // the ranks' updates and tallies meet
  };
  // QK-clip's: each value becomes its largest over the ranks; true if any rank is `bad`
  // (InvalidArgument on every rank if their clips' fingerprints differ).
  template <class D>
  static constexpr bool clips = requires(D& d, std::span<double> maxima, std::uint64_t fingerprint) {
    { d.agree_on_maxima(maxima, true, fingerprint) } -> std::same_as<bool>;
  };
  // With an exchange, the hooks of the strategy that moves Newton-Schulz inputs (zero1).
  template <class D, class Param = typename D::Param>
  static constexpr bool exchanges_inputs = requires(D& d, Param& p, const Part& part,
                                                    typename D::View v) {
    { d.orthogonalizes_after_exchange() } -> std::same_as<bool>;
    { d.exchange_input(p) } -> std::same_as<typename D::View>;
    { d.saved_piece(p) } -> std::same_as<typename D::View>;
    d.gathered_input(p, part, v);
    d.restore_momentum(p, part);
    d.sum_over_ranks(v);  // each value becomes its sum over the ranks (NAMO's ||G||_F^2)
  };
  // The state file's (driver/state_file.hpp).
  template <class D>
  static constexpr bool files = requires(D& d, StateWriter& w, StateReader& r,
                                         const std::string& error) {
    { D::slices_state } -> std::convertible_to<bool>;  // a piece's extents are recorded
    { d.state_magic() } -> std::convertible_to<std::string_view>;
    { d.state_kind() } -> std::convertible_to<const char*>;
    d.write_state_header(w);
    d.read_state_header(r);
    d.state_begin();          // collective: before reading or writing
    d.state_verdict(error);   // collective: every rank's error, or none, before anything changes
    d.state_written(true);    // collective: whether every rank wrote its file
  };
  template <class D>
  static constexpr bool all = steps<D> && (!D::exchanges || exchanges_inputs<D>) && files<D>;
};

template <class D>
concept Placement = PlacementAccess::all<D>;

}  // namespace muon::detail
