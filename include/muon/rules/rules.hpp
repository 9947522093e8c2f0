#pragma once
// The update rules the optimizers know, as one list: the driver (core/optimizer_core.hpp), the
// state files and the sharded layout read a rule's properties from here, so a new rule is its
// own file (see muon.hpp and adamw.hpp for the members a rule has), its id in UpdateRule, its
// options in GroupOptions and one entry below.
//
// A rule is elementwise (orthogonalizes == false: update(backend, w, g, state, options, step)
// on any piece of a parameter, several pieces of one parameter in one step possibly at once,
// each with the parameter's 1-based step number) or orthogonalizing (accumulate() on any piece,
// then Newton-Schulz and apply() on each whole matrix).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "muon/core/error.hpp"
#include "muon/core/registration.hpp"
#include "muon/rules/adamw.hpp"
#include "muon/rules/muon.hpp"

namespace muon::rules {

template <class... R>
struct RuleList {
  /// The most state buffers any rule keeps (the size of a parameter's buffer array).
  static constexpr std::size_t max_buffers = std::max({R::buffers...});

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

using All = RuleList<Muon, AdamW>;

}  // namespace muon::rules
