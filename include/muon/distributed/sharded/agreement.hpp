#pragma once
// Internal: included by the library's own headers, not by programs.
// How the ranks agree before a step or a state file changes anything: a fingerprint of the
// registration, every group's options and the gradients present, compared (with the
// non-finite flag) in two all_reduce_max of one word.
#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "muon/distributed/sharded/placement.hpp"

namespace muon {

namespace detail {
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
bool ShardedOptimizer<B, T, C>::handshake(bool refused, std::uint64_t fingerprint,
                                          const char* disagreement) {
  constexpr std::uint64_t kFlag = std::uint64_t(1) << 63;
  const std::uint64_t flag = refused ? kFlag : 0, low = fingerprint & ~kFlag,
                      high = ~fingerprint & ~kFlag;
  const std::uint64_t first = comm_.all_reduce_max(flag | low);
  const std::uint64_t second = comm_.all_reduce_max(flag | high);
  if ((first & kFlag) != 0) return true;  // refused on every rank; agreement checked next time
  if (first != low || second != high) throw InvalidArgument(disagreement);
  return false;
}

template <class B, class T, class C>
bool ShardedOptimizer<B, T, C>::agree(bool nonfinite) {
  lay_out();
  if (fingerprint_stale_) fingerprint_ = fingerprint();
  fingerprint_stale_ = false;
  if (handshake(nonfinite, fingerprint_,
                "muon: ShardedOptimizer: the ranks registered different parameters or group "
                "options, or cleared different gradients (names, shapes, rules, order, options "
                "or gradients present differ); nothing was changed"))
    return true;
  agreed_ = laid_out_;
  return false;
}

template <class B, class T, class C>
bool ShardedOptimizer<B, T, C>::agree_on_maxima(std::span<double> maxima, bool bad,
                                                std::uint64_t fingerprint) {
  if (handshake(bad, fingerprint,
                "muon: clip_qk: the ranks registered different QK-clips (parameters, heads or "
                "options), or called clip_qk with different ids; nothing was rescaled"))
    return true;
  for (double& m : maxima) m = detail::from_ordered_bits(comm_.all_reduce_max(detail::ordered_bits(m)));
  return false;
}

template <class B, class T, class C>
std::uint64_t ShardedOptimizer<B, T, C>::fingerprint() const {
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

}  // namespace muon
