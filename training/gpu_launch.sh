#!/usr/bin/env bash
# On the GPU machine: a ~1-minute CUDA smoke run of the whole pipeline (tiny models, eager), and only if it is
# clean, the real run in the background (setsid nohup; poll with training/gpu_poll.sh).
#   bash training/gpu_launch.sh [--text-only] [RUN_DIR]      (default runs/main)
# --text-only: only the two text models (run_all.sh --text-only), for the smoke run and the real run alike.
cd "$(dirname "$0")/.."
RUN=runs/main
MODE=""
for a in "$@"; do
  case "$a" in
    --text-only) MODE=--text-only ;;
    -*) echo "gpu_launch: unknown option $a" >&2; exit 2 ;;
    *) RUN="$a" ;;
  esac
done
mkdir -p runs
bash training/gpu_stage.sh || exit 1  # .carry -> runs/carry, which the run reads (see gpu_stage.sh)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
t0=$(date +%s)
COMPILE=0 bash training/run_all.sh --smoke $MODE runs/smoke > runs/smoke.log 2>&1
echo "smoke${MODE:+ $MODE}: $(( $(date +%s) - t0 ))s: $(cat runs/smoke/DONE 2>/dev/null)"
if grep -qE "A=(0|skipped) B=0 package=0" runs/smoke/DONE 2>/dev/null \
  && ! grep -qE "Traceback|FAILED|failed" runs/smoke/B.log runs/smoke.log \
  && ! grep -qsE "Traceback|FAILED|failed" runs/smoke/A.log; then
  setsid nohup bash training/run_all.sh $MODE "$RUN" > "$RUN.log" 2>&1 < /dev/null &
  sleep 20
  echo "launched the real run in the background: $RUN${MODE:+ ($MODE)} (log $RUN.log, $RUN/A.log, $RUN/B.log)"
  cat "$RUN.log"
else
  echo "SMOKE FAILED: the real run was NOT started"
  tail -n 40 runs/smoke.log runs/smoke/A.log runs/smoke/B.log 2>/dev/null
  exit 1
fi
