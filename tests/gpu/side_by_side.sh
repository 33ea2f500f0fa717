#!/usr/bin/env bash
# Several GPU-tier commands at once on the visible GPU(s), each on its own ports and with its own log, under one time
# limit: the tiny models leave an H200 mostly idle, so side by side costs less device time than one after another
# (step times measured this way are not alone on the GPU; benchmarks/train_step.py is run alone).
#   bash tests/gpu/side_by_side.sh LOG_DIR SECONDS "NAME=COMMAND" ["NAME=COMMAND" ...]
# COMMAND runs under bash with GPU_TESTS_PORT_OFFSET 100 apart per lane and GPU_TESTS_LOG_DIR=LOG_DIR/NAME (the
# subprocesses' streamed output); its own output goes to LOG_DIR/NAME.log. At the end, or at SECONDS, each log's
# RESULT / PASSED / FAILED lines and pytest's summary are printed, and LOG_DIR is packed into LOG_DIR.tgz.
set -uo pipefail
cd "$(dirname "$0")/../.."
logs=$1; limit=$2; shift 2
mkdir -p "$logs"
i=0; pids=()
for lane in "$@"; do
  name=${lane%%=*}; cmd=${lane#*=}
  (GPU_TESTS_PORT_OFFSET=$((i * 100)) GPU_TESTS_LOG_DIR="$logs/$name" timeout "$limit" bash -c "$cmd" \
     > "$logs/$name.log" 2>&1; echo "exit $? at ${SECONDS} s" >> "$logs/$name.log") &
  pids+=($!); i=$((i + 1))
done
wait "${pids[@]}"
for lane in "$@"; do
  name=${lane%%=*}
  echo "== $name"
  grep -E "RESULT|PASSED|FAILED|SKIPPED|ERROR|Error|passed|failed|^exit" "$logs/$name.log" | cut -c1-1500 | tail -25
done
tar czf "$logs.tgz" -C "$(dirname "$logs")" "$(basename "$logs")"
