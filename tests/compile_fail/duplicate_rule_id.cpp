// Rule ids are stored in state files: a list with two rules of one id is refused at compile time.
#include "muon/rules/rules.hpp"

namespace {
/// Lion under another name and (unless the control build) Lion's id.
struct Twin : muon::rules::Lion {
#ifdef MUON_COMPILE_FAIL_CONTROL
  static constexpr muon::UpdateRule id{200};
#endif
  static constexpr const char* name = "twin";
};
}  // namespace

int main() { return static_cast<int>(muon::rules::RuleList<muon::rules::Lion, Twin>::count); }
