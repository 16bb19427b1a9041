#!/usr/bin/env bash
# docs/algorithms/preference.md, "On the shipped layout-role base": a pairs file from the shipped shapes-flow
# (768 train-split prompts x 4 samples ranked by the verifier), then Diffusion-DPO and the four wave-3 methods
# that were level with or above it on the v2 base, each from its shipped config (settings tuned on the v2 base)
# at equal pairs (150 epochs x 64 = 9,600); one held-out evaluation paired against Diffusion-DPO (400 prompts
# x 2 seeds, prompt seed 2024). Runs go through benchmarks/_runs.sh (one at a time under the shared CPU lock,
# resumed from their checkpoints); the table's training seconds were measured with two runs at a time.
#
#   RUNS=runs/pref-shipped bash benchmarks/preference_shipped_base.sh
set -euo pipefail
RUNS=${RUNS:-runs/pref-shipped}
source "$(dirname "$0")/_runs.sh"
PAIRS=$RUNS/pairs
[ -f "$PAIRS/pairs.jsonl" ] || locked $PY -m diffalign make-pairs --model shapes-flow --reward shapes --split train \
  --n-prompts 768 --per-prompt 4 --mode all --seed 7 --out "$PAIRS"
args=()
for m in dpo adaptive_dpo dense_reward_dpo smpo inpo; do
  run "$m" "${m}_shapes" "algorithm.data=$PAIRS" eval_every=0
  args+=(--run "$m=$RUNS/$m")
done
locked $PY benchmarks/bench_preference.py --prompts 400 --seeds 2 --metrics shapes_soft,colorfulness --compare dpo \
  --out "$RUNS/eval.json" "${args[@]}"
