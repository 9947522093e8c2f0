#pragma once
// The update rules the optimizers know, as one list: the driver (driver/optimizer_core.hpp), the
// state files, the sharded layout, the group options, LibTorch's optimizer and muon-cli read a
// rule's properties from here, so a new rule is its own file (see muon.hpp and adamw.hpp for
// the members a rule has) and one entry in All below.
//
// A rule is elementwise (orthogonalizes == false: update(backend, w, g, state, options, step)
// on any piece of a parameter, several pieces of one parameter in one step possibly at once,
// each with the parameter's 1-based step number) or orthogonalizing (accumulate() on any piece,
// then Newton-Schulz and apply() on each whole matrix). Its mathematics is in its stages,
// functors that every backend runs through backend.each() (core/stage.hpp), so a rule touches
// no backend; muon::cuda's library compiles the stages of every rule listed here.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "muon/core/error.hpp"
#include "muon/core/options.hpp"
#include "muon/core/registration.hpp"
#include "muon/rules/adamuon.hpp"
#include "muon/rules/adamw.hpp"
#include "muon/rules/lion.hpp"
#include "muon/rules/muon.hpp"
#include "muon/rules/namo.hpp"
#include "muon/rules/normuon.hpp"
#include "muon/rules/polargrad.hpp"

namespace muon::detail {
/// Whether no two of the ids are equal.
template <UpdateRule... Id>
constexpr bool distinct_ids() {
  const UpdateRule ids[] = {Id...};
  for (std::size_t i = 0; i < sizeof...(Id); ++i)
    for (std::size_t j = 0; j < i; ++j)
      if (ids[i] == ids[j]) return false;
  return true;
}

/// A rule's optional members, 0 when it has none: its buffers kept with each of its matrices
/// where the matrix is orthogonalized (matrix_buffers, each of matrix_state_elements(rows,
/// cols, options)), and apply()'s scratch elements for a rows x cols matrix.
template <class R>
constexpr std::size_t matrix_buffers_of() {
  if constexpr (requires { R::matrix_buffers; })
    return R::matrix_buffers;
  else
    return 0;
}
template <class R>
index_t matrix_state_of(index_t rows, index_t cols, const typename R::Options& o) {
  if constexpr (requires { R::matrix_state_elements(rows, cols, o); })
    return R::matrix_state_elements(rows, cols, o);
  else
    return 0;
}
/// Whether a rule's update is update_scale() times O (telemetry's update RMS); false where it
/// also depends on the matrix (PolarGrad's nuclear norm).
template <class R>
constexpr bool fixed_update_scale() {
  if constexpr (requires { R::fixed_update_scale; })
    return R::fixed_update_scale;
  else
    return true;
}
template <class R>
index_t scratch_of(index_t rows, index_t cols) {
  if constexpr (requires { R::scratch_elements(rows, cols); })
    return R::scratch_elements(rows, cols);
  else
    return 0;
}
}  // namespace muon::detail

namespace muon::rules {

template <class... R>
struct RuleList {
  static_assert(muon::detail::distinct_ids<R::id...>(),
                "muon::rules::RuleList: two rules have one id (ids are stored in state files: a "
                "new rule takes a number no rule has had)");
  /// The rules as a type list (a test over every rule: Catch2's TEMPLATE_LIST_TEST_CASE).
  using types = std::tuple<R...>;
  static constexpr std::size_t count = sizeof...(R);
  /// The options of one parameter group: every rule's, each its rule's member (Slot).
  struct Options : R::Slot... {};

  /// Calls f(Rule{}) for every rule, in the list's order.
  template <class F>
  static void for_each(F&& f) {
    (f(R{}), ...);
  }
  /// The most state buffers any rule keeps (the size of a parameter's buffer array).
  static constexpr std::size_t max_buffers = std::max({R::buffers...});
  /// The most buffers per matrix any rule keeps.
  static constexpr std::size_t max_matrix_buffers =
      std::max({muon::detail::matrix_buffers_of<R>()...});

