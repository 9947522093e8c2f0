# Compiles SOURCE twice with CXX (-fsyntax-only): as it is, which must fail with an error
# matching EXPECT, and with -DMUON_COMPILE_FAIL_CONTROL, which must succeed, so the failure is
# the one intended and not a typo. FLAGS: a ;-list of include and other flags.
execute_process(COMMAND ${CXX} -std=c++20 -fsyntax-only ${FLAGS} ${SOURCE}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but must not")
endif()
if(NOT out MATCHES "${EXPECT}")
  message(FATAL_ERROR "${SOURCE} failed without the expected message '${EXPECT}':\n${out}")
endif()
execute_process(COMMAND ${CXX} -std=c++20 -fsyntax-only ${FLAGS} -DMUON_COMPILE_FAIL_CONTROL
                        ${SOURCE}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the control build of ${SOURCE} failed:\n${out}")
endif()
message(STATUS "refused as expected: '${EXPECT}'")
