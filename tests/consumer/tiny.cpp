// The smallest consumer: muon's core headers (and MpiCommunicator's where MPI is asked for).
#include <muon/muon.hpp>
#ifdef MUON_CONSUMER_MPI
#include <muon/distributed/mpi.hpp>
#endif

#include <cstdio>

int main() {
  std::printf("muon %s\n", MUON_VERSION_STRING);
  return 0;
}
