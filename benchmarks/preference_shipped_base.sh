#!/usr/bin/env bash
# docs/algorithms/preference.md, "On the shipped layout-role base": a pairs file from the shipped shapes-flow
# (768 train-split prompts x 4 samples ranked by the verifier), then Diffusion-DPO and the four wave-3 methods
# that were level with or above it on the v2 base, each from its shipped config (settings tuned on the v2 base)
# at equal pairs (150 epochs x 64 = 9,600), two one-thread runs at a time; one held-out evaluation paired
# against Diffusion-DPO (400 prompts x 2 seeds, prompt seed 2024).
#
#   bash benchmarks/preference_shipped_base.sh [OUT]     # OUT: default runs/pref-shipped
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-runs/pref-shipped}" && cd "${1:-runs/pref-shipped}" && pwd)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
P=${PY:-$ROOT/.venv/bin/python}; C=$ROOT/configs; D=$OUT/pairs
cd "$OUT"
[ -f $D/pairs.jsonl ] || $P -m diffalign make-pairs --model shapes-flow --reward shapes --split train --n-prompts 768 --per-prompt 4 --mode all --seed 7 --out $D > pairs.log 2>&1
run(){ [ -d runs/$1/final ] || ($P -m diffalign train $C/$1_shapes.yaml algorithm.data=$D eval_every=0 --run-dir runs/$1 > logs_$1.txt 2>&1); }
(run dpo; run dense_reward_dpo; run inpo) &
(run adaptive_dpo; run smpo) &
wait
$P $ROOT/benchmarks/bench_preference.py --prompts 400 --seeds 2 --metrics shapes_soft,colorfulness --compare dpo --out eval.json \
  --run dpo=runs/dpo --run adaptive_dpo=runs/adaptive_dpo --run dense_reward_dpo=runs/dense_reward_dpo --run smpo=runs/smpo --run inpo=runs/inpo | tee eval.log
