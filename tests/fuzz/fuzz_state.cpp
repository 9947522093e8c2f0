// libFuzzer harness for Optimizer::load_state. Any input must either be refused with
// muon::StateError, leaving the optimizer's state bit-identical, or be accepted, after which
// save_state writes back exactly the bytes that were loaded.
//
// Inputs starting with 'F' are format-aware: the rest is taken as the body after the version
// field, and the harness adds the magic, the version and a valid checksum, so the fuzzer gets
// past the checksum to the record parser. Other inputs are loaded as they are.
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <string_view>

#include "muon/eigen.hpp"

namespace {

struct Model {
  Eigen::MatrixXd w = Eigen::MatrixXd::Constant(3, 2, 0.5), gw = Eigen::MatrixXd::Constant(3, 2, 0.25);
  Eigen::RowVectorXd b = Eigen::RowVectorXd::Constant(4, 1.0), gb = Eigen::RowVectorXd::Constant(4, -0.5);
  muon::Optimizer<muon::EigenBackend, double> opt;
  Model() {
    opt.add_muon("w", w, gw);
    opt.add_adamw("b", b, gb);
    opt.step();  // non-zero state, so a partial overwrite would show
  }
  std::string saved() {
    std::ostringstream out;
    opt.save_state(out);
    return out.str();
  }
};

std::string frame(std::string_view body) {
  muon::detail::StateWriter w;
  w.put_raw(std::string_view(muon::detail::kStateMagic, sizeof muon::detail::kStateMagic));
  w.put<std::uint32_t>(muon::detail::kStateVersion);
  w.put_raw(body);
  return w.finish();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Model model;  // built once; every input must leave it as it was or load fully
  const std::string_view raw(reinterpret_cast<const char*>(data), size);
  const std::string input =
      !raw.empty() && raw[0] == 'F' ? frame(raw.substr(1)) : std::string(raw);
  const std::string before = model.saved();
  std::istringstream in(input);
  try {
    model.opt.load_state(in);
  } catch (const muon::StateError&) {
    if (model.saved() != before) std::abort();  // a refused load changed the state
    return 0;
  }
  if (model.saved() != input) std::abort();  // accepted bytes must be exactly what saves back
  std::istringstream restore(before);
  model.opt.load_state(restore);
  return 0;
}
