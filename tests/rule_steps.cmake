# Checks which update rules' steps a program compiled: the driver's per-rule steps
# (OptimizerCore::run_matrix_of<R>, run_chunk_of<R>) defined in FILES are exactly those of the
# rules named in EXPECTED (";"-separated, e.g. "AdamW;Muon"; empty: none, as in the compiled
# mode, whose library holds them). A program compiles the step of a rule it registers, and of
# no other rule.
find_program(NM nm REQUIRED)
execute_process(COMMAND ${NM} -C ${FILES} OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nm failed on ${FILES}")
endif()
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