  /// Calls f(Rule{}) for the rule with this id.
  template <class F>
  static void visit(UpdateRule id, F&& f) {
    const bool found = ((R::id == id ? (f(R{}), true) : false) || ...);
    if (!found) throw InvalidArgument("muon: unknown update rule " + std::to_string(int(id)));
  }
  static std::size_t buffers(UpdateRule id) {
    std::size_t n = 0;
    visit(id, [&](auto rule) { n = decltype(rule)::buffers; });
    return n;
  }
  /// Buffers per matrix of the rule with this id (0 for most rules).
  static std::size_t matrix_buffers(UpdateRule id) {
    std::size_t n = 0;
    visit(id, [&](auto rule) { n = muon::detail::matrix_buffers_of<decltype(rule)>(); });
    return n;
  }
  /// Elements of each such buffer for a rows x cols matrix under a group's options.
  template <class Group>
  static index_t matrix_state_elements(UpdateRule id, index_t rows, index_t cols, const Group& g) {
    index_t n = 0;
    visit(id, [&](auto rule) {
      using Rule = decltype(rule);
      n = muon::detail::matrix_state_of<Rule>(rows, cols, Rule::options(g));
    });
    return n;
  }
  /// A listed rule's position in the list, at compile time.
  template <class Rule>
  static constexpr std::size_t index_of() {
    std::size_t i = 0, at = count;
    (void)((std::is_same_v<Rule, R> ? (at = i, true) : (++i, false)) || ...);
    return at;
  }
  /// The rule's position in the list (a rule's ids are stored in state files; positions not).
  static std::size_t index(UpdateRule id) {
    std::size_t i = 0, at = count;
    (void)((R::id == id ? (at = i, true) : (++i, false)) || ...);
    if (at == count) throw InvalidArgument("muon: unknown update rule " + std::to_string(int(id)));
    return at;
  }
  /// Sets `id` to the rule with this lower-case name (muon-cli's --rule); false if none has it.
  static bool from_name(const std::string& name, UpdateRule& id) {
    return ((name == R::name ? (id = R::id, true) : false) || ...);
  }
  /// Whether a rule has this id (an id from a file or a cast integer may not).
  static bool known(UpdateRule id) { return ((R::id == id) || ...); }
  /// The learning rate of the rule with this id in a group's options (GroupOptions, const or
  /// not), which schedulers read and set.
  template <class Group>
  static auto& lr(UpdateRule id, Group& g) {
    std::conditional_t<std::is_const_v<Group>, const double*, double*> lr = nullptr;
    visit(id, [&](auto rule) { lr = &decltype(rule)::options(g).lr; });
    return *lr;
  }
  /// The Newton-Schulz options of an orthogonalizing rule in a group's options (its Options'
  /// newton_schulz member); nullptr for an elementwise rule.
  template <class Group>
  static auto* newton_schulz(UpdateRule id, Group& g) {
    std::conditional_t<std::is_const_v<Group>, const NewtonSchulzOptions*, NewtonSchulzOptions*>
        ns = nullptr;
    visit(id, [&](auto rule) {
      using Rule = decltype(rule);
      if constexpr (Rule::orthogonalizes) ns = &Rule::options(g).newton_schulz;
    });
    return ns;
  }
  static bool orthogonalizes(UpdateRule id) {
    bool o = false;
    visit(id, [&](auto rule) { o = decltype(rule)::orthogonalizes; });
    return o;
  }
  /// A rule's name, or "rule N" for an id no rule has (a state file from elsewhere).
  static std::string describe(std::uint8_t id) {
    std::string out = "rule " + std::to_string(id);
    (void)((static_cast<std::uint8_t>(R::id) == id ? (out = R::name, true) : false) || ...);
    return out;
  }
};

using All = RuleList<Muon, AdamW, Lion, NorMuon, PolarGrad, AdaMuon, Namo>;

}  // namespace muon::rules

namespace muon {

/// The options of one parameter group: one member per rule, named as the rule (g.muon, g.adamw
/// and so on), which the group's parameters of that rule use.
struct GroupOptions : rules::All::Options {};

/// Checks every rule's options; the error names the group, the rule and the field.
inline void validate(const GroupOptions& g, const std::string& where = "GroupOptions") {
  rules::All::for_each([&](auto rule) {
    using R = decltype(rule);
    R::validate(R::options(g), where + "." + R::name);
  });
}

}  // namespace muon
