#!/usr/bin/env bash
# Bring your own model, end to end (the README's worked example), and what distillation buys:
#
#   0. a local transformers model folder: here a `tiny` Llama trained from scratch on the default
#      corpus and exported with `multitoken export --trunk-only` (with your own model, skip this)
#   1. `multitoken distill`: the model's own greedy continuations of training-split prompts
#   2. BPD heads (D = 3) trained on the frozen model twice, same steps: on raw text (the corpus)
#      and on the distilled text
#   3. `multitoken bench` of both on the same validation-split prompts; the heads exported alone
#      and decoded from the plain model folder with `--heads`
#
# About 15 minutes on 2 CPU cores. Each stage is skipped when its output exists.
# Usage: bash benchmarks/byom.sh [OUT]      (default OUT: runs/byom)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/byom}
MT=${MT:-.venv/bin/multitoken}
PY=${PY:-.venv/bin/python}
BASE_STEPS=${BASE_STEPS:-1500}
HEAD_STEPS=${HEAD_STEPS:-400}
BENCH=(--data stdlib --draft-lens 1,2,3 --num-prompts 16 --prompt-tokens 64 --max-new-tokens 96)
HEADS=(--freeze-trunk --family bpd --depth 3 --max-steps "$HEAD_STEPS" --lr 2e-3 --eval-every 200)
mkdir -p "$OUT"

[ -e "$OUT/base/latest" ] || $MT train --preset tiny --family bpd --depth 1 \
  --max-steps "$BASE_STEPS" --eval-every 500 --save-every 500 --out "$OUT/base"
[ -e "$OUT/model/config.json" ] || $MT export --checkpoint "$OUT/base" --trunk-only --out "$OUT/model"

[ -e "$OUT/distill.done" ] || {
  $MT distill --trunk "$OUT/model" --data stdlib --from-corpus 1024 --prompt-tokens 64 \
    --max-new-tokens 128 --batch-size 16 --out "$OUT/distill.jsonl"
  touch "$OUT/distill.done"
}

[ -e "$OUT/raw/latest" ] || $MT train --trunk "$OUT/model" "${HEADS[@]}" --data stdlib \
  --out "$OUT/raw"
[ -e "$OUT/distilled/latest" ] || $MT train --trunk "$OUT/model" "${HEADS[@]}" \
  --data "$OUT/distill.jsonl" --out "$OUT/distilled"

for run in raw distilled; do
  [ -e "$OUT/$run/bench.json" ] || $MT bench --checkpoint "$OUT/$run" "${BENCH[@]}" \
    --json "$OUT/$run/bench.json" --plot "$OUT/$run/bench.png"
done

[ -e "$OUT/heads/heads.json" ] || $MT export --checkpoint "$OUT/distilled" --heads-only \
  --out "$OUT/heads"
$MT generate --checkpoint "$OUT/model" --heads "$OUT/heads" \
  --prompt $'class Queue:\n    def __init__(self' --max-new-tokens 64

$PY benchmarks/summarize_reference.py "$OUT" raw="bpd D=3 heads only, raw stdlib text" \
  distilled="bpd D=3 heads only, self-distilled text"
