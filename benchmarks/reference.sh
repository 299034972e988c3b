#!/usr/bin/env bash
# Reference recipe: about an hour on 2 CPU cores, on the default corpus (this Python's stdlib).
#
#   1. one `tiny` Llama trunk trained from scratch jointly with DeepSeek MTP modules (λ 0.3)
#   2. self-distillation: the trunk's own greedy continuations of training-split prompts
#   3. each head family (bpd, meta, deepseek; D = 4) trained on that text, trunk frozen
#   4. `multitoken bench` of every model on validation-split prompts of the stdlib corpus
#      (τ and acceptance on the trunk's own greedy output), plus the jointly trained base
#   5. benchmarks/summarize_reference.py prints the README table and draws reference.png
#
# Each stage is skipped when its output exists, so an interrupted run continues where it stopped.
# Usage: bash benchmarks/reference.sh [OUT]      (default OUT: runs/reference)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/reference}
MT=${MT:-.venv/bin/multitoken}
PY=${PY:-.venv/bin/python}
BASE_STEPS=${BASE_STEPS:-3000}
HEAD_STEPS=${HEAD_STEPS:-800}
BENCH=(--data stdlib --draft-lens 1,2,3,4 --num-prompts 16 --prompt-tokens 64 --max-new-tokens 128)
mkdir -p "$OUT"

if [ ! -e "$OUT/base/latest" ] || ! grep -q "step-$(printf %07d "$BASE_STEPS")" "$OUT/base/latest"; then
  resume=(); [ -e "$OUT/base/latest" ] && resume=(--resume)
  $MT train --preset tiny --family deepseek --depth 3 --max-steps "$BASE_STEPS" \
    --eval-every 500 --save-every 250 --out "$OUT/base" "${resume[@]}"
fi
TRUNK="$OUT/base/$(cat "$OUT/base/latest")/trunk"

[ -e "$OUT/distill.done" ] || {
  $MT distill --checkpoint "$OUT/base" --from-corpus 3000 --prompt-tokens 64 \
    --max-new-tokens 128 --batch-size 16 --out "$OUT/distill.jsonl"
  touch "$OUT/distill.done"
}

for family in bpd meta deepseek; do
  [ -e "$OUT/$family/latest" ] || $MT train --trunk "$TRUNK" --freeze-trunk --family "$family" \
    --depth 4 --data "$OUT/distill.jsonl" --max-steps "$HEAD_STEPS" --lr 2e-3 \
    --eval-every 400 --save-every 400 --out "$OUT/$family"
done

for run in base bpd meta deepseek; do
  [ -e "$OUT/$run/bench.json" ] || $MT bench --checkpoint "$OUT/$run" "${BENCH[@]}" \
    --json "$OUT/$run/bench.json" --plot "$OUT/$run/bench.png"
done

$PY benchmarks/summarize_reference.py "$OUT"
