// libFuzzer harness for the .npy reader (muon/io/npy.hpp). Any input must either be refused
// with muon::IoError or parse into an array whose size matches its shape and which survives a
// write/read round trip bit for bit. Anything else (a crash, another exception, a sanitizer
// report, a leak) is a finding.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "muon/io/npy.hpp"

namespace {

template <class T>
void check(std::string_view bytes) {
  muon::npy::Array<T> a;
  try {
    a = muon::npy::parse<T>(bytes, "fuzz input");
  } catch (const muon::IoError&) {
    return;  // refused with a message: the expected outcome for most inputs
  }
  std::size_t count = 1;
  for (auto e : a.shape) {
    if (e < 0) std::abort();
    count *= static_cast<std::size_t>(e);
  }
  if (count != a.data.size()) std::abort();
  const auto again = muon::npy::parse<T>(muon::npy::serialize(a.shape, a.data.data()));
  if (again.shape != a.shape || again.data.size() != a.data.size() ||
      (!a.data.empty() &&
       std::memcmp(again.data.data(), a.data.data(), a.data.size() * sizeof(T)) != 0))
    std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  check<float>(bytes);
  check<double>(bytes);
  return 0;
}
