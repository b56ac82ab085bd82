#!/usr/bin/env bash
# Issue 13's GPU bar: an SD 1.5-config pipeline folder (the real configs, random weights, fp16 files) served
# end to end at 512² (20 steps DPM++ 2M, guidance 7.5) at 1 / 8 / 32 closed-loop clients, with the card's
# memory in use sampled by nvidia-smi (its peak = the VRAM peak), then the model-level agreement with
# diffusers' StableDiffusionPipeline on the same weights (tests/model/test_gpu_sd15_pipeline.py).
#   bash bench/sd15_serving.sh "$OUT"     (needs the CLIP tokenizer cache: UNET_SERVER_TEST_CACHE)
set -euo pipefail
OUT=${1:?output folder}
WORK=${WORK:-/tmp/sd15-work}
mkdir -p "$OUT" "$WORK/weights"
if [ ! -f "$WORK/weights/sd15/model_index.json" ]; then
  python -c "from pathlib import Path; from tests.model.sd_helpers import build_sd15_random; build_sd15_random(Path('$WORK/weights/sd15'), variant='fp16')"
fi
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/sd15_memory_used_mib.log" &
SMI=$!
python -m bench.server_load --out "$OUT" --weights-dir "$WORK/weights" --model sd15 --text \
  --steps 20 --guidance 7.5 --clients 1,8,32 --open-fractions 0 --skip one-at-a-time,raw \
  --max-rows 64 --buckets 2,4,8,16,32,64 --duration 20 --warmup-s 5 --ready-timeout 400 --budget-s 400
kill $SMI || true
echo "VRAM peak (nvidia-smi memory.used, MiB): $(sort -n "$OUT/sd15_memory_used_mib.log" | tail -1)"
