#!/usr/bin/env bash
# The measurement of docs/algorithms/preference.md ("Wave 3: measured"): the wave-3 methods beside
# Diffusion-DPO on the shapes world, at equal numbers of pairs -- with the pairs file of
# configs/dpo_shapes.yaml (64 pairs an epoch, 150 epochs: 9,600 pairs) and with fresh on-policy pairs of
# the base ranked by the verifier (`algorithm.source=reference`; sampling dominates, ~17 s an epoch on
# one thread, so ONPOLICY_EPOCHS=25: 1,600 pairs) -- then one evaluation per setting, paired against
# Diffusion-DPO of the same setting.
#
#   bash benchmarks/preference_wave3.sh [STEP]     # STEP: pairs | train | eval | tune | noisy | all (default)
#   EXTRA=1 bash benchmarks/preference_wave3.sh train   # also the runs not in the measured table
#
# `tune` is how the shipped settings were chosen ("Tuned per method"): round 1, every file-pairs method
# and Diffusion-DPO itself at lr 3e-5 and 1e-5 (DPO also 1e-4; Dense-reward DPO and SmPO also 3e-6);
# round 2, beta (DPO's too) and each method's own knob at the round-1 rate; 9,600 pairs each, scored on
# 400 *training-split* prompts x 2 seeds (prompt seed 11), so the held-out prompts of `eval` play no
# part in the choice. `noisy` trains DPO (three settings) and the methods that bring their own judge of a
# pair on the pairs file with 25% of its labels flipped (benchmarks/flip_pairs.py; "Noisy labels").
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
  # Round 1: the learning rate, every method at the settings it first shipped with (pinned here, since the
  # configs now carry the chosen ones). Round 2: each method's own knob and beta (Diffusion-DPO's too), at
  # the round-1 rate. One train-split evaluation of all, paired against Diffusion-DPO at 3e-5.
  local -A first=([dpo]="" [sdpo]="algorithm.mu=0.9" [dense_reward_dpo]="" [dcpo]="algorithm.distractor=caption"
    [balanced_dpo]="algorithm.adaptive_temperature=0.1" [adaptive_dpo]="algorithm.gamma=2" [inpo]="" [smpo]=""
    [inversion_dpo]="")
  local grid=() args=()
  for m in dpo sdpo dense_reward_dpo dcpo balanced_dpo adaptive_dpo inpo smpo inversion_dpo; do
    grid+=("$m-lr3e-5 $m lr=3e-5 ${first[$m]}" "$m-lr1e-5 $m lr=1e-5 ${first[$m]}")
  done
  grid+=("dpo-lr1e-4 dpo lr=1e-4" "dense_reward_dpo-lr3e-6 dense_reward_dpo lr=3e-6" "smpo-lr3e-6 smpo lr=3e-6"
    "dpo-b500 dpo algorithm.beta=500" "dpo-b125 dpo algorithm.beta=125"
    "dense_reward_dpo-g0.7 dense_reward_dpo lr=1e-5 algorithm.gamma=0.7"
    "dense_reward_dpo-b500 dense_reward_dpo lr=1e-5 algorithm.beta=500"
    "dense_reward_dpo-b125 dense_reward_dpo lr=1e-5 algorithm.beta=125"
    "sdpo-mu0.5 sdpo lr=1e-5 algorithm.mu=0.5" "sdpo-mu0 sdpo lr=1e-5 algorithm.mu=0"
    "dcpo-hybrid dcpo lr=1e-5 algorithm.distractor=hybrid" "dcpo-perturb dcpo lr=1e-5 algorithm.distractor=perturb"
    "smpo-b125 smpo lr=1e-5 algorithm.beta=125" "smpo-b500 smpo lr=1e-5 algorithm.beta=500"
    "inpo-b125 inpo lr=1e-5 algorithm.beta=125" "inpo-b500 inpo lr=1e-5 algorithm.beta=500"
    "balanced_dpo-t1 balanced_dpo lr=3e-5 algorithm.adaptive_temperature=1"
    "balanced_dpo-b500 balanced_dpo lr=3e-5 algorithm.adaptive_temperature=0.1 algorithm.beta=500"
    "adaptive_dpo-g4 adaptive_dpo lr=3e-5 algorithm.gamma=4")
  for item in "${grid[@]}"; do
    set -- $item
    local label=$1 m=$2
    shift 2
    # beta 250 unless the item sets it (round 1 and the other round-2 knobs ran at Diffusion-DPO's beta)
    [[ " $* " == *" algorithm.beta="* ]] || set -- "$@" algorithm.beta=250
    run "$label" "${m}_shapes" "$@" eval_every=0
    args+=(--run "$label=$RUNS/$label")
  done
  locked $PY benchmarks/bench_preference.py --split train --prompts 400 --seeds 2 --prompt-seed 11 \
    --metrics shapes_soft,colorfulness --compare dpo-lr3e-5 --out "$RUNS/eval_tune_train.json" "${args[@]}"
}

noisy() {  # "Noisy labels": 25% of the pairs file's labels flipped; the methods' own judges are proxies only
  [ -f runs/pairs/shapes-flow-train/pairs_flip25.jsonl ] || $PY benchmarks/flip_pairs.py runs/pairs/shapes-flow-train \
    --fraction 0.25 --seed 0
  local d=algorithm.data=runs/pairs/shapes-flow-train/pairs_flip25.jsonl args=()
  run noisy-dpo-lr3e-5 dpo_shapes $d                       # Diffusion-DPO at three settings: the
  run noisy-dpo-lr1e-5 dpo_shapes $d lr=1e-5               # comparison is with the best of them
  run noisy-dpo-lr1e-5-b125 dpo_shapes $d lr=1e-5 algorithm.beta=125
  run noisy-adaptive_dpo adaptive_dpo_shapes $d
  run noisy-balanced_dpo balanced_dpo_shapes $d 'algorithm.metrics=[shapes_soft,colorfulness]'
  run noisy-smpo smpo_shapes $d reward=shapes_soft
  run noisy-dense_reward_dpo dense_reward_dpo_shapes $d
  run noisy-inpo inpo_shapes $d
  for m in dpo-lr3e-5 dpo-lr1e-5 dpo-lr1e-5-b125 adaptive_dpo balanced_dpo smpo dense_reward_dpo inpo; do
    args+=(--run "$m=$RUNS/noisy-$m")
  done
  locked $PY benchmarks/bench_preference.py --prompts 400 --seeds 2 --metrics shapes_soft,colorfulness \
    --compare dpo-lr1e-5-b125 --out "$RUNS/eval_noisy.json" "${args[@]}"
}

case $STEP in
  pairs) pairs ;;
  train) train ;;
  eval) evaluate ;;
  tune) pairs; tune ;;
  noisy) pairs; noisy ;;
  all) pairs; train; evaluate ;;
  *) echo "usage: $0 [pairs|train|eval|tune|noisy|all]" >&2; exit 2 ;;
esac
