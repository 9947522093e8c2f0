#pragma once
// Internal header (the placements' headers include it): save_state and load_state of
// detail::OptimizerCore, one codec for both placements. Little-endian throughout, each
// field as serialize.hpp writes it:
//
//   magic, 8 bytes           "\x89MUON\r\n\x1a" (muon::Optimizer) or "\x89MUONDP\x1a"
//                            (muon::ShardedOptimizer, one file per rank)
//   u32 format version       1
//   u32 scalar bytes         4 (float) or 8 (double)
//   sharded only             u32 world size | u32 rank | u8 strategy (0 owner_compute, 1 zero1)
//   u64 optimizer steps | u64 parameter count
//   per parameter, in registration order:
//     u8 rule (its id: 0 muon, 1 adamw, ...) | u64 name length, name | u64 rows | u64 cols
//     sharded only           u64 row0 | u64 col0 | u64 rows | u64 cols of this rank's piece
//     u64 the parameter's steps (AdamW's bias correction)
//     the rule's state buffers (muon: M; adamw: m, v), each over the piece, row-major
//     a rule with state per matrix (normuon: V, a value per row; adamuon: V, per element)
//       only: u64 R, the elements held here (all of the parameter's matrices' where they are
//       orthogonalized, else 0), then each such buffer's R values, the matrices in order
//   u64 FNV-1a 64 checksum of every byte before it
//
// A placement provides state_magic() and state_kind() (its magic bytes and what to call a file
// of it), slices_state (whether piece extents are recorded), write_state_header(w) and
// read_state_header(r) (its fields after the scalar size), piece(p) (the part of p whose state
// is here), and the collective points: state_begin() before anything, state_verdict(error)
// once a load has been checked (throws where any process refused), state_written(ok) after a
// save.
#include <cstdint>
#include <istream>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "muon/core/error.hpp"
#include "muon/core/serialize.hpp"
#include "muon/driver/optimizer_core.hpp"

namespace muon::detail {

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::save_state(std::ostream& out) {
  const auto entered = enter("save_state");
  Derived& d = self();
  d.state_begin();
  StateWriter w;
  w.put_raw(Derived::state_magic());
  w.put<std::uint32_t>(kStateVersion);
  w.put<std::uint32_t>(sizeof(T));
  d.write_state_header(w);
  w.put<std::uint64_t>(steps_);
  w.put<std::uint64_t>(params_.size());
  std::vector<T> host;
  for (Param& p : params_) {
    const Piece piece = d.piece(p);
    w.put<std::uint8_t>(static_cast<std::uint8_t>(p.rule));
    w.put_string(p.name);
    for (std::uint64_t e : state_extents(p, piece)) w.put<std::uint64_t>(e);
    w.put<std::uint64_t>(p.updates);
    host.resize(static_cast<std::size_t>(piece.size()));
    for (std::size_t b = 0; b < rules::All::buffers(p.rule); ++b) {
      backend_.copy_to_host(ConstView(backend_.view(p.state[b], piece.rows, piece.cols)), host.data());
      w.put_array(host.data(), host.size());
    }
    if (rules::All::matrix_buffers(p.rule) == 0) continue;
    const index_t size = matrix_state_size(p);
    w.put<std::uint64_t>(static_cast<std::uint64_t>(size));
    host.resize(static_cast<std::size_t>(size));
    for (std::size_t b = 0; b < rules::All::matrix_buffers(p.rule); ++b) {
      backend_.copy_to_host(ConstView(backend_.view(p.matrix_state[b], 1, size)), host.data());
      w.put_array(host.data(), host.size());
    }
  }
  const std::string bytes = w.finish();
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  d.state_written(static_cast<bool>(out));
}

template <class Derived, class B, class T, class ParamExtra>
void OptimizerCore<Derived, B, T, ParamExtra>::load_state(std::istream& in) {
  const auto entered = enter("load_state");
  Derived& d = self();
  d.state_begin();
  std::string bytes, error;
  std::vector<LoadedRecord> records;
  std::uint64_t steps = 0;
  try {
    bytes = read_all(in, "load_state");
    steps = parse_state(bytes, records);
  } catch (const StateError& e) {
    error = e.what();
  }
  d.state_verdict(error);
  // Nothing can fail from here on: commit.
  std::vector<T> host;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    Param& p = params_[i];
    const Piece piece = d.piece(p);
    const auto n = static_cast<std::size_t>(piece.size());
    host.resize(n);
    const char* src = records[i].data;
    for (std::size_t b = 0; b < rules::All::buffers(p.rule); ++b) {
      from_little_endian(src, n, host.data());
      backend_.copy_from_host(host.data(), backend_.view(p.state[b], piece.rows, piece.cols));
      src += n * sizeof(T);
    }
    const index_t size = matrix_state_size(p);
    host.resize(static_cast<std::size_t>(size));
    src = records[i].matrices;
    for (std::size_t b = 0; b < rules::All::matrix_buffers(p.rule); ++b) {
      from_little_endian(src, host.size(), host.data());
      backend_.copy_from_host(host.data(), backend_.view(p.matrix_state[b], 1, size));
      src += host.size() * sizeof(T);
    }
    p.updates = records[i].updates;
  }
  steps_ = steps;
}

