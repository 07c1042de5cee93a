#!/usr/bin/env bash
# The whole workflow from the command line: decompose -> train -> convert (for vLLM and for llama.cpp) -> merge ->
# verify. Usage: bash examples/end_to_end.sh [MODEL] [TRAIN.jsonl] [EVAL.jsonl] [OUT]
# With no arguments it builds the demo's tiny model first and runs there (a minute on 2 CPU cores).
set -euo pipefail
OUT=${4:-e2e}
if [ $# -eq 0 ]; then
    ailora-tools demo -o "$OUT/demo" --quiet
    set -- "$OUT/demo/base" "$OUT/demo/data/train.jsonl" "$OUT/demo/data/eval.jsonl" "$OUT"
fi
MODEL=$1 TRAIN=$2 EVAL=$3
ailora-tools decompose "$MODEL" -o "$OUT/init" --method ailora --rank 8 --quiet
ailora-tools train --base "$OUT/init/residual" --adapter "$OUT/init/adapter" --data "$TRAIN" --eval-data "$EVAL" \
    -o "$OUT/trained" --max-steps 20 --lr 1e-2 --quiet
ailora-tools convert --trained "$OUT/trained" -o "$OUT/lora-vllm" --for vllm        # vLLM takes it as it is
ailora-tools convert --trained "$OUT/trained" -o "$OUT/lora-cpp" --for llama.cpp
ailora-tools export-gguf "$OUT/lora-cpp" --base "$MODEL" -o "$OUT/lora.gguf"        # llama.cpp's LoRA GGUF
ailora-tools merge "$MODEL" "$OUT/lora-vllm" -o "$OUT/merged" --quiet
ailora-tools verify "$OUT"
