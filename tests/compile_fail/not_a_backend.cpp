// A backend that lacks the operations of the muon::Backend concept is refused by name.
// With -DMUON_COMPILE_FAIL_CONTROL the same program uses EigenBackend and must compile.
#include "muon/adapters/eigen.hpp"  // not muon/eigen.hpp: its SVD tools add ~25 s a compile
#include "muon/backend/eigen.hpp"
#include "muon/optimizer.hpp"

struct HalfABackend {  // has a memory space and buffers, but no gemm, syrk, momentum, ...
  using memory_space = muon::HostSpace;
  template <class T>
  using Buffer = std::vector<T>;
};

#ifdef MUON_COMPILE_FAIL_CONTROL
using TheBackend = muon::EigenBackend;
#else
using TheBackend = HalfABackend;
#endif

int main() {
  muon::Optimizer<TheBackend, float> opt;
  return static_cast<int>(opt.num_params());
}
