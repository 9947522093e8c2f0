#!/usr/bin/env bash
# How long a program that uses muon takes to compile: the README's usage example (extracted
# from README.md) with g++ -O2, header-only and in the compiled mode (linking muon::compiled's
# library, built once here and timed apart), against an Eigen-only program of the same size
# (the same layer trained by plain gradient descent) compiled in the same run.
#
#   bash bench/compile_time.sh [repeats]     (default 3; each row is the fastest repeat)
#
# Needs g++, Eigen 3.4 and OpenBLAS as scripts/install_deps.sh installs them. Quiet the machine
# first: the times are of one compiler process on one core.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
repeats=${1:-3}
cxx=${CXX:-g++}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

flags=(-O2 -DNDEBUG -std=c++20 -I"$root/include" -isystem /usr/include/eigen3)
libs=()
if echo '#include <cblas.h>' | "$cxx" -E -x c++ - >/dev/null 2>&1; then
  flags+=(-DMUON_USE_CBLAS=1)  # as muon::eigen does when CMake finds OpenBLAS
  libs+=(-lopenblas)
fi

# The README's first C++ block, the usage example.
awk '/^```cpp$/ && !done {on = 1; next} /^```$/ && on {on = 0; done = 1} on' \
  "$root/README.md" > "$work/readme.cpp"
grep -q 'muon::Optimizer' "$work/readme.cpp" || { echo "no usage example in README.md" >&2; exit 1; }

cat > "$work/eigen_only.cpp" <<'EOF'
#include <Eigen/Core>

int main() {
  Eigen::MatrixXf W = Eigen::MatrixXf::Zero(64, 32), gW(64, 32);
  Eigen::VectorXf b = Eigen::VectorXf::Zero(64), gb(64);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(32, 256), y = Eigen::MatrixXf::Random(64, 256);
  for (int step = 0; step < 100; ++step) {
    const Eigen::MatrixXf residual = ((W * x).colwise() + b - y) / float(x.cols());
    gW = residual * x.transpose();
    gb = residual.rowwise().sum();
    W -= 0.02f * gW;
    b -= 0.02f * gb;
  }
}
EOF

# Fastest of `repeats` runs of a command, in seconds.
fastest() {
  local best=""
  for ((i = 0; i < repeats; ++i)); do
    local t0 t1 t
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    t=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    if [[ -z $best ]] || awk -v t="$t" -v b="$best" 'BEGIN { exit !(t < b) }'; then best=$t; fi
  done
  printf '%.1f' "$best"
}

baseline=$(fastest "$cxx" "${flags[@]}" -c "$work/eigen_only.cpp" -o "$work/eigen_only.o")
header_only=$(fastest "$cxx" "${flags[@]}" -c "$work/readme.cpp" -o "$work/header_only.o")
library=$(fastest "$cxx" "${flags[@]}" -DMUON_COMPILED=1 -c "$root/src/eigen_optimizer.cpp" \
  -o "$work/eigen_optimizer.o")
compiled=$(fastest "$cxx" "${flags[@]}" -DMUON_COMPILED=1 -c "$work/readme.cpp" -o "$work/compiled.o")
# Both programs link and run, so the times are of working builds.
"$cxx" "$work/header_only.o" "${libs[@]}" -o "$work/header_only" && "$work/header_only"
"$cxx" "$work/compiled.o" "$work/eigen_optimizer.o" "${libs[@]}" -o "$work/compiled" && "$work/compiled"

ratio() { awk -v t="$1" -v b="$baseline" 'BEGIN { printf "%.1f", t / b }'; }
echo "Compile time of the README usage example, $($cxx --version | head -1), -O2, fastest of $repeats"
printf '%-44s %8s %14s\n' "build" "seconds" "x Eigen-only"
printf '%-44s %8s %14s\n' "Eigen-only program of the same size" "$baseline" "1.0"
printf '%-44s %8s %14s\n' "muon header-only (muon::eigen)" "$header_only" "$(ratio "$header_only")"
printf '%-44s %8s %14s\n' "muon compiled mode (muon::compiled)" "$compiled" "$(ratio "$compiled")"
printf '%-44s %8s %14s\n' "  its library, once (src/eigen_optimizer.cpp)" "$library" "$(ratio "$library")"
