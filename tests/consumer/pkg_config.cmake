# Builds and runs the consumer app with nothing but `pkg-config --cflags --libs muon` against
# the installed prefix. Inputs: PREFIX, CXX, SOURCE, BINARY.
execute_process(
  COMMAND ${CMAKE_COMMAND} -E env "PKG_CONFIG_PATH=${PREFIX}/share/pkgconfig"
          pkg-config --cflags --libs muon
  OUTPUT_VARIABLE flags OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pkg-config --cflags --libs muon failed")
endif()
separate_arguments(flags UNIX_COMMAND "${flags}")
execute_process(COMMAND ${CXX} -O2 ${SOURCE} ${flags} -o ${BINARY} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "compiling with the pkg-config flags failed: ${flags}")
endif()
execute_process(COMMAND ${BINARY} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the consumer app failed")
endif()
