#!/usr/bin/env bash
# The papers' experiment, GLUE-style: every init on a sentence-classification task, several seeds, learning rates
# searched per method (--lr auto), each method against plain LoRA with a 95% interval and a verdict.
# Usage: bash examples/compare_glue_style.sh MODEL TRAIN.csv DEV.csv OUT [extra compare options]
# e.g. MODEL=FacebookAI/roberta-base with GLUE's MRPC files (columns sentence1, sentence2, label). --dry-run prints
# the plan and its number of runs without running anything.
set -euo pipefail
MODEL=$1 TRAIN=$2 DEV=$3 OUT=$4
shift 4
ailora-tools compare "$MODEL" --task sequence-classification --data "$TRAIN" --eval-data "$DEV" -o "$OUT" \
    --text-column sentence1 --text-pair-column sentence2 --methods lora,pissa,milora,ailora,dora \
    --rank 8 --alpha 16 --targets query,value --batch-size 16 --max-length 128 --scheduler linear \
    --warmup-ratio 0.06 --weight-decay 0.1 --lr auto --seeds 0,1,2,3,4 --metric accuracy "$@"
