#!/usr/bin/env bash
# Installs, from Debian's packages, whatever muon's build, tests and demo need and the machine
# lacks. Runs apt-get only when something is missing; uses sudo when not root.
set -euo pipefail
packages=(cmake make g++ clang pkg-config libeigen3-dev catch2 python3-numpy libbenchmark-dev
          libopenblas-dev clang-tidy libclang-rt-14-dev libopenmpi-dev openmpi-bin libcli11-dev
          libtorch-dev libxtensor-dev python3-matplotlib fortunes)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
