#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, build the CUDA targets with all its cores,
# run `ctest -L cuda`, compute-sanitizer's memcheck and racecheck on the CUDA tests (a reduced
# case set), and the GPU benchmark against PyTorch (bench/compare_torch_gpu.py, the grouped
# step included), then print one summary table. Meant to finish in under 8 minutes.
#
#   bash scripts/gpu_check.sh --prepare   # here, on the Debian machine: gather the headers the
#                                         # GPU machine lacks (Eigen, Catch2) into .gpu-deps/
#   bash scripts/gpu_check.sh             # there: build, test, sanitize, benchmark
#
# A GPU machine without a package manager gets Eigen and Catch2 from .gpu-deps/ (ignored by
# git; carry it along). The CPU side of the CUDA tests then runs its products on Eigen's own
# kernels (MUON_BLAS=Eigen), which changes no GPU result. Logs go to $OUT (or build-gpu/).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  rm -rf .gpu-deps && mkdir -p .gpu-deps/include .gpu-deps/share
  cp -r /usr/include/eigen3 .gpu-deps/include/
  cp -r /usr/share/eigen3 .gpu-deps/share/
  cp -r /usr/include/catch2 .gpu-deps/include/
  mkdir -p .gpu-deps/lib/cmake && cp -r /usr/lib/cmake/Catch2 .gpu-deps/lib/cmake/
  cp /usr/lib/libCatch2WithMain.a .gpu-deps/lib/ 2>/dev/null || true  # its package config names it
  du -sh .gpu-deps
  exit 0
fi

logs="${OUT:-build-gpu}"
mkdir -p "$logs"
start=$(date +%s)
declare -a rows
row() { rows+=("$(printf '| %-34s | %-6s | %s |' "$1" "$2" "$3")"); }
elapsed() { echo "$(( $(date +%s) - start )) s"; }

gpu=yes
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee "$logs/gpu.txt" | grep -q . || gpu=no
# LibTorch: the one the machine's PyTorch carries (a CUDA build), for the CUDA tensor tests.
torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
prefix="-DCMAKE_PREFIX_PATH=$PWD/.gpu-deps;$torch_prefix -DEigen3_DIR=$PWD/.gpu-deps/share/eigen3/cmake"
[ -d .gpu-deps ] || prefix="-DCMAKE_PREFIX_PATH=$torch_prefix"
generator=""
command -v ninja > /dev/null && generator="-G Ninja"
# shellcheck disable=SC2086
if cmake -S . -B build-gpu $generator -DCMAKE_BUILD_TYPE=Release -DMUON_ENABLE_CUDA=ON \
     -DMUON_BLAS=Eigen -DMUON_BUILD_EXAMPLES=OFF -DMUON_BUILD_CLI=OFF \
     -DCMAKE_CUDA_ARCHITECTURES=90 $prefix > "$logs/configure.log" 2>&1 &&
   cmake --build build-gpu -j"$(nproc)" --target muon_cuda_tests muon_cuda_host_tests \
     muon_cuda_bench > "$logs/build.log" 2>&1; then
  row "build (CUDA targets)" "ok" "$(elapsed)"
else
  row "build (CUDA targets)" "FAILED" "see $logs/configure.log, $logs/build.log"
  printf '%s\n' "${rows[@]}"
  tail -n 30 "$logs/configure.log" "$logs/build.log"
  exit 1
fi
# The NCCL targets need NCCL's headers, the LibTorch ones a CUDA build of LibTorch: each is
# built when what it needs is there.
for target in muon_nccl_world1 muon_nccl_sharded_world1 muon_libtorch_cuda_tests; do
  if cmake --build build-gpu -j"$(nproc)" --target "$target" > "$logs/build_$target.log" 2>&1; then
    row "build $target" "ok" ""
  else
    row "build $target" "no" "$(grep -m1 -E 'error|No rule' "$logs/build_$target.log")"
  fi
done

if [ "$gpu" = no ]; then  # a machine without a GPU: the build is all there is to check
  row "GPU" "none" "no NVIDIA GPU visible: built only"
  printf '%s\n' "${rows[@]}"
  exit 77
fi

if timeout 240 ctest --test-dir build-gpu -L cuda --output-on-failure > "$logs/ctest.log" 2>&1; then
  row "ctest -L cuda" "ok" "$(grep -E 'tests passed|tests failed' "$logs/ctest.log" | tail -1)"
else
  row "ctest -L cuda" "FAILED" "$(grep -E 'tests passed|tests failed' "$logs/ctest.log" | tail -1); $logs/ctest.log"
fi

# Sanitizers on a reduced set: the optimizer's fused stages, the flag reads, 16-bit copies and
# the fixed-order norms, on small shapes.
tests=build-gpu/tests/muon_cuda_tests
reduced="state_round_trip non_finite_refused_on_device master_weights_bf16 deterministic_run_to_run"
for tool in memcheck racecheck; do
  # shellcheck disable=SC2086  # $reduced: one word per test name
  if timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 3 "$tests" $reduced \
       > "$logs/$tool.log" 2>&1; then
    row "compute-sanitizer $tool" "ok" "$(grep -E 'ERROR SUMMARY' "$logs/$tool.log" | tail -1)"
  else
    row "compute-sanitizer $tool" "FAILED" "$(grep -E 'ERROR SUMMARY|error' "$logs/$tool.log" | tail -1); $logs/$tool.log"
  fi
done

if timeout 200 python3 bench/compare_torch_gpu.py build-gpu/bench/muon_cuda_bench --quick \
     > "$logs/bench.log" 2>&1; then
  row "GPU benchmark vs PyTorch" "ok" "$logs/bench.log"
else
  row "GPU benchmark vs PyTorch" "FAILED" "$logs/bench.log"
fi

echo
echo "| check                              | result | detail |"
echo "|------------------------------------|--------|--------|"
printf '%s\n' "${rows[@]}"
echo "total: $(elapsed)"
echo
cat "$logs/bench.log"
