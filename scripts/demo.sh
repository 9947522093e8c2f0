#!/usr/bin/env bash
# The main job: install what is missing, build (Release), train a small GPT on English text with
# Muon + AdamW and with AdamW alone and report the steps Muon needs to reach AdamW's loss (with
# a picture, build/gpt_curves.png), then print muon-cli's Newton-Schulz accuracy and speed
# tables. The full learning-rate sweep is one command in docs/gpt_experiment.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake --preset default -DMUON_BUILD_TESTS=OFF > /dev/null
cmake --build build -j"$(nproc)" --target gpt_muon_vs_adamw muon-cli
echo "== a small GPT on Debian's fortunes: Muon + AdamW against AdamW alone (about 5 minutes) =="
./build/examples/gpt_muon_vs_adamw --csv build/gpt_curves.csv
/usr/bin/python3 examples/plot_gpt_experiment.py build/gpt_curves.csv build/gpt_curves.png
echo "the validation curves: build/gpt_curves.png"
echo
echo "== muon-cli accuracy =="
./build/muon-cli accuracy --dtype float32 --dtype float64
echo
echo "== muon-cli bench =="
./build/muon-cli bench
