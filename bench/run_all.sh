#!/usr/bin/env bash
# Every benchmark in one call, inside ~4 minutes on one H100 (soft budgets per script, hard timeouts).
#
#   bash bench/run_all.sh "$OUT"                 # CUDA: full sizes
#   bash bench/run_all.sh /tmp/bo --device cpu --quick    # CPU smoke test of every path
#
# Writes <out>/{unet_forward,sampling_loop,server_load}.json, <out>/bench_results.md and <out>/bench_log.txt
# (5 files), and prints a summary (goals vs measured) last.
set -u -o pipefail
OUT_DIR=${1:-${OUT:-/tmp/bench_out}}
shift || true
EXTRA=("$@")
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/bench_log.txt"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

# Soft budgets (each script stops starting new configs past it) and hard kills, in seconds.
# Typical total ~4 min; worst case (every hard kill) ~6.5 min, so give the call timeout_s >= 420.
UF_BUDGET=${UF_BUDGET:-100}; UF_KILL=${UF_KILL:-135}
SV_BUDGET=${SV_BUDGET:-65};  SV_KILL=${SV_KILL:-105}
SL_BUDGET=${SL_BUDGET:-35};  SL_KILL=${SL_KILL:-60}
T0=$(date +%s)

step() {  # step NAME KILL_SECONDS command...
  local name=$1 kill=$2; shift 2
  echo "=== $name (t=$(( $(date +%s) - T0 ))s) ===" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$kill" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && echo "!!! $name exited with $rc" | tee -a "$LOG"
  return 0
}

{
  echo "run_all: $(date -u) | $($PY -c 'import torch;print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' 2>&1)"
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null
} | tee "$LOG"

step "graph tests" 60 $PY -m pytest -q -x -p no:cacheprovider tests/model/test_cuda_graphs.py
step "unet_forward" "$UF_KILL" $PY -m bench.unet_forward --out "$OUT_DIR" --budget-s "$UF_BUDGET" "${EXTRA[@]}"
step "server_load" "$SV_KILL" $PY -m bench.server_load --out "$OUT_DIR" --budget-s "$SV_BUDGET" "${EXTRA[@]}"
step "sampling_loop" "$SL_KILL" $PY -m bench.sampling_loop --out "$OUT_DIR" --budget-s "$SL_BUDGET" "${EXTRA[@]}"
step "summary" 30 $PY -m bench.summarize "$OUT_DIR"
echo "run_all done in $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
