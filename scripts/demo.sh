#!/usr/bin/env bash
# The main job: install what is missing, build (Release), run the quickstart example, then
# print the Newton-Schulz accuracy table and the orthogonalization speed table of muon-cli.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake --preset default -DMUON_BUILD_TESTS=OFF > /dev/null
cmake --build build -j"$(nproc)" --target quickstart muon-cli
echo "== quickstart: Muon + AdamW vs AdamW alone =="
./build/examples/quickstart
echo
echo "== muon-cli accuracy =="
./build/muon-cli accuracy --dtype float32 --dtype float64
echo
echo "== muon-cli bench =="
./build/muon-cli bench
