#pragma once
// muon::Optimizer<Backend, Scalar>: Muon for hidden weight matrices and AdamW for everything
// else, behind one step().
//
// Muon (K. Jordan et al. 2024; torch.optim.Muon semantics), per matrix W with gradient G:
//   M <- mu M + (1 - mu) G                 (MomentumForm::ema; ::sum is M <- mu M + G)
//   U <- (1 - mu) G + mu M  if nesterov    (::sum: U <- G + mu M), else U <- M
//   O <- NewtonSchulz(U)                   (algorithm/newton_schulz.hpp)
//   W <- W (1 - lr wd) - lr s(rows, cols) O   (decoupled decay once, unscaled lr; ScaleMode)
// AdamW (Loshchilov & Hutter 2019; torch.optim.AdamW semantics) for parameters routed to it.
//
// Routing is explicit: add_muon() for 2-D (or flattened N-D) hidden weights; add_adamw() for
// embeddings, output heads, biases and norm gains (Moonlight, arXiv:2502.16982).
// Parameters and gradients are views of the caller's memory (muon::view adapts Eigen and user
// types); the optimizer reads gradients, never writes them, and owns only its state.
//
// State file (save_state / load_state), little-endian:
//   magic "\x89MUON\r\n\x1a" | u32 version (1) | u32 scalar bytes | u64 steps | u64 params |
//   per parameter: u8 rule (0 muon, 1 adamw) | u64 len, name | u64 rows | u64 cols |
//                  u64 adamw steps | muon: M | adamw: m, v   (rows*cols scalars each) |
//   u64 FNV-1a checksum of all of the above.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "muon/algorithm/newton_schulz.hpp"
#include "muon/algorithm/shape_scale.hpp"
#include "muon/algorithm/update.hpp"
#include "muon/core/adapter.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/optimizer_core.hpp"
#include "muon/core/registration.hpp"
#include "muon/serialize.hpp"

namespace muon {

/// How orthogonal one Muon matrix's update was (OptimizerOptions::telemetry).
struct NewtonSchulzTelemetry {
  ParamId param;
  double residual = 0;    ///< ||O O^T - I||_F / sqrt(min(m, n)) of the Newton-Schulz result O
  double update_rms = 0;  ///< RMS of s O, the step per unit learning rate (rms_factor under
                          ///< match_rms_adamw when O is orthogonal); weight decay not included
  int steps = 0;          ///< Newton-Schulz steps run, with those a tolerance added
};

/// What a step() did.
struct StepReport {
  bool applied = true;             ///< false when NonFinitePolicy::skip refused the step
  std::size_t updated = 0;         ///< parameters updated (those with a gradient)
  std::string skipped_because;     ///< the parameter whose gradient (or update) was not finite
  std::size_t refused = 0;         ///< Muon parameters left alone: Newton-Schulz result not finite
  /// With OptimizerOptions::telemetry: one entry per Muon matrix updated, in registration order.
  std::vector<NewtonSchulzTelemetry> newton_schulz;
};

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
      : Core(std::move(backend), options, defaults) {
    if (options.telemetry && !measures_residual<B, T>)
      throw InvalidArgument("muon: OptimizerOptions.telemetry: this backend cannot measure "
                            "residuals (it has no frobenius_norm(); EigenBackend has)");
  }

  // Groups, add_muon / add_adamw, set_grad / clear_grad and introspection: see
  // detail::OptimizerCore (muon/core/optimizer_core.hpp) and detail::Registrar.

  // ---- the step --------------------------------------------------------------------------
  /// One optimizer step over every parameter that has a gradient. Gradients are checked for
  /// NaN/Inf first; if one is found nothing is modified (see NonFinitePolicy).
  StepReport step() {
    if (const Param* bad = this->first_nonfinite_grad()) {
      if (options_.non_finite == NonFinitePolicy::skip) return {false, 0, bad->name, 0, {}};
      throw NonFiniteGradient("muon: step refused: the gradient of parameter '" + bad->name +
                                  "' (" + detail::shape_string(bad->shape) +
                                  ") contains NaN or Inf; no parameter or state was changed",
                              bad->name);
    }
    StepReport report;
    const Param* refused = nullptr;
    for (Param& p : params_) {
      if (!p.takes_part()) continue;
      if (p.rule == UpdateRule::adamw) {
        adamw_update(p);
      } else if (!muon_update(p, report)) {
        if (++report.refused == 1) refused = &p;
        continue;
      }
      ++report.updated;
    }
    ++steps_;
    if (refused == nullptr) return report;
    report.skipped_because = refused->name;
    if (options_.non_finite == NonFinitePolicy::skip) return report;
    throw NonFiniteUpdate("muon: the Newton-Schulz result of parameter '" + refused->name + "' (" +
                              detail::shape_string(refused->shape) +
                              ") is not finite (its momentum overflowed?); that parameter and "
                              "its momentum were left as they were, the others took this step",
                          refused->name);
  }

  /// Muon's momentum buffer M, or AdamW's first moment m, as a dense view.
  [[nodiscard]] ConstView momentum_buffer(ParamId id) {
    this->check_param(id);
    Param& p = params_[id.value];
    return backend_.view(p.m, p.value.rows(), p.value.cols());
  }

