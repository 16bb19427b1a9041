#!/usr/bin/env bash
# The measurement of docs/algorithms/preference.md ("Wave 3: measured"): the wave-3 methods beside
# Diffusion-DPO on the shapes world, at equal numbers of pairs -- with the pairs file of
# configs/dpo_shapes.yaml (64 pairs an epoch, 150 epochs: 9,600 pairs) and with fresh on-policy pairs of
# the base ranked by the verifier (`algorithm.source=reference`; sampling dominates, ~17 s an epoch on
# one thread, so ONPOLICY_EPOCHS=25: 1,600 pairs) -- then one evaluation per setting, paired against
# Diffusion-DPO of the same setting.
#
#   bash benchmarks/preference_wave3.sh [STEP]     # STEP: pairs | train | eval | tune | all (default)
#   EXTRA=1 bash benchmarks/preference_wave3.sh train   # also the runs not in the measured table
#
# `tune` is how the shipped learning rates were chosen ("Tuned per method"): every file-pairs method and
# Diffusion-DPO itself at lr 3e-5 and 1e-5 (DPO also 1e-4; Dense-reward DPO and SmPO also 3e-6), 9,600
# pairs each, scored on 400 *training-split* prompts x 2 seeds (prompt seed 11), so the held-out prompts
# of `eval` play no part in the choice.
#
# Each training run is its own command under the shared CPU lock (/tmp/diffalign-cpu.lock), so
# other jobs are not starved; RUNS (default runs/w3) holds the run directories. Re-running skips
# runs whose final/ model exists.
set -euo pipefail
RUNS=${RUNS:-runs/w3}
source "$(dirname "$0")/_runs.sh"
STEP=${1:-all}
ONPOLICY_EPOCHS=${ONPOLICY_EPOCHS:-25}
EXTRA=${EXTRA:-0}

pairs() {
  [ -f runs/pairs/shapes-flow-train/pairs.jsonl ] || locked $PY -m diffalign make-pairs --model shapes-flow \
    --reward shapes --split train --n-prompts 768 --per-prompt 4 --mode all --seed 7 --out runs/pairs/shapes-flow-train
  # two reward-defined annotators for PPD from a file: only the EXTRA runs read them
  if [ "$EXTRA" = 1 ] && [ ! -f runs/pairs/ppd/pairs.jsonl ]; then
    locked $PY -m diffalign make-pairs --model shapes-flow --reward shapes --split train --n-prompts 384 \
      --per-prompt 4 --seed 7 --out runs/pairs/ppd-correct
    locked $PY -m diffalign make-pairs --model shapes-flow --reward brightness --split train --n-prompts 384 \
      --per-prompt 4 --seed 8 --out runs/pairs/ppd-bright
    $PY -c "from diffalign.data import load_pairs as L, write_jsonl_pairs as W; \
W(L('runs/pairs/ppd-correct') + L('runs/pairs/ppd-bright'), 'runs/pairs/ppd/pairs.jsonl')"
  fi
}

train() {
  local onpolicy=(algorithm.source=reference 'algorithm.data=""' epochs=$ONPOLICY_EPOCHS)
  for m in dpo sdpo inpo smpo inversion_dpo dense_reward_dpo dcpo balanced_dpo adaptive_dpo; do
    run "$m-file" "${m}_shapes"
  done
  run ranking_dpo-file ranking_dpo_shapes algorithm.source=file algorithm.data=runs/pairs/shapes-flow-train
  for m in dpo sdpo balanced_dpo adaptive_dpo; do
    run "$m-onpolicy" "${m}_shapes" "${onpolicy[@]}"
  done
  run ranking_dpo-onpolicy ranking_dpo_shapes epochs=$ONPOLICY_EPOCHS  # lists of 4 ranked by the verifier
  [ "$EXTRA" = 1 ] || return 0
  for m in inpo dense_reward_dpo dcpo; do run "$m-onpolicy" "${m}_shapes" "${onpolicy[@]}"; done
  run ppd-onpolicy ppd_shapes
  run ppd-file ppd_file_shapes
  run self_npo self_npo_shapes                                       # no pairs: the base's own samples
  run ipr ipr_shapes                                                 # step-level pairs, on-policy
  run lpo lpo_shapes                                                 # LRM from the pairs file, then step pairs
}

evaluate() {  # one table per setting, each paired against its Diffusion-DPO run
  local common=(--prompts 400 --seeds 2 --metrics shapes_soft,colorfulness)
  for setting in file onpolicy; do
    local args=()
    for d in "$RUNS"/*-"$setting"/; do
      [ -d "$d/final" ] && args+=(--run "$(basename "$d")=$d")
    done
    locked $PY benchmarks/bench_preference.py "${common[@]}" --compare "dpo-$setting" \
      --out "$RUNS/eval_$setting.json" "${args[@]}"
  done
  [ "$EXTRA" = 1 ] || return 0
  local extra=(--compare dpo-file --run "dpo-file=$RUNS/dpo-file" --npo "self_npo=$RUNS/self_npo"
               --ppd "ppd-onpolicy=$RUNS/ppd-onpolicy:correct" --ppd "ppd-file=$RUNS/ppd-file:reward:shapes")
  for r in ipr lpo; do [ -d "$RUNS/$r/final" ] && extra+=(--run "$r=$RUNS/$r"); done
  locked $PY benchmarks/bench_preference.py "${common[@]}" "${extra[@]}" --out "$RUNS/eval_extra.json"
}

tune() {
  local grid=() args=()
  for m in dpo sdpo dense_reward_dpo dcpo balanced_dpo adaptive_dpo inpo smpo inversion_dpo; do
    grid+=("$m 3e-5" "$m 1e-5")
  done
  grid+=("dpo 1e-4" "dense_reward_dpo 3e-6" "smpo 3e-6")
  for item in "${grid[@]}"; do
    set -- $item
    run "$1-lr$2" "$1_shapes" lr=$2 eval_every=0
    args+=(--run "$1-lr$2=$RUNS/$1-lr$2")
  done
  locked $PY benchmarks/bench_preference.py --split train --prompts 400 --seeds 2 --prompt-seed 11 \
    --metrics shapes_soft,colorfulness --compare dpo-lr3e-5 --out "$RUNS/eval_tune_train.json" "${args[@]}"
}

case $STEP in
  pairs) pairs ;;
  train) train ;;
  eval) evaluate ;;
  tune) pairs; tune ;;
  all) pairs; train; evaluate ;;
  *) echo "usage: $0 [pairs|train|eval|tune|all]" >&2; exit 2 ;;
esac