/// The extents a record carries: the parameter's rows and cols, then, where the placement
/// slices, its piece's row0, col0, rows and cols.
template <class Derived, class B, class T, class ParamExtra>
std::vector<std::uint64_t> OptimizerCore<Derived, B, T, ParamExtra>::state_extents(
    const Param& p, const Piece& piece) {
  const auto u = [](index_t e) { return static_cast<std::uint64_t>(e); };
  std::vector<std::uint64_t> e{u(p.value.rows()), u(p.value.cols())};
  if constexpr (Derived::slices_state)
    e.insert(e.end(), {u(piece.row0), u(piece.col0), u(piece.rows), u(piece.cols)});
  return e;
}

/// Checks a whole state file against the registered parameters without changing anything;
/// returns its step count and, per parameter, where its buffers are in `bytes`.
template <class Derived, class B, class T, class ParamExtra>
std::uint64_t OptimizerCore<Derived, B, T, ParamExtra>::parse_state(
    const std::string& bytes, std::vector<LoadedRecord>& records) {
  Derived& d = self();
  const std::string_view all(bytes), magic = Derived::state_magic();
  if (all.size() < magic.size() || all.substr(0, magic.size()) != magic)
    throw StateError(std::string("muon: load_state: not a ") + Derived::state_kind() +
                     " (bad magic bytes)");
  StateReader head(all.substr(magic.size()));
  const auto version = head.get<std::uint32_t>("version");
  if (version != kStateVersion)
    throw StateError("muon: load_state: state format version " + std::to_string(version) +
                     " is not supported (this build reads version " +
                     std::to_string(kStateVersion) + ")");
  // Everything after the version is read from the checksummed body only, so no record can
  // reach into the checksum.
  constexpr std::size_t kChecksum = sizeof(std::uint64_t);
  const std::size_t body = magic.size() + sizeof(std::uint32_t);
  if (all.size() < body + kChecksum ||
      fnv1a64(all.substr(0, all.size() - kChecksum)) !=
          StateReader(all.substr(all.size() - kChecksum)).get<std::uint64_t>("checksum"))
    throw StateError("muon: load_state: checksum mismatch: the state is truncated or corrupted");
  StateReader r(all.substr(body, all.size() - body - kChecksum));
  const auto scalar = r.get<std::uint32_t>("scalar size");
  if (scalar != sizeof(T))
    throw StateError("muon: load_state: the state holds " + std::to_string(scalar) +
                     "-byte scalars but this optimizer's Scalar has " + std::to_string(sizeof(T)) +
                     " bytes");
  d.read_state_header(r);
  const auto steps = r.get<std::uint64_t>("step count");
  const auto count = r.get<std::uint64_t>("parameter count");
  if (count != params_.size())
    throw StateError("muon: load_state: the state has " + std::to_string(count) +
                     " parameters but this optimizer has " + std::to_string(params_.size()));
  const auto describe = [](std::uint8_t rule, const std::vector<std::uint64_t>& e) {
    std::string s = rules::All::describe(rule) + ", " + std::to_string(e[0]) + "x" +
                    std::to_string(e[1]);
    if (e.size() == 6)
      s += ", its piece here " + std::to_string(e[4]) + "x" + std::to_string(e[5]) + " at (" +
           std::to_string(e[2]) + ", " + std::to_string(e[3]) + ")";
    return s;
  };
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Param& p = params_[i];
    const Piece piece = d.piece(p);
    const auto rule = r.get<std::uint8_t>("rule");
    const std::string name = r.get_string(1 << 20, "parameter name");
    const std::vector<std::uint64_t> want = state_extents(p, piece);
    std::vector<std::uint64_t> extents(want.size());
    for (std::uint64_t& e : extents) e = r.get<std::uint64_t>("extent");
    const auto updates = r.get<std::uint64_t>("parameter step count");
    if (rule != static_cast<std::uint8_t>(p.rule) || name != p.name || extents != want)
      throw StateError("muon: load_state: parameter " + std::to_string(i) + " is '" + name +
                       "' (" + describe(rule, extents) + ") in the state but '" + p.name + "' (" +
                       describe(static_cast<std::uint8_t>(p.rule), want) + ") in this optimizer");
    const std::size_t n = static_cast<std::size_t>(piece.size()) * rules::All::buffers(p.rule);
    records.push_back({updates, r.take(n, sizeof(T), "state buffer"), nullptr});
    check_loaded_state(p, records.back().data, n);
    if (rules::All::matrix_buffers(p.rule) == 0) continue;
    const auto size = r.get<std::uint64_t>("size of the state per matrix");
    if (size != static_cast<std::uint64_t>(matrix_state_size(p)))
      throw StateError("muon: load_state: parameter '" + p.name + "' has " +
                       std::to_string(size) + " elements of state per matrix in the state but " +
                       std::to_string(matrix_state_size(p)) + " here");
    const std::size_t m = static_cast<std::size_t>(size) * rules::All::matrix_buffers(p.rule);
    records.back().matrices = r.take(m, sizeof(T), "state buffer per matrix");
    check_loaded_state(p, records.back().matrices, m);
  }
  if (r.remaining() != 0)
    throw StateError("muon: load_state: " + std::to_string(r.remaining()) +
                     " unexpected bytes after the last parameter");
  return steps;
}

}  // namespace muon::detail
