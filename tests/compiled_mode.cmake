# Checks an object file of a program built against muon::compiled: Optimizer<EigenBackend,
# float>'s step() is referenced there (U) but not defined (T/W), so the library provides it.
find_program(NM nm REQUIRED)
execute_process(COMMAND ${NM} -C ${OBJECTS} OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nm failed on ${OBJECTS}")
endif()
set(step "muon::detail::OptimizerCore<muon::Optimizer<muon::EigenBackend, float>, muon::EigenBackend, float, muon::detail::WholeMatrix>::step\\(\\)")
if(NOT symbols MATCHES " U ${step}")
  message(FATAL_ERROR "the program does not call the library's step(); symbols:\n${symbols}")
endif()
if(symbols MATCHES " [TWt] ${step}")
  message(FATAL_ERROR "the program compiled step() itself: MUON_COMPILED's extern "
                      "declarations did not take (is step() defined inside the class again?)")
endif()
message(STATUS "step() is left to muon::compiled")
