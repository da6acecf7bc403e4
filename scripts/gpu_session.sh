#!/usr/bin/env bash
# One device-machine session: offline build, GPU tests, benchmarks. Everything is written to a scratch folder and
# packed into $OUT/outputs.tgz (a device call returns only a few files), with machine.txt beside it.
# Usage: [TESTS="tests/a.py ..."] [TEST_TIMEOUT=s] scripts/gpu_session.sh MODE[,MODE...]
#   tests     build + the GPU tests (TESTS narrows them); the script exits with pytest's code
#   dispatch  build + dispatch_bandwidth (our dispatch/combine against NCCL all_to_all_single)
#   fetch     build + fetch_bandwidth (N GPUs, and the N=2 layer-only jobs)           issue 3
#   overlap   build + prefetch_overlap                                                issue 4
#   can       build + coaction_bench + coaction_host + coaction_split + CAN-DNN/DNN training on the GPU (3 seeds)
#             issues 6, 16
#   split     build + coaction_split, forward and backward, on the other specialised shapes and bf16 (SPLIT_SHAPES,
#             default "can:bfloat16 o4oi:float32 o4oi:bfloat16 o1:float32 o1:bfloat16"; SPLIT_OPS, default
#             "forward backward")                                                                          issue 16
#   cantrain  build + CAN-DNN/DNN training on the GPU alone (3 seeds)                                        issue 16
#   canprof   build + Nsight Compute of the co-action kernels at B = 8192, T = 100 (bench/coaction_profile.py:
#             the specialised forward and backward, then the general ones)                   issue 16
#   deepseek  build + deepseek_forward (10 repeats)                                   issue 5
#   demo      build + bench/demo_policies.py: demo under auto and on_demand, same prompts and layers  issue 12
#   fp8       build + the fp8 GPU tests + bench/expert_gemm.py                                   issue 13
#   attention build + tests/test_gpu_attention.py + bench/attention_probe.py: SDPA and packed backends on R1
#             prefill shapes (one GPU)                                                            issue 14
#   gemm      build + bench/expert_gemm.py alone (fp8 / bf16 grouped against dense)                issue 13
#   e2e       build + bench/e2e_dwdp_vs_dep.py on every GPU (E2E_ARGS, E2E_TIMEOUT)               issue 14
#   main      build + the main command `python -m dwdp_ops demo` (fp8 default) and `--dtype bfloat16`, same seed and
#             prompts, JSON reports (MAIN_ARGS adds options to both; MAIN_TIMEOUT: seconds each, default 240)  issues 12, 13
#   smoke     build + every benchmark script once with its smallest arguments, for changes to the scripts' own
#             plumbing (arguments, imports, result files); prints each exit code; the figures are not results and
#             bench/results is restored afterwards (not part of `all`)
#   all       tests, fetch, overlap, can, deepseek, demo (longer than one 10-minute device call: use one mode per call)
set -uo pipefail
FINAL=${OUT:-$PWD/gpu_out}; mkdir -p "$FINAL"
OUT=$(mktemp -d); export OUT
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
what=${1:-all}
NGPU=$(nvidia-smi -L | wc -l)
want() { [[ ",$what," == *",$1,"* || $what == all ]]; }
{
  date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; nvidia-smi topo -m
  nvidia-smi nvlink -s -i 0 | head -6; python3 --version; nvcc --version | tail -1
} > "$OUT/machine.txt" 2>&1
t0=$(date +%s)
# A warm machine keeps build/ from its last call, and ninja rebuilds by timestamps: a source copied over with an older
# modification time than that build's objects (e.g. one the last call had checked out afresh) would not be rebuilt,
# and the tests would run the old extension. The sources' content hash decides instead.
src_hash=$(cat CMakeLists.txt pyproject.toml cpp/include/dwdp/* cpp/src/* | sha256sum | cut -d' ' -f1)
if [[ "$(cat build/.dwdp_src_hash 2>/dev/null)" != "$src_hash" ]]; then touch cpp/src/* cpp/include/dwdp/*; fi
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
mkdir -p build && echo "$src_hash" > build/.dwdp_src_hash
echo "build: $(( $(date +%s) - t0 )) s"
rc=0
if want tests; then
  DWDP_REQUIRE_GPU=1 timeout "${TEST_TIMEOUT:-480}" python3 -m pytest -m "gpu or multigpu" -rs -v ${TESTS:-tests} > "$OUT/gpu_tests.log" 2>&1
  rc=$?  # pytest's own exit code (124: timed out)
  grep -E "FAIL|SKIP|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -25
  echo "pytest exit code: $rc"
fi
if want dispatch; then
  t=${DISPATCH_TIMEOUT:-300}; timeout $t python3 -m dwdp_ops.launch -n "$NGPU" --timeout $((t - 20)) bench/dispatch_bandwidth.py ${DISPATCH_ARGS:-} > "$OUT/dispatch_bandwidth_N$NGPU.log" 2>&1
  echo "dispatch_bandwidth N=$NGPU rc=$?"; grep "^\[rank 0\]" "$OUT/dispatch_bandwidth_N$NGPU.log" | tail -30
fi
if want fetch; then
  # one ExpertStore per process (see store_check.py): each dtype's layer runs in its own job
  timeout 300 python3 -m dwdp_ops.launch -n "$NGPU" --timeout 280 bench/fetch_bandwidth.py --dtypes float8_e4m3fn > "$OUT/fetch_bandwidth_N$NGPU.log" 2>&1
  echo "fetch_bandwidth N=$NGPU rc=$?"; grep "^\[rank 0\]" "$OUT/fetch_bandwidth_N$NGPU.log" | grep -v size_sweep | tail -30
  timeout 200 python3 -m dwdp_ops.launch -n "$NGPU" --timeout 180 bench/fetch_bandwidth.py --layer-only --dtypes bfloat16 --tag bf16 > "$OUT/fetch_bandwidth_N${NGPU}_bf16.log" 2>&1
  echo "fetch_bandwidth N=$NGPU bf16 rc=$?"; grep "^\[rank 0\]" "$OUT/fetch_bandwidth_N${NGPU}_bf16.log" | tail -16
  if (( NGPU > 2 )); then
    for dt in float8_e4m3fn bfloat16; do
      timeout 200 python3 -m dwdp_ops.launch -n 2 --timeout 180 bench/fetch_bandwidth.py --layer-only --dtypes $dt --tag $dt > "$OUT/fetch_bandwidth_N2_$dt.log" 2>&1
      echo "fetch_bandwidth N=2 $dt rc=$?"; grep "^\[rank 0\]" "$OUT/fetch_bandwidth_N2_$dt.log" | tail -16
    done
  fi
fi
if want overlap; then
  timeout 400 python3 -m dwdp_ops.launch -n "$NGPU" --timeout 380 bench/prefetch_overlap.py > "$OUT/prefetch_overlap_N$NGPU.log" 2>&1
  echo "prefetch_overlap N=$NGPU rc=$?"; grep "^\[rank 0\]" "$OUT/prefetch_overlap_N$NGPU.log" | tail -25
fi
if want can; then
  timeout 300 python3 bench/coaction_bench.py > "$OUT/coaction_bench.log" 2>&1; echo "coaction_bench rc=$?"
  grep "^{'B'" "$OUT/coaction_bench.log" | cut -c1-600  # one line per case (torch.compile's autotune log around them)
  timeout 200 python3 bench/coaction_host.py > "$OUT/coaction_host.log" 2>&1; echo "coaction_host rc=$?"
  cut -c1-900 "$OUT/coaction_host.log"
  timeout 240 python3 bench/coaction_split.py > "$OUT/coaction_split.log" 2>&1; echo "coaction_split rc=$?"
  grep -E "^B=|checked" "$OUT/coaction_split.log" | cut -c1-200
fi
if want split; then
  for sd in ${SPLIT_SHAPES:-can:bfloat16 o4oi:float32 o4oi:bfloat16 o1:float32 o1:bfloat16}; do
    for op in ${SPLIT_OPS:-forward backward}; do
      log="$OUT/coaction_split_${op}_${sd/:/_}.log"
      timeout 150 python3 bench/coaction_split.py --op $op --shape ${sd%%:*} --dtype ${sd##*:} > "$log" 2>&1
      echo "coaction_split $op $sd rc=$?"; grep -E "^B=|checked" "$log" | cut -c1-200
    done
  done
fi
if want can || want cantrain; then
  mkdir -p "$OUT/can"
  for seed in 0 1 2; do
    timeout 200 python3 -m dwdp_ops can-train --device gpu --samples 100000 --epochs 3 --seed $seed --quiet \
      --json "$OUT/can/can_gpu_seed$seed.json" --plot "$OUT/can/can_gpu_seed$seed.png" > "$OUT/can/can_gpu_seed$seed.log" 2>&1
    echo "can-train seed $seed rc=$?"; tail -2 "$OUT/can/can_gpu_seed$seed.log"
  done
fi
if want canprof; then
  for which in spec general; do
    args=""; [[ $which == general ]] && args="--general"
    timeout 150 ncu --kernel-name "regex:spec_|fast_" --launch-skip 4 --launch-count 2 --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
      python3 bench/coaction_profile.py $args > "$OUT/ncu_coaction_$which.txt" 2>&1
    echo "ncu $which rc=$?"; grep -E "^  [a-z ]*void|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy" "$OUT/ncu_coaction_$which.txt" | cut -c1-150
  done
fi
if want deepseek; then
  timeout 300 python3 -m dwdp_ops.launch -n "$NGPU" --timeout 290 bench/deepseek_forward.py > "$OUT/deepseek_forward_N$NGPU.log" 2>&1
  echo "deepseek_forward rc=$?"; grep "^\[rank 0\]" "$OUT/deepseek_forward_N$NGPU.log" | tail -6
fi
if want demo; then
  timeout "${DEMO_TIMEOUT:-570}" python3 bench/demo_policies.py --timeout 540 ${DEMO_ARGS:-} > "$OUT/demo_policies_N$NGPU.log" 2>&1
  echo "demo_policies rc=$?"; tail -12 "$OUT/demo_policies_N$NGPU.log"
fi
if want main; then
  for dt in float8_e4m3fn bfloat16; do
    timeout "${MAIN_TIMEOUT:-240}" python3 -m dwdp_ops demo --json --dtype $dt ${MAIN_ARGS:-} > "$OUT/demo_$dt.json" 2> "$OUT/demo_$dt.log"
    echo "demo --dtype $dt rc=$?"; python3 -c "import json, sys; from dwdp_ops.demo import print_gpu; print_gpu(json.load(open(sys.argv[1])))" \
      "$OUT/demo_$dt.json" 2>&1 | tail -12
  done
fi
if want e2e; then
  t=${E2E_TIMEOUT:-500}; timeout $t python3 -m dwdp_ops.launch -n "$NGPU" --timeout $((t - 20)) bench/e2e_dwdp_vs_dep.py \
    ${E2E_ARGS:-} > "$OUT/e2e_N$NGPU.log" 2>&1; echo "e2e N=$NGPU rc=$?"; grep "^\[rank 0\] |" "$OUT/e2e_N$NGPU.log" | tail -40
fi
if want attention; then
  DWDP_REQUIRE_GPU=1 timeout 120 python3 -m pytest -m gpu -rs -q tests/test_gpu_attention.py > "$OUT/gpu_tests_attention.log" 2>&1
  echo "attention tests rc=$?"; tail -4 "$OUT/gpu_tests_attention.log"
  timeout 240 python3 bench/attention_probe.py > "$OUT/attention_probe.log" 2>&1; echo "attention_probe rc=$?"
  grep "^S=" "$OUT/attention_probe.log"
fi
if want gemm; then
  timeout 200 python3 bench/expert_gemm.py > "$OUT/expert_gemm.log" 2>&1; echo "expert_gemm rc=$?"; grep "^T=" "$OUT/expert_gemm.log"
fi
if want fp8; then
  # fits one 10-minute device call with the build; the fp8 demo comparison is `DEMO_ARGS="--dtype float8_e4m3fn
  # --tag fp8" scripts/gpu_session.sh demo` in a call of its own
  DWDP_REQUIRE_GPU=1 timeout 240 python3 -m pytest -m "gpu or multigpu" -rs -v -k "fp8 or mini8 or quant" \
    tests/test_gpu_quant.py tests/test_gpu_deepseek.py tests/test_fp8_torch.py > "$OUT/gpu_tests_fp8.log" 2>&1
  echo "fp8 tests rc=$?"; tail -5 "$OUT/gpu_tests_fp8.log"
  timeout 300 python3 bench/expert_gemm.py > "$OUT/expert_gemm.log" 2>&1; echo "expert_gemm rc=$?"; grep "^T=" "$OUT/expert_gemm.log"
fi
if [[ ",$what," == *",smoke,"* ]]; then
  keep=$(mktemp -d); cp -a bench/results "$keep/"
  L="python3 -m dwdp_ops.launch -n $NGPU --timeout 150"
  smoke() {  # name, command...: one run, its exit code and last lines
    local name=$1; shift
    timeout 170 "$@" > "$OUT/smoke_$name.log" 2>&1; local r=$?
    echo "smoke $name rc=$r"; (( r == 0 )) || { tail -4 "$OUT/smoke_$name.log"; rc=1; }
  }
  smoke coaction_bench python3 bench/coaction_bench.py --sizes 256x20 --repeats 2 --pipeline 2 --compile-mode default
  smoke coaction_host python3 bench/coaction_host.py --repeats 2 --calls 5
  smoke coaction_profile python3 bench/coaction_profile.py --B 256 --T 20 --rows 1000
  smoke coaction_split python3 bench/coaction_split.py --T 100 --B 1,64 --ks 1,4 --repeats 2 --calls 2
  smoke gemm_probe python3 bench/gemm_probe.py 64
  smoke attention_probe python3 bench/attention_probe.py --lengths 1024 --batch-tokens 2048 --repeats 2 --warmup 1
  smoke expert_gemm python3 bench/expert_gemm.py --tokens 256 --routing uniform --repeats 2 --warmup 1
  smoke decode_breakdown python3 bench/decode_breakdown.py --moe-layers 1 --prompts 2 --min-len 64 --max-len 128 \
    --steps 2 --tag smoke
  smoke demo_policies python3 bench/demo_policies.py --pairs 1 --prompts 2 --min-len 64 --max-len 128 --steps 2 \
    --moe-layers 1 --timeout 150
  smoke deepseek_forward $L bench/deepseek_forward.py --tokens 512 --requests 2 --repeats 1
  if (( NGPU >= 2 )); then  # (both refuse one rank: they measure fetches from peers)
    smoke prefetch_overlap $L bench/prefetch_overlap.py --tokens 1024 --layers 2 --repeats 2 --skip-slowdown --tag smoke
    smoke fetch_bandwidth $L bench/fetch_bandwidth.py --repeats 2 --sizes-mib $(( 2 * (NGPU - 1) )) --dtypes bfloat16 \
      --tag smoke
  else
    echo "smoke prefetch_overlap, fetch_bandwidth: skipped (they need 2 GPUs)"
  fi
  smoke dispatch_bandwidth $L bench/dispatch_bandwidth.py --tokens 128 --repeats 2 --warmup 1 --check-max 128 \
    --heap 2g --tag smoke
  smoke e2e_dwdp_vs_dep $L bench/e2e_dwdp_vs_dep.py --budgets 1024 --dists cv0 --isl 256 --iterations 3 --warmup 0 \
    --moe-layers 1
  rm -rf bench/results && cp -a "$keep/results" bench/results
fi
cp bench/results/*.json "$OUT/" 2>/dev/null
tar czf "$FINAL/outputs.tgz" -C "$OUT" . && cp "$OUT/machine.txt" "$FINAL/"
exit $rc
