#!/usr/bin/env bash
# issue 11 reruns on 2 x H200: fetch (fp8, bf16 layer-only), prefetch_overlap, coaction_bench, deepseek_forward.
set -uo pipefail
T0=$(date +%s); DEADLINE=$((T0 + 570))
FINAL=${OUT:-$PWD/gpu_out}; mkdir -p "$FINAL"
S=$(mktemp -d); export OUT=$S   # benchmarks also copy their JSON to $OUT: keep it in the scratch folder
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=index,name,driver_version --format=csv; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv;
  nvidia-smi topo -m; nvidia-smi nvlink -s -i 0 | head -6; python3 --version; nvcc --version | tail -1; } > "$S/machine.txt" 2>&1
cp "$S/machine.txt" "$FINAL/machine.txt"
python3 -m pip install --no-build-isolation --no-deps -e . > "$S/build.log" 2>&1; echo "build rc=$? $(( $(date +%s) - T0 )) s"
left() { echo $(( DEADLINE - $(date +%s) )); }
step() {  # name cap reserve cmd...: timeout = min(cap, time left - reserve)
  local name=$1 cap=$2 reserve=$3; shift 3
  local t=$(( $(left) - reserve )); (( t > cap )) && t=$cap
  if (( t < 20 )); then echo "$name SKIPPED (only $(left) s left)" | tee -a "$S/rcs.txt"; return; fi
  local a=$(date +%s)
  timeout $t "$@" > "$S/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc timeout=$t took=$(( $(date +%s) - a )) s" | tee -a "$S/rcs.txt"
}
L="python3 -m dwdp_ops.launch -n 2"
step fetch_bandwidth_N2_float8_e4m3fn 120 360 $L --timeout 110 bench/fetch_bandwidth.py --layer-only --dtypes float8_e4m3fn --tag float8_e4m3fn
grep "^\[rank 0\]" "$S/fetch_bandwidth_N2_float8_e4m3fn.log" | grep -v Warning | cut -c1-200 | tail -18
step fetch_bandwidth_N2_bfloat16 120 300 $L --timeout 110 bench/fetch_bandwidth.py --layer-only --dtypes bfloat16 --tag bfloat16
grep "^\[rank 0\]" "$S/fetch_bandwidth_N2_bfloat16.log" | grep -v Warning | cut -c1-200 | tail -18
step prefetch_overlap_N2 190 200 $L --timeout 180 bench/prefetch_overlap.py
grep "^\[rank 0\]" "$S/prefetch_overlap_N2.log" | tail -14
step coaction_bench 300 110 python3 bench/coaction_bench.py
grep "^{'B'" "$S/coaction_bench.log" | cut -c1-900
T=$(( $(left) - 5 )); (( T > 300 )) && T=300
step deepseek_forward_N2 300 5 $L --timeout $((T - 8)) bench/deepseek_forward.py
grep "^\[rank 0\]" "$S/deepseek_forward_N2.log" | tail -6
mkdir -p "$S/results"; cp bench/results/*.json bench/results/*.png "$S/results/" 2>/dev/null
tar czf "$FINAL/outputs.tgz" -C "$S" . ; cp "$S/rcs.txt" "$FINAL/" 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
