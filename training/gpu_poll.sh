#!/usr/bin/env bash
# On the GPU machine: progress of the background run. Prints DONE's line once it has finished.
#   bash training/gpu_poll.sh [RUN_DIR]
cd "$(dirname "$0")/.."
RUN=${1:-runs/main}
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
for f in "$RUN/A.log" "$RUN/B.log"; do
  echo "== $f"
  grep -E "steps/s|compile|accuracy|acc |F1|written|FAILED|failed|Error|done" "$f" 2>/dev/null | tail -n 6 | cut -c1-240
done
if [ -f "$RUN/DONE" ]; then echo "DONE: $(cat "$RUN/DONE")"; ls -la "$RUN/out"; cat "$RUN/out/README.md"; else echo "running"; fi
