#!/usr/bin/env bash
# Install what is missing, build everything with warnings as errors and run every test:
#   1. g++, Release (the ci preset): all tests, packaging and allocation tests included;
#   2. clang++ with AddressSanitizer + UndefinedBehaviorSanitizer (asan-clang): the tests
#      again, the libFuzzer harnesses for MUON_FUZZ_SECONDS each (40 by default) and clang-tidy
#      on every public header.
# The g++ sanitizer build (the asan preset) is not run here: it runs the same tests under the
# same sanitizers as stage 2, and g++'s own warnings are covered by stage 1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
jobs=$(nproc)
echo "== g++ =="
cmake --preset ci > /dev/null
cmake --build build-ci -j"$jobs"
ctest --preset ci -j"$jobs"
echo "== clang++, ASan + UBSan, fuzzers, clang-tidy =="
cmake --preset asan-clang -DMUON_FUZZ_SECONDS="${MUON_FUZZ_SECONDS:-40}" > /dev/null
cmake --build build-asan-clang -j"$jobs"
ctest --preset asan-clang -j"$jobs" -E "^consumer\."
