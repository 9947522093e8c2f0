#pragma once
// QK-clip (MuonClip: Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv:2507.20534, eq. 4
// and below). Muon's updates let the query and key weights of an attention head grow until its
// logits explode. After an optimizer step, every head whose largest pre-softmax logit S in the
// last forward pass exceeded a threshold tau is rescaled so that the same inputs would give
// tau: with eta = tau / S, the head's query rows are multiplied by eta^alpha and its key rows by
// eta^(1 - alpha) (alpha = 1/2: both by sqrt(eta), as the paper writes it). Heads at or below
// tau are left alone; so are the optimizer's state and every other parameter.
//
// Grouped-query attention (several query heads per key head): a key head and the query heads
// that share it take one eta, from the largest logit of the group (as NVIDIA Megatron-LM's
// clip_qk does for its fused QKV). Multi-head latent attention (MLA): the paper scales the
// per-head content parts q_C and k_C by sqrt(eta), the per-head rotary query q_R by eta, and
// leaves the rotary key k_R, which all heads share, alone. Here that is two registrations fed
// the same logits: (q_C rows, k_C rows, alpha 1/2) and (q_R rows, no key rows, alpha 1); k_R
// is never named, so never touched.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "muon/core/error.hpp"
#include "muon/core/matrix_view.hpp"

namespace muon {

struct QkClipId {
  std::size_t value = 0;
};

struct QkClipOptions {
  double threshold = 100;  ///< tau, in the logits' units (Kimi K2 used 100)
  double alpha = 0.5;      ///< the query rows' share of the rescaling, in [0, 1]
};

/// Where an attention layer's heads lie in its query and key weights: the first row (axis 0)
/// or column (axis 1) of each head in the parameter's flattened matrix, each head `head_dim`
/// rows (or columns) long. The query and key parameter may be one fused QKV matrix.
struct AttentionHeads {
  std::vector<index_t> query;  ///< one entry per query head
  /// One entry per key head: as many as query heads, or fewer (grouped-query attention:
  /// query head h belongs to key head h / (query heads / key heads)); none when only query
  /// rows are rescaled (MLA's rotary queries, with alpha = 1).
  std::vector<index_t> key;
  index_t head_dim = 0;
  int axis = 0;

  /// `heads` query heads one after another from row `query_at`, and `key_heads` key heads
  /// (0: as many) from row `key_at`. A fused [Q; K; V] of model width d: contiguous(H, d / H, 0, d).
  static AttentionHeads contiguous(index_t heads, index_t head_dim, index_t query_at,
                                   index_t key_at, index_t key_heads = 0) {
    AttentionHeads a;
    a.head_dim = head_dim;
    for (index_t h = 0; h < heads; ++h) a.query.push_back(query_at + h * head_dim);
    for (index_t h = 0; h < (key_heads == 0 ? heads : key_heads); ++h)
      a.key.push_back(key_at + h * head_dim);
    return a;
  }
  /// The groups that share one eta: the key heads, or each query head when there are none.
  [[nodiscard]] std::size_t groups() const { return key.empty() ? query.size() : key.size(); }
  [[nodiscard]] std::size_t group_of(std::size_t query_head) const {
    return query_head / (query.size() / groups());
  }
};

/// What one clip_qk() did.
struct QkClipReport {
  std::size_t clipped = 0;  ///< groups (key heads) rescaled
  double max_logit = -std::numeric_limits<double>::infinity();  ///< the largest logit (all ranks)
  double min_eta = 1;       ///< the smallest eta applied; 1 when none was
};

namespace detail {

/// The checks of a registration that need no parameter: names the field that is wrong.
inline void check_qk_clip(const AttentionHeads& a, const QkClipOptions& o, const std::string& what) {
  if (!(o.threshold > 0) || !std::isfinite(o.threshold))
    throw InvalidArgument(what + ": QkClipOptions.threshold is " + std::to_string(o.threshold) +
                          "; it must be positive and finite");
  if (!(o.alpha >= 0 && o.alpha <= 1))
    throw InvalidArgument(what + ": QkClipOptions.alpha is " + std::to_string(o.alpha) +
                          "; it must lie in [0, 1]");
  if (a.axis != 0 && a.axis != 1)
    throw InvalidArgument(what + ": AttentionHeads.axis is " + std::to_string(a.axis) +
                          "; it must be 0 (rows) or 1 (columns)");
  if (a.head_dim <= 0)
    throw InvalidArgument(what + ": AttentionHeads.head_dim is " + std::to_string(a.head_dim) +
                          "; it must be positive");
  if (a.query.empty()) throw InvalidArgument(what + ": AttentionHeads.query names no head");
  if (!a.key.empty() && a.query.size() % a.key.size() != 0)
    throw InvalidArgument(what + ": " + std::to_string(a.query.size()) + " query heads do not "
                          "divide into " + std::to_string(a.key.size()) + " key heads");
  if (a.key.empty() && o.alpha != 1)
    throw InvalidArgument(what + ": AttentionHeads.key is empty, so only query rows are rescaled, "
                          "and they take all of eta: set QkClipOptions.alpha to 1 (MLA's rotary "
                          "queries), or name the key heads");
}

/// The heads' blocks [first, first + head_dim) must fit the extent and not overlap: a row
/// scaled twice would take eta twice.
inline void check_head_blocks(std::vector<std::pair<index_t, index_t>> blocks, index_t extent,
                              const std::string& what) {
  std::sort(blocks.begin(), blocks.end());
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    const auto [first, end] = blocks[i];
    if (first < 0 || end > extent)
      throw InvalidArgument(what + ": a head's block [" + std::to_string(first) + ", " +
                            std::to_string(end) + ") lies outside the " + std::to_string(extent) +
                            " along its axis");
    if (i > 0 && first < blocks[i - 1].second)
      throw InvalidArgument(what + ": the heads' blocks starting at " +
                            std::to_string(blocks[i - 1].first) + " and " + std::to_string(first) +
                            " overlap");
  }
}

/// The rescaling factor eta^p, with the square root the paper writes for p = 1/2.
inline double clip_factor(double eta, double p) {
  return p == 0.5 ? std::sqrt(eta) : std::pow(eta, p);
}

/// Order-preserving map of a double onto 64-bit words (for a max over ranks of words).
inline std::uint64_t ordered_bits(double d) {
  std::uint64_t u = 0;
  std::memcpy(&u, &d, sizeof u);
  return (u >> 63) != 0 ? ~u : u | (std::uint64_t(1) << 63);
}
inline double from_ordered_bits(std::uint64_t u) {
  u = (u >> 63) != 0 ? u & ~(std::uint64_t(1) << 63) : ~u;
  double d = 0;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

}  // namespace detail
}  // namespace muon
