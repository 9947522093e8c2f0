#!/usr/bin/env bash
# Install what is missing, build everything with warnings as errors and run every test, with
# g++ (the ci preset) and then clang++ (the clang preset; packaging tests run once, above).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
jobs=$(nproc)
echo "== g++ =="
cmake --preset ci > /dev/null
cmake --build build-ci -j"$jobs"
ctest --preset ci -j"$jobs"
echo "== clang++ =="
cmake --preset clang -DMUON_BUILD_BENCHMARKS=OFF -DMUON_BUILD_EXAMPLES=OFF > /dev/null
cmake --build build-clang -j"$jobs"
ctest --preset clang -j"$jobs" -E "^consumer\."
