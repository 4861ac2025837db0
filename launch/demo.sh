#!/usr/bin/env bash
# The main job end to end on the demo corpus (generated deterministically on first use):
#   pack (synthetic captioned RGB-D scenes, train + held-out test, CDCP labels = generation 0)
#   -> train with `accelerate launch`, 2 processes on CPU, settings from configs/demo.yaml
#   -> evaluate label generations and the final RGB-only model -> runs/demo/report.md
# Every knob can be overridden from the environment, e.g. EPOCHS=4 bash launch/demo.sh:
# a training variable that is set goes to jsm_dist.train as an override of the config file.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"

CORPUS="${CORPUS:-shards/demo}"
RUN="${RUN:-runs/demo}"
NUM_SAMPLES="${NUM_SAMPLES:-480}"
train_size_override="${IMAGE_SIZE:-}"  # a given IMAGE_SIZE is also the training size
IMAGE_SIZE="${IMAGE_SIZE:-128}"  # demo corpus side in pixels (configs/demo.yaml trains at 128)
HOLDOUT="${HOLDOUT:-0.2}"
NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-configs/demo.yaml}"
# Training overrides (unset = the value in $CONFIG): EPOCHS, TAU, ENCODER, BATCH, TEXT_FIT (text-network
# epochs on cached features before each refinement), JSM_SCORE (word_vs_negative | word = reference),
# LABEL_UPDATE (regions | blend = the paper's update), REGION_SCORE (text | saliency = without text),
# SEED (train.seed: initialisation, data order, augmentation; the corpus stays the same).
overrides=()
[ -n "${EPOCHS:-}" ] && overrides+=(--train.epochs "$EPOCHS")
[ -n "${TAU:-}" ] && overrides+=(--train.tau "$TAU")
[ -n "${TEXT_FIT:-}" ] && overrides+=(--train.text_fit_epochs "$TEXT_FIT")
[ -n "${ENCODER:-}" ] && overrides+=(--model.encoder "$ENCODER")
[ -n "${JSM_SCORE:-}" ] && overrides+=(--model.jsm_score "$JSM_SCORE")
[ -n "${BATCH:-}" ] && overrides+=(--data.batch_size "$BATCH")
[ -n "${LABEL_UPDATE:-}" ] && overrides+=(--model.label_update "$LABEL_UPDATE")
[ -n "${REGION_SCORE:-}" ] && overrides+=(--model.region_score "$REGION_SCORE")
[ -n "${SEED:-}" ] && overrides+=(--train.seed "$SEED")
[ -n "$train_size_override" ] && overrides+=(--data.train_size "$train_size_override")
PORT="${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

start=$(date +%s)
if [ ! -f "$CORPUS/train/corpus.json" ]; then
  echo "== [1/4] packing the demo corpus ($NUM_SAMPLES scenes, ${IMAGE_SIZE}px) into $CORPUS"
  jsm-pack synth --out "$CORPUS" --num-samples "$NUM_SAMPLES" --image-size "$IMAGE_SIZE" \
    --seed 0 --samples-per-shard 64 --holdout "$HOLDOUT" --overwrite
else
  echo "== [1/4] demo corpus already packed in $CORPUS (delete it to regenerate)"
fi
rm -rf "$RUN"
echo "== [2/4] training: accelerate launch, $NPROC CPU processes, $CONFIG ${overrides[*]}"
# CPU DDP: --multi_gpu + ACCELERATE_USE_CPU (torchrun underneath); see docs/platform.md / launch/train.sh
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 \
  --mixed_precision no --dynamo_backend no --main_process_port "$PORT" \
  -m jsm_dist.train --config "$CONFIG" \
  --corpus "$CORPUS/train" --eval_corpus "$CORPUS/test" --out_dir "$RUN" "${overrides[@]}"
echo "== [3/4] + [4/4] evaluating label generations and the RGB-only model; writing the report"
python -m jsm_dist.eval.runreport --run "$RUN" --corpus "$CORPUS/train" --eval-corpus "$CORPUS/test"
echo "== done in $(( $(date +%s) - start )) s: $RUN/report.md"
