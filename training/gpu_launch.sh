#!/usr/bin/env bash
# On the GPU machine: a ~1-minute CUDA smoke run of the whole pipeline (tiny models, eager), and only if it is
# clean, the real run in the background (setsid nohup; poll with training/gpu_poll.sh).
#   bash training/gpu_launch.sh [RUN_DIR]      (default runs/main)
cd "$(dirname "$0")/.."
RUN=${1:-runs/main}
mkdir -p runs
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
t0=$(date +%s)
COMPILE=0 bash training/run_all.sh --smoke runs/smoke > runs/smoke.log 2>&1
echo "smoke: $(( $(date +%s) - t0 ))s: $(cat runs/smoke/DONE 2>/dev/null)"
if grep -q "A=0 B=0 package=0" runs/smoke/DONE 2>/dev/null \
  && ! grep -qE "Traceback|FAILED|failed" runs/smoke/A.log runs/smoke/B.log runs/smoke.log; then
  setsid nohup bash training/run_all.sh "$RUN" > "$RUN.log" 2>&1 < /dev/null &
  sleep 20
  echo "launched the real run in the background: $RUN (log $RUN.log, $RUN/A.log, $RUN/B.log)"
  cat "$RUN.log"
else
  echo "SMOKE FAILED: the real run was NOT started"
  tail -n 40 runs/smoke.log runs/smoke/A.log runs/smoke/B.log
  exit 1
fi
