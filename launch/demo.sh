#!/usr/bin/env bash
# The main job end to end on the embedded demo corpus (regenerated deterministically):
#   pack (synthetic captioned RGB-D scenes, train + held-out test, CDCP labels = generation 0)
#   -> train with `accelerate launch`, 2 processes on CPU, label refinement every TAU epochs
#   -> evaluate label generations and the final RGB-only model -> runs/demo/report.md
# Every knob can be overridden from the environment, e.g. EPOCHS=4 bash launch/demo.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"

CORPUS="${CORPUS:-shards/demo}"
RUN="${RUN:-runs/demo}"
NUM_SAMPLES="${NUM_SAMPLES:-480}"
IMAGE_SIZE="${IMAGE_SIZE:-128}"
HOLDOUT="${HOLDOUT:-0.2}"
NPROC="${NPROC:-2}"
EPOCHS="${EPOCHS:-6}"
TAU="${TAU:-2}"
ENCODER="${ENCODER:-efficientnet_lite0}"
BATCH="${BATCH:-8}"
TEXT_FIT="${TEXT_FIT:-30}"  # text-network epochs on cached features before each refinement
JSM_SCORE="${JSM_SCORE:-word_vs_negative}"  # JSM candidate score: word_vs_negative | word (reference)
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
echo "== [2/4] training: accelerate launch, $NPROC CPU processes, $EPOCHS epochs, refine every $TAU"
# CPU DDP: --multi_gpu + ACCELERATE_USE_CPU (torchrun underneath); see PLATFORM_NOTES / launch/train.sh
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 \
  --mixed_precision no --dynamo_backend no --main_process_port "$PORT" \
  -m jsm_dist.train --corpus "$CORPUS/train" --eval_corpus "$CORPUS/test" --out_dir "$RUN" \
  --epochs "$EPOCHS" --tau "$TAU" --model.encoder "$ENCODER" --data.train_size "$IMAGE_SIZE" \
  --data.batch_size "$BATCH" --data.num_workers 1 --crf true --text_fit_epochs "$TEXT_FIT" \
  --model.jsm_score "$JSM_SCORE"
echo "== [3/4] + [4/4] evaluating label generations and the RGB-only model; writing the report"
python -m jsm_dist.runreport --run "$RUN" --corpus "$CORPUS/train" --eval-corpus "$CORPUS/test"
echo "== done in $(( $(date +%s) - start )) s: $RUN/report.md"
