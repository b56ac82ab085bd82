#!/usr/bin/env bash
# Train, evaluate and package the three shipped models (+ the judge) in one run of ~12 minutes on one GPU.
#
#   bash training/run_all.sh [--smoke] [RUN_DIR]        (default RUN_DIR: runs/main)
#
# Two processes share the GPU (the small models are launch-bound, so they overlap well):
#   A: classifier (judge) -> fashion-class -> evaluate fashion-class
#   B: fashion-text -> fashion-text-edges (ControlNet, base frozen) -> evaluate both
# then package: RUN_DIR/weights/<model>/ (shipped folders) and RUN_DIR/out/<model>.tar.gz (one per model, for the
# device tool's $OUT) plus RUN_DIR/out/logs.tar.gz. RUN_DIR/DONE is written last.
# Inputs: .carry/minilm (training/export_text_encoder.py) and .carry/fashion-mnist (training/prepare_carry.py)
# when present, else the venv package / Debian dataset. Budgets (seconds) can be overridden by env vars.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=""
RUN=runs/main
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=--smoke ;;
    *) RUN="$a" ;;
  esac
done
PY=${PYTHON:-$(command -v python3 || command -v python)}
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; esac
ROOT=$PWD
case "$RUN" in /*) ;; *) RUN="$ROOT/$RUN" ;; esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRAINING_BACKEND=${TRAINING_BACKEND:-ours}
if [ -d .carry/minilm ] && [ -z "${UNET_SERVER_TEXT_ENCODER_DIR:-}" ]; then
  export UNET_SERVER_TEXT_ENCODER_DIR="$ROOT/.carry/minilm"
fi
if [ -d .carry/fashion-mnist ] && [ -z "${FASHION_MNIST_DIR:-}" ]; then
  export FASHION_MNIST_DIR="$ROOT/.carry/fashion-mnist"
fi

CLF_S=${CLF_S:-60}
CLASS_S=${CLASS_S:-440}
TEXT_S=${TEXT_S:-330}
CN_S=${CN_S:-200}
COMPILE=${COMPILE:-1}
EVAL_ARGS=${EVAL_ARGS:-}

mkdir -p "$RUN/out"
rm -f "$RUN/DONE"
# Run from a snapshot of the code: the working tree may be re-synced (other people's edits) while this runs,
# and processes started later (ControlNet, evaluation, packaging) must use the code the run started with.
rm -rf "$RUN/code" && mkdir -p "$RUN/code" && cp -r model training "$RUN/code/"
find "$RUN/code" -name __pycache__ -prune -exec rm -rf {} +
cd "$RUN/code"
T0=$(date +%s)
echo "run_all: $(date -u +%FT%TZ) run=$RUN smoke=${SMOKE:-no} python=$PY backend=$TRAINING_BACKEND" \
  "text_encoder=${UNET_SERVER_TEXT_ENCODER_DIR:-package} data=${FASHION_MNIST_DIR:-system}"
"$PY" -c "import torch, model.unet, model.controlnet, model.samplers, model.text_encoder; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  || { echo "run_all: environment check failed"; echo "FAILED env" > "$RUN/DONE"; exit 1; }

(
  "$PY" -m training.classifier --out "$RUN/classifier" --seconds "$CLF_S" $SMOKE \
    && "$PY" -m training.train_class --out "$RUN/fashion-class" --seconds "$CLASS_S" --compile "$COMPILE" $SMOKE
  "$PY" -m training.evaluate --run "$RUN" --models fashion-class $SMOKE $EVAL_ARGS
) > "$RUN/A.log" 2>&1 &
PID_A=$!
(
  "$PY" -m training.train_text --out "$RUN/fashion-text" --seconds "$TEXT_S" --compile "$COMPILE" $SMOKE \
    && "$PY" -m training.train_controlnet --base "$RUN/fashion-text" --out "$RUN/fashion-text-edges" \
      --seconds "$CN_S" --compile "$COMPILE" $SMOKE
  for _ in $(seq 1 120); do [ -f "$RUN/classifier/model.safetensors" ] && break; sleep 1; done
  "$PY" -m training.evaluate --run "$RUN" --models fashion-text fashion-text-edges $SMOKE $EVAL_ARGS
) > "$RUN/B.log" 2>&1 &
PID_B=$!
wait $PID_A; RC_A=$?
wait $PID_B; RC_B=$?
echo "run_all: A rc=$RC_A B rc=$RC_B after $(( $(date +%s) - T0 ))s"

"$PY" -m training.package --run "$RUN" --out "$RUN/weights"
RC_P=$?
for m in fashion-class fashion-text fashion-text-edges fashion-classifier; do
  [ -d "$RUN/weights/$m" ] && tar -C "$RUN/weights" -czf "$RUN/out/$m.tar.gz" "$m"
done
tar -C "$RUN" -czf "$RUN/out/logs.tar.gz" --exclude=./out --exclude=./weights --exclude="*.safetensors" .
cp "$RUN/weights/README.md" "$RUN/out/README.md" 2>/dev/null
ls -la "$RUN/out"
echo "A=$RC_A B=$RC_B package=$RC_P seconds=$(( $(date +%s) - T0 ))" > "$RUN/DONE"
echo "run_all: done in $(( $(date +%s) - T0 ))s"
