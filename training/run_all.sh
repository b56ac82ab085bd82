#!/usr/bin/env bash
# Train, evaluate and package the three shipped models (+ the judge) in one run of ~12 minutes on one GPU.
#
#   bash training/run_all.sh [--smoke] [--text-only] [RUN_DIR]        (default RUN_DIR: runs/main)
#
# Two processes share the GPU (the small models are launch-bound, so they overlap well):
#   A: classifier (judge) -> fashion-class -> evaluate fashion-class
#   B: fashion-text -> fashion-text-edges (ControlNet, base frozen) -> evaluate both
# then package: RUN_DIR/weights/<model>/ (shipped folders) and RUN_DIR/out/<model>.tar.gz (one per model, for the
# device tool's $OUT) plus RUN_DIR/out/logs.tar.gz. RUN_DIR/DONE is written last.
#
# --text-only: process B only (~10 minutes). The judge is not trained: the shipped one (JUDGE, default
# weights/fashion-classifier) is copied to RUN_DIR/classifier, where the evaluation reads it; packaging then
# writes only fashion-text and fashion-text-edges (fashion-class and fashion-classifier stay as shipped).
# DONE reads "A=skipped B=.. package=..".
# Inputs: runs/carry/<part> (staged by training/gpu_stage.sh) or .carry/<part>, for the parts minilm
# (training/export_text_encoder.py) and fashion-mnist (training/prepare_carry.py), when present, else the
# venv package / Debian dataset; UNET_SERVER_TEXT_ENCODER_DIR / FASHION_MNIST_DIR override. Budgets
# (seconds) can be overridden by env vars.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=""
TEXT_ONLY=""
RUN=runs/main
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=--smoke ;;
    --text-only) TEXT_ONLY=1 ;;
    -*) echo "run_all: unknown option $a" >&2; exit 2 ;;
    *) RUN="$a" ;;
  esac
