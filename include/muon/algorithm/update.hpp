#pragma once
// The per-parameter coefficients of the Muon and AdamW updates, shared by muon::Optimizer and
// the sharded optimizer so both apply exactly the same arithmetic.
#include <cmath>
#include <cstdint>

#include "muon/algorithm/shape_scale.hpp"
#include "muon/core/backend.hpp"
#include "muon/core/options.hpp"

namespace muon::detail {

inline MomentumStep momentum_step(const MuonOptions& o) {
  return {o.momentum, o.momentum_form, o.nesterov};
}

/// W <- decay W - alpha O for the Muon update of a rows x cols matrix.
struct MuonApply {
  double decay, alpha;
};
inline MuonApply muon_apply(const MuonOptions& o, index_t rows, index_t cols) {
  return {1 - o.lr * o.weight_decay, o.lr * shape_scale(o.scale, rows, cols, o.rms_factor)};
}

/// AdamW's fused step for its `step`-th update (1-based), bias corrections folded in.
inline AdamWStep adamw_step(const AdamWOptions& o, std::uint64_t step) {
  const auto t = static_cast<double>(step);
  const double bias1 = 1 - std::pow(o.beta1, t), bias2 = 1 - std::pow(o.beta2, t);
  return {1 - o.lr * o.weight_decay, o.beta1, o.beta2, o.eps, o.lr / bias1, std::sqrt(bias2)};
}

}  // namespace muon::detail