  // ---- state -----------------------------------------------------------------------------
  void save_state(std::ostream& out) {
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
      w.put<std::uint64_t>(p.adam_steps);
      host.resize(static_cast<std::size_t>(p.value.size()));
      for (auto* buf : state_buffers(p)) {
        backend_.copy_to_host(ConstView(backend_.view(*buf, p.value.rows(), p.value.cols())),
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
    const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
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
      std::uint64_t adam_steps;
      const char* data;
    };
    std::vector<Record> records;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const Param& p = params_[i];
      const auto rule = r.get<std::uint8_t>("rule");
      const std::string name = r.get_string(1 << 20, "parameter name");
      const auto rows = r.get<std::uint64_t>("rows");
      const auto cols = r.get<std::uint64_t>("cols");
      const auto adam_steps = r.get<std::uint64_t>("adamw step count");
      if (rule != static_cast<std::uint8_t>(p.rule) || name != p.name || rows != std::uint64_t(p.value.rows()) ||
          cols != std::uint64_t(p.value.cols()))
        throw StateError("muon: load_state: parameter " + std::to_string(i) + " is '" + name +
                         "' (" + describe(rule) + ", " + std::to_string(rows) + "x" +
                         std::to_string(cols) + ") in the state but '" + p.name + "' (" +
                         describe(static_cast<std::uint8_t>(p.rule)) + ", " +
                         detail::shape_string(p.value.rows(), p.value.cols()) +
                         ") in this optimizer");
      const std::size_t n = static_cast<std::size_t>(p.value.size()) * buffer_count(p.rule);
      records.push_back({adam_steps, r.take(n, sizeof(T), "state buffer")});
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
      for (auto* buf : state_buffers(p)) {
        detail::from_little_endian(src, n, host.data());
        backend_.copy_from_host(host.data(), backend_.view(*buf, p.value.rows(), p.value.cols()));
        src += n * sizeof(T);
      }
      p.adam_steps = records[i].adam_steps;
    }
    steps_ = steps;
  }

  /// Writes to `path` through a temporary file and a rename, so a crash mid-write never leaves
  /// a half-written checkpoint under the real name.
  void save_state(const std::filesystem::path& path) {
    const std::filesystem::path tmp = path.string() + ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) throw StateError("muon: save_state: cannot open '" + tmp.string() + "'");
      save_state(out);
    }
    std::filesystem::rename(tmp, path);
  }
  void load_state(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw StateError("muon: load_state: cannot open '" + path.string() + "'");
    load_state(in);
  }

 private:
  friend Core;
  friend class detail::Registrar<Optimizer<B, T>, T, Space>;
  using typename Core::Buffer;
  using typename Core::Group;
  using typename Core::Param;
  using Core::backend_;
  using Core::buffer_count;
  using Core::describe;
  using Core::groups_;
  using Core::ns_;
  using Core::options_;
  using Core::params_;
  using Core::state_buffers;
  using Core::steps_;

  bool runs_newton_schulz(const Param& p) const { return p.rule == UpdateRule::muon; }

  ParamId add(std::string name, UpdateRule rule, std::vector<index_t> shape, View value,
              ConstView grad, GroupId group) {
    Param& p = this->register_param(std::move(name), rule, std::move(shape), value, grad, group);
    backend_.resize(p.m, value.size());
    if (rule == UpdateRule::adamw) backend_.resize(p.v, value.size());
    if (rule == UpdateRule::muon) {
      ns_.reserve(backend_, value.rows(), value.cols(),
                  groups_[group.value].options.muon.newton_schulz.method);
      if (static_cast<index_t>(saved_m_.size()) < value.size()) backend_.resize(saved_m_, value.size());
    }
    return {params_.size() - 1};
  }

  /// One Muon step; false (and nothing changed) when the checked Newton-Schulz result is not
  /// finite. The checks cost a copy of M and a scan of the result, both memory-bound passes
  /// beside Newton-Schulz's k^2 N flops.
  bool muon_update(Param& p, StepReport& report) {
    const Group& g = groups_[p.group];
    const MuonOptions& o = g.options.muon;
    const index_t rows = p.value.rows(), cols = p.value.cols();
    const bool checked = options_.non_finite != NonFinitePolicy::unchecked;
    const View m = backend_.view(p.m, rows, cols);
    if (checked) backend_.copy(ConstView(m), backend_.view(saved_m_, rows, cols));
    backend_.momentum(m, p.grad, ns_.input(backend_, rows, cols), detail::momentum_step(o));
    NewtonSchulzReport ns;
    const ConstView update = ns_.run(backend_, rows, cols, g.schedule, o.newton_schulz,
                                     options_.telemetry ? &ns : nullptr);
    if (checked && !backend_.all_finite(update)) {
      backend_.copy(ConstView(backend_.view(saved_m_, rows, cols)), m);
      return false;
    }
    const auto [decay, alpha] = detail::muon_apply(o, rows, cols);
    backend_.apply_update(p.value, update, decay, alpha);
    if constexpr (measures_residual<B, T>)
      if (options_.telemetry) {
        const double scale = shape_scale(o.scale, rows, cols, o.rms_factor);
        const double rms = backend_.frobenius_norm(update) /
                           std::sqrt(static_cast<double>(rows) * static_cast<double>(cols));
        report.newton_schulz.push_back({ParamId{static_cast<std::size_t>(&p - params_.data())},
                                        ns.residual, scale * rms, ns.steps});
      }
    return true;
  }

  void adamw_update(Param& p) {
    const index_t rows = p.value.rows(), cols = p.value.cols();
    backend_.adamw(p.value, p.grad, backend_.view(p.m, rows, cols), backend_.view(p.v, rows, cols),
                   detail::adamw_step(groups_[p.group].options.adamw, ++p.adam_steps));
  }

  Buffer saved_m_;  // a Muon parameter's momentum before its step, while the step is checked
};

}  // namespace muon
