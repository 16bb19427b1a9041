#!/usr/bin/env bash
# The paired check of docs/algorithms/step_credit.md ("Paired check at the crossing"): Flow-GRPO trained to
# its best point of the long comparison (2880 images) against DenseGRPO with the Tweedie estimate at 640
# images and TP-GRPO at 1280, for training seeds 0 and 1, then all against the base on the same 400
# held-out prompts x 2 seeds (paired differences with their standard errors).
#
#   bash benchmarks/step_credit_crossing.sh            # RUNS (default runs/crossing) holds the run directories
#
# One thread per run under the shared CPU lock (/tmp/diffalign-cpu.lock); re-running skips finished runs.
set -euo pipefail
RUNS=${RUNS:-runs/crossing}
source "$(dirname "$0")/_runs.sh"
common=(eval_every=0 'heldout_rewards=[]' algorithm.guidance_scale=4.5)

for seed in 0 1; do  # 64 images an epoch
  run "fg2880-s$seed" flow_grpo_shapes epochs=45 seed=$seed "${common[@]}"
  run "dgt640-s$seed" dense_grpo_tweedie_shapes epochs=10 seed=$seed "${common[@]}"
done
run tp1280-s0 tp_grpo_shapes epochs=20 seed=0 "${common[@]}"

ev=(--prompts 400 --seeds 2 --metrics shapes_soft,colorfulness)
locked $PY benchmarks/bench_preference.py "${ev[@]}" --compare fg2880-s0 --out "$RUNS/eval_s0.json" \
  --run fg2880-s0="$RUNS/fg2880-s0" --run dgt640-s0="$RUNS/dgt640-s0" --run tp1280-s0="$RUNS/tp1280-s0"
locked $PY benchmarks/bench_preference.py "${ev[@]}" --compare fg2880-s1 --out "$RUNS/eval_s1.json" \
  --run fg2880-s1="$RUNS/fg2880-s1" --run dgt640-s1="$RUNS/dgt640-s1" \
  --run fg2880-s0="$RUNS/fg2880-s0" --run dgt640-s0="$RUNS/dgt640-s0"
