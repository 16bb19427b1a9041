#!/usr/bin/env bash
# The measurement of docs/algorithms/preference.md ("Wave 3: measured"): every wave-3 method beside
# Diffusion-DPO on the shapes world, at equal numbers of pairs (64 a epoch, 150 epochs), once with
# the pairs file of configs/dpo_shapes.yaml and once with fresh on-policy pairs of the base ranked by
# the verifier (`algorithm.source=reference`), then one evaluation of every run.
#
#   bash benchmarks/preference_wave3.sh [STEP]     # STEP: pairs | train | eval | all (default)
#
# Each training run is its own command under the shared CPU lock (/tmp/diffalign-cpu.lock), so
# other jobs are not starved; RUNS (default runs/w3) holds the run directories. Re-running skips
# runs whose final/ model exists.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/w3}
PY=${PY:-python}
LOCK=${LOCK:-/tmp/diffalign-cpu.lock}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
STEP=${1:-all}
locked() { flock "$LOCK" nice -n 10 "$@"; }

pairs() {
  [ -f runs/pairs/shapes-flow-train/pairs.jsonl ] || locked $PY -m diffalign make-pairs --model shapes-flow \
    --reward shapes --split train --n-prompts 768 --per-prompt 4 --mode all --seed 7 --out runs/pairs/shapes-flow-train
  if [ ! -f runs/pairs/ppd/pairs.jsonl ]; then  # two reward-defined annotators for ppd from a file
    locked $PY -m diffalign make-pairs --model shapes-flow --reward shapes --split train --n-prompts 384 \
      --per-prompt 4 --seed 7 --out runs/pairs/ppd-correct
    locked $PY -m diffalign make-pairs --model shapes-flow --reward brightness --split train --n-prompts 384 \
      --per-prompt 4 --seed 8 --out runs/pairs/ppd-bright
    $PY -c "from diffalign.data import load_pairs as L, write_jsonl_pairs as W; \
W(L('runs/pairs/ppd-correct') + L('runs/pairs/ppd-bright'), 'runs/pairs/ppd/pairs.jsonl')"
  fi
}

run() {  # run LABEL CONFIG [OVERRIDES...]
  local label=$1 config=$2
  shift 2
  [ -d "$RUNS/$label/final" ] && return
  locked $PY -m diffalign train "configs/$config.yaml" "$@" --run-dir "$RUNS/$label" \
    $( [ -f "$RUNS/$label/checkpoints/latest.pt" ] && echo --resume )
}

train() {
  local onpolicy=(algorithm.source=reference 'algorithm.data=""')
  for m in dpo sdpo inpo smpo inversion_dpo dense_reward_dpo dcpo balanced_dpo adaptive_dpo; do
    run "$m-file" "${m}_shapes"
    run "$m-onpolicy" "${m}_shapes" "${onpolicy[@]}"
  done
  run ranking_dpo-onpolicy ranking_dpo_shapes                       # lists of 4 ranked by the verifier
  run ranking_dpo-file ranking_dpo_shapes algorithm.source=file algorithm.data=runs/pairs/shapes-flow-train
  run ppd-onpolicy ppd_shapes
  run ppd-file ppd_file_shapes
  run self_npo self_npo_shapes                                       # no pairs: the base's own samples
  run ipr ipr_shapes                                                 # step-level pairs, on-policy
  run lpo lpo_shapes                                                 # LRM from the pairs file, then step pairs
}

evaluate() {
  local args=(--prompts 500 --seeds 2 --compare dpo-file --metrics shapes_soft,colorfulness
              --out "$RUNS/eval.json" --npo "self_npo=$RUNS/self_npo"
              --ppd "ppd-onpolicy=$RUNS/ppd-onpolicy:correct" --ppd "ppd-file=$RUNS/ppd-file:reward:shapes")
  for d in "$RUNS"/*/; do
    label=$(basename "$d")
    case $label in self_npo|ppd-*) ;; *) [ -d "$d/final" ] && args+=(--run "$label=$d") ;; esac
  done
  locked $PY benchmarks/bench_preference.py "${args[@]}"
}

case $STEP in
  pairs) pairs ;;
  train) train ;;
  eval) evaluate ;;
  all) pairs; train; evaluate ;;
  *) echo "usage: $0 [pairs|train|eval|all]" >&2; exit 2 ;;
esac
