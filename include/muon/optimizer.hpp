#pragma once
// muon::Optimizer<Backend, Scalar>: Muon for hidden weight matrices and AdamW for everything
// else, behind one step(), every parameter placed whole on this process. The step itself is
// the driver in driver/optimizer_core.hpp, shared with the sharded placement; the update rules
// are rules/muon.hpp and rules/adamw.hpp.
//
// Routing is explicit: add_muon() for 2-D (or flattened N-D) hidden weights, expert stacks and
// split matrices; add_adamw() for embeddings, output heads, biases and norm gains (Moonlight,
// arXiv:2502.16982). Parameters and gradients are views of the caller's memory (muon::view
// adapts Eigen and user types); the optimizer reads gradients, never writes them, and owns
// only its state.
//
// State files (save_state / load_state): the layout is in driver/state_file.hpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <ostream>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/algorithm/shape_scale.hpp"
#include "muon/core/adapter.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/registration.hpp"
#include "muon/core/serialize.hpp"
#include "muon/driver/step.hpp"
#include "muon/driver/state_file.hpp"

namespace muon {

template <class B, class T>
class Optimizer : public detail::OptimizerCore<Optimizer<B, T>, B, T, detail::WholeMatrix> {
  static_assert(SupportedScalar<T>,
                "muon::Optimizer<Backend, Scalar>: Scalar must be float or double; complex and "
                "integer parameters are not supported.");
  static_assert(Backend<B, T>,
                "muon::Optimizer<Backend, Scalar>: Backend does not provide, for this Scalar, "
                "the operations listed by the muon::Backend concept in muon/core/backend.hpp.");
  using Core = detail::OptimizerCore<Optimizer<B, T>, B, T, detail::WholeMatrix>;

 public:
  using typename Core::Space;
  using typename Core::View;
  using typename Core::ConstView;

  /// `defaults` become group 0, the group parameters join unless told otherwise.
  explicit Optimizer(GroupOptions defaults = {}, OptimizerOptions options = {}, B backend = B{})
      : Core(std::move(backend), options, defaults) {}

  // Groups, add_muon / add_adamw, set_grad / clear_grad and introspection: see
  // detail::OptimizerCore (muon/driver/optimizer_core.hpp) and detail::Registrar.

  // step(): see detail::OptimizerCore.

  /// Muon's momentum buffer M, or AdamW's first moment m, as a dense view.
  [[nodiscard]] ConstView momentum_buffer(ParamId id) {
    this->check_param(id);
    Param& p = params_[id.value];
    return backend_.view(p.state[0], p.value.rows(), p.value.cols());
  }

  // ---- state -----------------------------------------------------------------------------
  // save_state(std::ostream&) and load_state(std::istream&): see detail::OptimizerCore.
  using Core::load_state;
  using Core::save_state;

  /// Writes to `path` through a temporary file and a rename, so a crash mid-write never leaves
  /// a half-written checkpoint under the real name; any failure is a StateError naming the path
  /// and leaves no temporary file.
  void save_state(const std::filesystem::path& path) {
    detail::write_file_atomically(path, "save_state", [&](std::ostream& out) { save_state(out); });
  }
  void load_state(const std::filesystem::path& path) {
    detail::read_file(path, "load_state", [&](std::istream& in) { load_state(in); });
  }

 private:
  friend Core;
  friend detail::PlacementAccess;
  using typename Core::Group;
  using typename Core::Param;
  using Piece = detail::Piece;
  using Core::backend_;
  using Core::options_;
  using Core::params_;
  using Core::steps_;

  // ---- the placement: every parameter whole, here; nothing to exchange -------------------
  static constexpr bool exchanges = false;
  void placed(Param& p) { this->size_state(p, p.value.size()); }
  void prepare_step() {}
  bool refused_together(const Param* bad) const { return bad != nullptr; }
  StepReport refuse(const Param* bad) const {
    if (options_.non_finite == NonFinitePolicy::skip) return {false, 0, bad->name, 0, {}};
    throw NonFiniteGradient("muon: step refused: the gradient of parameter '" + bad->name + "' (" +
                                detail::shape_string(bad->shape) +
                                ") contains NaN or Inf; no parameter or state was changed",
                            bad->name);
  }
  void reduce_gradients() {}
  static Piece piece(const Param& p) { return {0, 0, p.value.rows(), p.value.cols(), 0}; }
  static ConstView gradient(const Param& p) { return p.grad; }
  static bool orthogonalizes_here(const Param&) { return true; }
  static void publish(const Param&, const detail::Part*) {}
  static detail::Tally exchange(detail::Tally t) { return t; }
  static bool agree_on_maxima(std::span<double>, bool bad, std::uint64_t) { return bad; }

  // ---- the state file's hooks (driver/state_file.hpp): no header fields, no collectives ----
  static constexpr bool slices_state = false;
  static std::string_view state_magic() { return {detail::kStateMagic, sizeof detail::kStateMagic}; }
  static const char* state_kind() { return "muon optimizer state"; }
  static void write_state_header(detail::StateWriter&) {}
  static void read_state_header(detail::StateReader&) {}
  static void state_begin() {}
  static void state_verdict(const std::string& error) {
    if (!error.empty()) throw StateError(error);
  }
  static void state_written(bool ok) {
    if (!ok) throw StateError("muon: save_state: writing the optimizer state failed");
  }
};

}  // namespace muon
