# Checks what a program compiled, from the symbols `nm -C` lists for FILES:
#  - EXPECTED (if given): the driver's per-rule steps (OptimizerCore::run_matrix_of<R>,
#    run_chunk_of<R>) are exactly those of the rules named (";"-separated, e.g. "AdamW;Muon";
#    empty: none, as in the compiled mode, whose library holds them). A program compiles the
#    step of a rule it registers, and of no other rule.
#  - ABSENT (if given): no symbol the program defines matches this regular expression (muon's
#    Eigen product kernels, which a CBLAS build compiles only into a program that links them).
find_program(NM nm REQUIRED)
execute_process(COMMAND ${NM} -C ${FILES} OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nm failed on ${FILES}")
endif()
if(DEFINED EXPECTED)
  string(REGEX MATCHALL " [TWt] [^\n]*::run_(matrix|chunk)_of<muon::rules::[A-Za-z]+>" steps
         "${symbols}")
  set(found "")
  foreach(step IN LISTS steps)
    string(REGEX REPLACE ".*<muon::rules::([A-Za-z]+)>$" "\\1" rule "${step}")
    list(APPEND found ${rule})
  endforeach()
  list(REMOVE_DUPLICATES found)
  list(SORT found)
  set(expected ${EXPECTED})
  list(SORT expected)
  if(NOT "${found}" STREQUAL "${expected}")
    message(FATAL_ERROR "the program compiled the steps of the rules [${found}], expected "
                        "[${expected}]")
  endif()
  message(STATUS "rules whose step the program compiled: [${found}]")
endif()
if(DEFINED ABSENT)
  string(REGEX MATCH " [TWt] [^\n]*(${ABSENT})[^\n]*" defined "${symbols}")
  if(defined)
    message(FATAL_ERROR "the program defines${defined}, which it should not")
  endif()
  message(STATUS "no symbol matching ${ABSENT}")
endif()