done
PY=${PYTHON:-$(command -v python3 || command -v python)}
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; esac
ROOT=$PWD
case "$RUN" in /*) ;; *) RUN="$ROOT/$RUN" ;; esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRAINING_BACKEND=${TRAINING_BACKEND:-ours}
export TRAINING_GPU_SHARED=$([ -n "$TEXT_ONLY" ] && echo 0 || echo 1)  # recorded in train.json (model cards)
carried() {  # the staged copy of a .carry part (kept between device calls), else .carry's
  if [ -d "runs/carry/$1" ]; then echo "$ROOT/runs/carry/$1"
  elif [ -d ".carry/$1" ]; then echo "$ROOT/.carry/$1"; fi
}
if [ -z "${UNET_SERVER_TEXT_ENCODER_DIR:-}" ] && [ -n "$(carried minilm)" ]; then
  export UNET_SERVER_TEXT_ENCODER_DIR="$(carried minilm)"
fi
if [ -z "${FASHION_MNIST_DIR:-}" ] && [ -n "$(carried fashion-mnist)" ]; then
  export FASHION_MNIST_DIR="$(carried fashion-mnist)"
fi

CLF_S=${CLF_S:-60}
CLASS_S=${CLASS_S:-440}
TEXT_S=${TEXT_S:-330}
CN_S=${CN_S:-200}
COMPILE=${COMPILE:-1}
EVAL_ARGS=${EVAL_ARGS:-}
JUDGE=${JUDGE:-weights/fashion-classifier}
case "$JUDGE" in /*) ;; *) JUDGE="$ROOT/$JUDGE" ;; esac

# this run's outputs and logs only (nothing left from an earlier run in the same folder)
rm -rf "$RUN/weights" "$RUN/out" "$RUN/A.log" "$RUN/B.log"
mkdir -p "$RUN/out"
rm -f "$RUN/DONE"
if [ -n "$TEXT_ONLY" ]; then
  if [ ! -f "$JUDGE/model.safetensors" ] || [ ! -f "$JUDGE/config.json" ]; then
    echo "run_all: --text-only needs the judge in $JUDGE (model.safetensors, config.json)"
    echo "FAILED judge" > "$RUN/DONE"; exit 1
  fi
  rm -rf "$RUN/classifier" && mkdir -p "$RUN/classifier"
  cp "$JUDGE/model.safetensors" "$JUDGE/config.json" "$RUN/classifier/"
fi
# Run from a snapshot of the code: the working tree may be re-synced (other people's edits) while this runs,
# and processes started later (ControlNet, evaluation, packaging) must use the code the run started with.
rm -rf "$RUN/code" && mkdir -p "$RUN/code" && cp -r model training "$RUN/code/"
find "$RUN/code" -name __pycache__ -prune -exec rm -rf {} +
cd "$RUN/code"
T0=$(date +%s)
echo "run_all: $(date -u +%FT%TZ) run=$RUN smoke=${SMOKE:-no} text_only=${TEXT_ONLY:-no} python=$PY" \
  "backend=$TRAINING_BACKEND budgets: CLF_S=$CLF_S CLASS_S=$CLASS_S TEXT_S=$TEXT_S CN_S=$CN_S" \
  "text_encoder=${UNET_SERVER_TEXT_ENCODER_DIR:-package} data=${FASHION_MNIST_DIR:-system}"
"$PY" -c "import torch, model.unet, model.controlnet, model.samplers, model.text_encoder; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  || { echo "run_all: environment check failed"; echo "FAILED env" > "$RUN/DONE"; exit 1; }

PID_A=""
if [ -z "$TEXT_ONLY" ]; then
  (
    "$PY" -m training.classifier --out "$RUN/classifier" --seconds "$CLF_S" $SMOKE \
      && "$PY" -m training.train_class --out "$RUN/fashion-class" --seconds "$CLASS_S" --compile "$COMPILE" $SMOKE
    "$PY" -m training.evaluate --run "$RUN" --models fashion-class $SMOKE $EVAL_ARGS
  ) > "$RUN/A.log" 2>&1 &
  PID_A=$!
fi
(
  "$PY" -m training.train_text --out "$RUN/fashion-text" --seconds "$TEXT_S" --compile "$COMPILE" $SMOKE \
    && "$PY" -m training.train_controlnet --base "$RUN/fashion-text" --out "$RUN/fashion-text-edges" \
      --seconds "$CN_S" --compile "$COMPILE" $SMOKE
  for _ in $(seq 1 120); do [ -f "$RUN/classifier/model.safetensors" ] && break; sleep 1; done
  "$PY" -m training.evaluate --run "$RUN" --models fashion-text fashion-text-edges $SMOKE $EVAL_ARGS
) > "$RUN/B.log" 2>&1 &
PID_B=$!
RC_A=skipped
if [ -n "$PID_A" ]; then wait $PID_A; RC_A=$?; fi
wait $PID_B; RC_B=$?
echo "run_all: A rc=$RC_A B rc=$RC_B after $(( $(date +%s) - T0 ))s"

if [ -n "$TEXT_ONLY" ]; then
  "$PY" -m training.package --run "$RUN" --out "$RUN/weights" --models fashion-text fashion-text-edges
else
  "$PY" -m training.package --run "$RUN" --out "$RUN/weights"
fi
RC_P=$?
for m in fashion-class fashion-text fashion-text-edges fashion-classifier; do
  [ -d "$RUN/weights/$m" ] && tar -C "$RUN/weights" -czf "$RUN/out/$m.tar.gz" "$m"
done
tar -C "$RUN" -czf "$RUN/out/logs.tar.gz" --exclude=./out --exclude=./weights --exclude="*.safetensors" .
cp "$RUN/weights/README.md" "$RUN/out/README.md" 2>/dev/null
ls -la "$RUN/out"
echo "A=$RC_A B=$RC_B package=$RC_P seconds=$(( $(date +%s) - T0 ))" > "$RUN/DONE"
echo "run_all: done in $(( $(date +%s) - T0 ))s"
