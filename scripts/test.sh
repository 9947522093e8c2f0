#!/usr/bin/env bash
# Install what is missing, build everything with warnings as errors, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake --preset ci > /dev/null
cmake --build build-ci -j"$(nproc)"
ctest --preset ci -j"$(nproc)"
