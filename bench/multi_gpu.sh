#!/usr/bin/env bash
# Issue 20's GPU bar: one engine vs one engine per GPU (UNET_SERVER_DEVICES) behind the one HTTP front, in the
# same run: closed-loop throughput at saturation, p50 at one client and start-to-ready, for the shipped
# fashion-class model and for an SD 1.5-config pipeline (random weights, 512², 20 steps DPM++ 2M, CFG 7.5).
#   bash bench/multi_gpu.sh "$OUT" [fashion|sd15|both]   (sd15 needs the CLIP tokenizer cache:
#   UNET_SERVER_TEST_CACHE; N defaults to the GPUs nvidia-smi lists)
set -euo pipefail
OUT=${1:?output folder}
WHICH=${2:-both}
N=${N:-$(nvidia-smi -L | wc -l)}
WORK=${WORK:-/tmp/multi-gpu-work}
mkdir -p "$OUT" "$WORK/weights"
echo "engines: 1 vs $N ($(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs))"
if [ "$WHICH" = fashion ] || [ "$WHICH" = both ]; then
  # 128 rows per pass per engine; 256 / 512 clients keep two engines' passes full.
  python -m bench.server_load --out "$OUT" --clients 1,128,256,512 --open-fractions 0 \
    --skip one-at-a-time,raw --variants "devices=1;devices=$N" --duration 10 --warmup-s 3 --budget-s 300
fi
if [ "$WHICH" = sd15 ] || [ "$WHICH" = both ]; then
  if [ ! -f "$WORK/weights/sd15/model_index.json" ]; then
    python -c "from pathlib import Path; from tests.model.sd_helpers import build_sd15_random; build_sd15_random(Path('$WORK/weights/sd15'), variant='fp16')"
  fi
  python -m bench.server_load --out "$OUT" --weights-dir "$WORK/weights" --model sd15 --text \
    --steps 20 --guidance 7.5 --clients 1,32,64 --open-fractions 0 --skip one-at-a-time,raw \
    --variants "devices=1;devices=$N" --max-rows 64 --buckets 2,4,8,16,32,64 --duration 15 --warmup-s 5 \
    --ready-timeout 400 --budget-s 400
fi
