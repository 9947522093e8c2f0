#pragma once
// muon::Optimizer<Backend, Scalar>: Muon for hidden weight matrices and AdamW for everything
// else, behind one step(), every parameter placed whole on this process. The step itself is
// the driver in core/optimizer_core.hpp, shared with the sharded placement; the update rules
// are rules/muon.hpp and rules/adamw.hpp.
//
// Routing is explicit: add_muon() for 2-D (or flattened N-D) hidden weights, expert stacks and
// split matrices; add_adamw() for embeddings, output heads, biases and norm gains (Moonlight,
// arXiv:2502.16982). Parameters and gradients are views of the caller's memory (muon::view
// adapts Eigen and user types); the optimizer reads gradients, never writes them, and owns
// only its state.
//
// State file (save_state / load_state), little-endian:
//   magic "\x89MUON\r\n\x1a" | u32 version (1) | u32 scalar bytes | u64 steps | u64 params |
//   per parameter: u8 rule (0 muon, 1 adamw) | u64 len, name | u64 rows | u64 cols |
//                  u64 parameter steps | the rule's buffers (rows*cols scalars each) |
//   u64 FNV-1a checksum of all of the above.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/algorithm/shape_scale.hpp"
#include "muon/core/adapter.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/optimizer_core.hpp"
#include "muon/core/registration.hpp"
#include "muon/serialize.hpp"

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
  // detail::OptimizerCore (muon/core/optimizer_core.hpp) and detail::Registrar.

  // step(): see detail::OptimizerCore.

  /// Muon's momentum buffer M, or AdamW's first moment m, as a dense view.
  [[nodiscard]] ConstView momentum_buffer(ParamId id) {
    this->check_param(id);
    Param& p = params_[id.value];
    return backend_.view(p.state[0], p.value.rows(), p.value.cols());
  }

  // ---- state -----------------------------------------------------------------------------
  void save_state(std::ostream& out) {
    const auto entered = this->enter("save_state");
    detail::StateWriter w;
    w.put_raw(std::string_view(detail::kStateMagic, sizeof detail::kStateMagic));
    w.put<std::uint32_t>(detail::kStateVersion);
    w.put<std::uint32_t>(sizeof(T));
    w.put<std::uint64_t>(steps_);
    w.put<std::uint64_t>(params_.size());
    std::vector<T> host;
    for (Param& p : params_) {
      w.put<std::uint8_t>(static_cast<std::uint8_t>(p.rule));
      w.put_string(p.name);
      w.put<std::uint64_t>(p.value.rows());
      w.put<std::uint64_t>(p.value.cols());
      w.put<std::uint64_t>(p.updates);
      host.resize(static_cast<std::size_t>(p.value.size()));
      for (std::size_t b = 0; b < rules::All::buffers(p.rule); ++b) {
        backend_.copy_to_host(ConstView(backend_.view(p.state[b], p.value.rows(), p.value.cols())),
                              host.data());
        w.put_array(host.data(), host.size());
      }
    }
    const std::string bytes = w.finish();
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw StateError("muon: save_state: writing the optimizer state failed");
  }

  /// Restores state saved by an optimizer with the same parameters (names, rules, shapes, in
  /// registration order) and Scalar. On any error the optimizer is left exactly as it was.
  void load_state(std::istream& in) {
    const auto entered = this->enter("load_state");
    const std::string bytes = detail::read_all(in, "load_state");
    const std::string_view all(bytes);
    constexpr std::size_t kMagic = sizeof detail::kStateMagic;
    if (all.size() < kMagic || all.substr(0, kMagic) != std::string_view(detail::kStateMagic, kMagic))
      throw StateError("muon: load_state: not a muon optimizer state (bad magic bytes)");
    detail::StateReader head(all.substr(kMagic));
    const auto version = head.get<std::uint32_t>("version");
    if (version != detail::kStateVersion)
      throw StateError("muon: load_state: state format version " + std::to_string(version) +
                       " is not supported (this build reads version " +
                       std::to_string(detail::kStateVersion) + ")");
    // Everything after the version is read from the checksummed body only, so no record can
    // reach into the checksum.
    constexpr std::size_t kChecksum = sizeof(std::uint64_t);
    if (all.size() < kMagic + 4 + kChecksum ||
        detail::fnv1a64(all.substr(0, all.size() - kChecksum)) !=
            detail::StateReader(all.substr(all.size() - kChecksum)).get<std::uint64_t>("checksum"))
      throw StateError("muon: load_state: checksum mismatch: the state is truncated or corrupted");
    detail::StateReader r(all.substr(kMagic + 4, all.size() - kMagic - 4 - kChecksum));
    const auto scalar = r.get<std::uint32_t>("scalar size");
    if (scalar != sizeof(T))
      throw StateError("muon: load_state: the state holds " + std::to_string(scalar) +
                       "-byte scalars but this optimizer's Scalar has " +
                       std::to_string(sizeof(T)) + " bytes");
    const auto steps = r.get<std::uint64_t>("step count");
    const auto count = r.get<std::uint64_t>("parameter count");
    if (count != params_.size())
      throw StateError("muon: load_state: the state has " + std::to_string(count) +
                       " parameters but this optimizer has " + std::to_string(params_.size()));
    // Pass 1: check every record against the registered parameters; remember where data is.
    struct Record {
      std::uint64_t updates;
      const char* data;
    };
    std::vector<Record> records;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const Param& p = params_[i];
      const auto rule = r.get<std::uint8_t>("rule");
      const std::string name = r.get_string(1 << 20, "parameter name");
      const auto rows = r.get<std::uint64_t>("rows");
      const auto cols = r.get<std::uint64_t>("cols");
      const auto updates = r.get<std::uint64_t>("parameter step count");
      if (rule != static_cast<std::uint8_t>(p.rule) || name != p.name || rows != std::uint64_t(p.value.rows()) ||
          cols != std::uint64_t(p.value.cols()))
        throw StateError("muon: load_state: parameter " + std::to_string(i) + " is '" + name +
                         "' (" + rules::All::describe(rule) + ", " + std::to_string(rows) + "x" +
                         std::to_string(cols) + ") in the state but '" + p.name + "' (" +
                         rules::All::describe(static_cast<std::uint8_t>(p.rule)) + ", " +
                         detail::shape_string(p.value.rows(), p.value.cols()) +
                         ") in this optimizer");
      const std::size_t n = static_cast<std::size_t>(p.value.size()) * rules::All::buffers(p.rule);
      records.push_back({updates, r.take(n, sizeof(T), "state buffer")});
      this->check_loaded_state(p, records.back().data, n);
    }
    if (r.remaining() != 0)
      throw StateError("muon: load_state: " + std::to_string(r.remaining()) +
                       " unexpected bytes after the last parameter");
    // Pass 2: nothing can fail from here on; commit.
    std::vector<T> host;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Param& p = params_[i];
      const auto n = static_cast<std::size_t>(p.value.size());
      host.resize(n);
      const char* src = records[i].data;
      for (std::size_t b = 0; b < rules::All::buffers(p.rule); ++b) {
        detail::from_little_endian(src, n, host.data());
        backend_.copy_from_host(host.data(), backend_.view(p.state[b], p.value.rows(), p.value.cols()));
        src += n * sizeof(T);
      }
      p.updates = records[i].updates;
    }
    steps_ = steps;
  }

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
};

}  // namespace muon
