#!/usr/bin/env bash
# One device-machine session: offline build, GPU tests, benchmarks. Outputs under $OUT (or ./gpu_out).
# Usage: scripts/gpu_session.sh [tests|bench|all]
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
what=${1:-all}
{
  date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; nvidia-smi topo -m
  nvidia-smi nvlink -s -i 0 | head -6; python3 --version; nvcc --version | tail -1
} > "$OUT/machine.txt" 2>&1
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
if [[ $what == tests || $what == all ]]; then
  timeout 420 python3 -m pytest -m "gpu or multigpu" -rs -v tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  for b in ${BENCHES:-}; do timeout 300 bash -c "$b" 2>&1 | tee -a "$OUT/bench.log" | tail -40; done
fi
