#pragma once
// The update rules the optimizers know, as one list: the driver (driver/optimizer_core.hpp), the
// state files and the sharded layout read a rule's properties from here, so a new rule is its
// own file (see muon.hpp and adamw.hpp for the members a rule has), its id in UpdateRule, its
// options in GroupOptions and one entry below.
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
#include <type_traits>

#include "muon/core/error.hpp"
#include "muon/core/options.hpp"
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
