# Runs CLI with ARGS (a ;-list, then "" when EMPTY_LAST is set); passes when it exits non-zero
# and prints exactly one line to stderr that starts with "muon-cli: error:" and contains EXPECT.
# muon's one-time warning that the products run below the CPU (e.g. OPENBLAS_CORETYPE set below
# it by the machine's image) may come before it and is not counted.
# EMPTY_LAST: one more argument, the empty string (a list element cannot carry it).
if(EMPTY_LAST)
  execute_process(COMMAND ${CLI} ${ARGS} "" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
else()
  execute_process(COMMAND ${CLI} ${ARGS} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
endif()
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a non-zero exit status, got 0; stderr: ${err}")
endif()
string(REGEX REPLACE "^muon: matrix products run below this CPU's instruction set[^\n]*\n" ""
       err "${err}")
string(STRIP "${err}" stripped)
string(FIND "${stripped}" "\n" newline)
if(NOT newline EQUAL -1)
  message(FATAL_ERROR "expected one line on stderr, got:\n${err}")
endif()
if(NOT stripped MATCHES "^muon-cli: error: ")
  message(FATAL_ERROR "stderr does not start with 'muon-cli: error: ': ${err}")
endif()
string(FIND "${stripped}" "${EXPECT}" found)
if(found EQUAL -1)
  message(FATAL_ERROR "stderr does not contain '${EXPECT}': ${err}")
endif()
message(STATUS "refused as expected: ${stripped}")
