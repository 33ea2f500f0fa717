#!/usr/bin/env bash
# The GPU tier on a machine with two GPUs in the least wall time: the one-GPU tests in two lanes at once (one GPU
# each), then the tests that need both GPUs. Each part writes its own log, so a time limit loses only what had not
# finished.  Usage: bash tests/gpu/lanes.sh [LOG_DIR] [SECONDS]   (default /tmp, 580 s for the whole run)
# The whole tier takes longer than one 600 s device call: choose parts with LANE0, LANE1 and TWO (pytest
# arguments), e.g. LANE0="tests/gpu/test_qat_gpu.py" LANE1="tests/gpu/test_sft_gpu.py -k sigkill" TWO="".
set -uo pipefail
cd "$(dirname "$0")/../.."
logs="${1:-/tmp}"
limit="${2:-580}"
mkdir -p "$logs"
pytest_() { python3 -m pytest -v -s --tb=short -p no:cacheprovider "$@"; }
LANE0="${LANE0-tests/gpu/test_qat_gpu.py tests/gpu/test_pipeline_gpu.py tests/gpu/test_plan_gpu.py}"
LANE1="${LANE1-tests/gpu/test_sft_gpu.py tests/gpu/test_model_gpu.py tests/gpu/test_import_gpu.py tests/gpu/test_fused_kernels_gpu.py}"
TWO="${TWO-tests/gpu/test_sft_gpu.py tests/gpu/test_import_gpu.py -k 'ep2 or tp2 or pp2'}"
left() { echo $((limit - SECONDS)); }

(CUDA_VISIBLE_DEVICES=0 timeout "$(left)" bash -c "$(declare -f pytest_); [ -z \"$LANE0\" ] || pytest_ $LANE0" \
  > "$logs/gpu-lane0.log" 2>&1; echo "lane 0 done at ${SECONDS} s" >> "$logs/gpu-lane0.log") &
lane0=$!
(CUDA_VISIBLE_DEVICES=1 GPU_TESTS_PORT_OFFSET=100 timeout "$(left)" bash -c "$(declare -f pytest_); [ -z \"$LANE1\" ] || pytest_ $LANE1" \
  > "$logs/gpu-lane1.log" 2>&1; echo "lane 1 done at ${SECONDS} s" >> "$logs/gpu-lane1.log") &
lane1=$!
wait "$lane0" "$lane1"
if [ -n "$TWO" ] && [ "$(left)" -gt 60 ]; then  # with one GPU visible the lanes skipped these: now both GPUs
  timeout "$(left)" bash -c "$(declare -f pytest_); pytest_ $TWO" > "$logs/gpu-two.log" 2>&1
fi
for f in "$logs"/gpu-lane0.log "$logs"/gpu-lane1.log "$logs"/gpu-two.log; do
  [ -f "$f" ] || continue
  echo "== $f"
  grep -E "RESULT|PASSED|FAILED|SKIPPED|passed|failed|done at" "$f" | cut -c1-2000 | tail -60
done
