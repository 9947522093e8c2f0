#!/usr/bin/env bash
# Install what is missing, build everything with warnings as errors and run every test:
#   1. g++, Release (the ci preset): all tests, packaging and allocation tests included;
#   2. g++ with AddressSanitizer + UndefinedBehaviorSanitizer (the asan preset);
#   3. clang++ with ASan + UBSan (asan-clang): the tests again, the libFuzzer harnesses for
#      MUON_FUZZ_SECONDS each (60 by default) and clang-tidy on every public header.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
jobs=$(nproc)
echo "== g++ =="
cmake --preset ci > /dev/null
cmake --build build-ci -j"$jobs"
ctest --preset ci -j"$jobs"
echo "== g++, ASan + UBSan =="
cmake --preset asan > /dev/null
cmake --build build-asan -j"$jobs"
ctest --preset asan -j"$jobs" -E "^consumer\."
echo "== clang++, ASan + UBSan, fuzzers, clang-tidy =="
cmake --preset asan-clang -DMUON_FUZZ_SECONDS="${MUON_FUZZ_SECONDS:-60}" > /dev/null
cmake --build build-asan-clang -j"$jobs"
ctest --preset asan-clang -j"$jobs" -E "^consumer\."
