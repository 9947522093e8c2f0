#pragma once
// The per-shape factor s of the Muon update W <- W - lr * s * O (see ScaleMode). Always called
// with the flattened 2-D shape (rows = shape[0], cols = product of the rest): reading a conv
// kernel's trailing dimensions instead is the most common bug in public implementations.
#include <algorithm>
#include <cmath>

#include "muon/core/options.hpp"

namespace muon {

inline double shape_scale(ScaleMode mode, index_t rows, index_t cols, double rms_factor = 0.2) {
  if (rows <= 0 || cols <= 0) return 1.0;
  const auto r = static_cast<double>(rows);
  const auto c = static_cast<double>(cols);
  switch (mode) {
    case ScaleMode::original: return std::sqrt(std::max(1.0, r / c));
    case ScaleMode::match_rms_adamw: return rms_factor * std::sqrt(std::max(r, c));
    case ScaleMode::spectral: return std::sqrt(r / c);
    case ScaleMode::none: return 1.0;
  }
  return 1.0;
}

}  // namespace muon
