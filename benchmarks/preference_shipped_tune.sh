#!/usr/bin/env bash
# docs/algorithms/preference.md, "Re-tuned on the shipped base": Diffusion-DPO and the wave-3 methods re-tuned on the
# shipped layout-role shapes-flow, from the pairs file of preference_shipped_base.sh (same RUNS: its pairs and its
# runs at the v2 settings are reused), at equal pairs (150 epochs x 64 = 9,600). The settings are chosen on
# training-split prompts (400 x 2 seeds, prompt seed 11), then every run is scored on the held-out prompts of
# preference_shipped_base.sh (400 x 2 seeds, prompt seed 2024), paired against Diffusion-DPO as shipped.
#
# Round 2 (ROUND=2) trains every method at t_min 0.6, the window round 1 found for Diffusion-DPO, and compares
# with Diffusion-DPO there (dpo-t06 of round 1); round 3 moves the two methods that passed it to t_min 0.8, where
# round 2 put Diffusion-DPO's best, and compares with Diffusion-DPO at 0.8; round 4 runs BalancedDPO, DCPO, SDPO and
# Inversion-DPO at the window, compared with Diffusion-DPO at 0.8; round 5 trains on on-policy pairs (25 epochs of 64
# prompts x 4 base samples, 1,600 pairs) at the window, compared with Diffusion-DPO on-policy at 0.8; round 6 trains
# IPR on step pairs at the window (its candidates ranked on their predicted x0, or on their ODE continuation's
# reward), about 1,600 step pairs a run, compared with Diffusion-DPO on-policy at 0.8; round 7 trains BalancedDPO at
# the window with the verifier's weight raised above its two proxies', compared with Diffusion-DPO at 0.8; round 8
# trains PPD on the pairs file at the window (one annotator, the verifier, is its one user) and samples as that user;
# round 9 trains SmPO and InPO at t_min 0.8; rounds 10 and 11 repeat the two winners and Diffusion-DPO at training seeds 1 and 2;
# round 12 trains Self-NPO's data-free negative for the base and for Diffusion-DPO at t_min 0.8 (the issue's last image
# method not yet measured), each scored as that model guided by its negative; round 13 is the control of Dense-reward
# DPO's gain: Diffusion-DPO at t_min 0.8 with the beta that its discount gives on average (250 x 0.81 = 200), beta 125,
# and at t_min 0.9; round 14 goes on down Diffusion-DPO's beta (125, the best of round 13, at training seeds 1 and 2;
# 80; 50), trains Dense-reward DPO at the beta whose average discounted value is 125, and Self-NPO's negative for
# Diffusion-DPO at beta 125, at each of the three training seeds; round 15 trains Self-NPO's negative for Diffusion-DPO
# at beta 250 at training seeds 1 and 2, and again for beta 125 seed 2 with the negative's own training seed 1; round 16
# trains Adaptive-DPO at Diffusion-DPO's new beta, at both windows; round 17 trains the other pairs-file methods at
# Diffusion-DPO's best setting (t_min 0.8, lr 3e-5, beta 125), each with the method's own choices of round 4-9 kept;
# round 18 tries the other side for those that fell at it: beta 125 at their own rate 1e-5 (Inversion-DPO, DCPO),
# beta 250 at 1e-5 (SmPO, InPO, whose beta was 125 already), and SDPO's safeguard between off (mu 0.5) and 0.9;
# round 19 repeats round 5's on-policy pair of Diffusion-DPO and Plackett-Luce ranking DPO at beta 125.
# ROUND=summary (file pairs) and ROUND=summary-op (on-policy) train nothing: after rounds 1-19 they score each
# method's train-split choice in one evaluation, the table of docs/algorithms/preference.md, "Summary".
#
#   RUNS=runs/pref-shipped [ROUND=2] bash benchmarks/preference_shipped_tune.sh [train|select|heldout|all]
#   LANES=2 LANE=0|1 ... train    # two one-thread lanes (each its own lock), every other run
set -euo pipefail
RUNS=${RUNS:-runs/pref-shipped}
LANES=${LANES:-1}
LANE=${LANE:-0}
[ "$LANES" -gt 1 ] && LOCK=${LOCK:-/tmp/diffalign-cpu.lock.$LANE}
source "$(dirname "$0")/_runs.sh"
PAIRS=$RUNS/pairs
PPD_USER=reward:shapes  # PPD on the pairs file: its one annotator, the verifier, is the user its rows are sampled as
# label config overrides...
RUNS_LIST=(
  "dpo-t06 dpo_shapes algorithm.t_min=0.6"
  "dpo-lr1e-5 dpo_shapes lr=1e-5"
  "dpo-lr6e-5 dpo_shapes lr=6e-5"
  "dense-lr3e-5-b250 dense_reward_dpo_shapes lr=3e-5 algorithm.beta=250"
  "dense-lr3e-5-b500-g08 dense_reward_dpo_shapes lr=3e-5 algorithm.beta=500 algorithm.gamma=0.8"
  "smpo-lr3e-5-b250 smpo_shapes lr=3e-5 algorithm.beta=250"
  "inpo-lr3e-5-b250 inpo_shapes lr=3e-5 algorithm.beta=250"
  "adaptive-g2 adaptive_dpo_shapes algorithm.gamma=2"
)
SHIPPED=(dpo adaptive_dpo dense_reward_dpo smpo inpo)  # runs evaluated beside: preference_shipped_base.sh's (v2 settings)
COMPARE=dpo
if [ "${ROUND:-1}" = 2 ]; then  # the longest runs first, one in each lane
  RUNS_LIST=(
    "smpo-t06 smpo_shapes algorithm.t_min=0.6"
    "inpo-t06 inpo_shapes algorithm.t_min=0.6"
    "dense-t06-lr3e-5-b250-g08 dense_reward_dpo_shapes algorithm.t_min=0.6 lr=3e-5 algorithm.beta=250 algorithm.gamma=0.8"
    "adaptive-t06 adaptive_dpo_shapes algorithm.t_min=0.6"
    "dpo-t08 dpo_shapes algorithm.t_min=0.8"
    "sdpo-t06-lr3e-5 sdpo_shapes algorithm.t_min=0.6 lr=3e-5"
    "dpo-t06-lr6e-5 dpo_shapes algorithm.t_min=0.6 lr=6e-5"
    "dense-g07-b750 dense_reward_dpo_shapes lr=3e-5 algorithm.beta=750 algorithm.gamma=0.7"  # U(0, 1), steep discount
  )
  SHIPPED=(dpo dpo-t06)
  COMPARE=dpo-t06
fi
if [ "${ROUND:-1}" = 3 ]; then  # Diffusion-DPO's train-split choice is t_min 0.8: the two methods above it at 0.6, there
  RUNS_LIST=(
    "adaptive-t08 adaptive_dpo_shapes algorithm.t_min=0.8"
    "dense-t08-lr3e-5-b250-g08 dense_reward_dpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=250 algorithm.gamma=0.8"
  )
  SHIPPED=(dpo dpo-t06 dpo-t08 adaptive-t06 dense-t06-lr3e-5-b250-g08)
  COMPARE=dpo-t08
fi
if [ "${ROUND:-1}" = 4 ]; then  # the file-pair methods not yet run at the window, beside Diffusion-DPO at t_min 0.8
  RUNS_LIST=(
    "inversion-t08 inversion_dpo_shapes algorithm.t_min=0.8"
    "inversion-t08-lr3e-5 inversion_dpo_shapes algorithm.t_min=0.8 lr=3e-5"
    "balanced-t06 balanced_dpo_shapes algorithm.t_min=0.6"
    "balanced-t08 balanced_dpo_shapes algorithm.t_min=0.8"
    "dcpo-t08 dcpo_shapes algorithm.t_min=0.8"
    "dcpo-t08-lr3e-5 dcpo_shapes algorithm.t_min=0.8 lr=3e-5"
    "sdpo-t08-lr3e-5 sdpo_shapes algorithm.t_min=0.8 lr=3e-5"
    "sdpo-t08-lr3e-5-mu05 sdpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.mu=0.5"
  )
  SHIPPED=(dpo dpo-t08 adaptive-t06 dense-t08-lr3e-5-b250-g08)
  COMPARE=dpo-t08
fi
if [ "${ROUND:-1}" = 5 ]; then  # on-policy pairs (the base's 4 samples of a prompt ranked by the verifier) at the window
  RUNS_LIST=(
    "dpo-op-t08 dpo_shapes algorithm.source=reference algorithm.data=\"\" epochs=25 algorithm.t_min=0.8"
    "ranking-op-t08 ranking_dpo_shapes algorithm.data=\"\" epochs=25 algorithm.t_min=0.8"
    "adaptive-op-t06 adaptive_dpo_shapes algorithm.source=reference algorithm.data=\"\" epochs=25 algorithm.t_min=0.6"
    "dense-op-t08 dense_reward_dpo_shapes algorithm.source=reference algorithm.data=\"\" epochs=25 algorithm.t_min=0.8 lr=3e-5 algorithm.beta=250 algorithm.gamma=0.8"
  )
  SHIPPED=(dpo-t08)
  COMPARE=dpo-op-t08
fi
DATA_ARG="algorithm.data=$PAIRS"
if [ "${ROUND:-1}" = 6 ]; then  # IPR at the window: step pairs of the policy's own trajectories, 64 prompts an epoch
  IPR="ipr_shapes algorithm.prompts_per_epoch=64 algorithm.steps_per_epoch=2 algorithm.guidance_scale=5"
  RUNS_LIST=(
    "ipr-ro-t08 $IPR algorithm.step_score=rollout algorithm.step_reward=\"\" algorithm.t_min=0.8 epochs=28"
    "ipr-ro-t06 $IPR algorithm.step_score=rollout algorithm.step_reward=\"\" algorithm.t_min=0.6 epochs=22"
    "ipr-x0-t08 $IPR algorithm.t_min=0.8 epochs=9"
    "ipr-ro-t08-lr2e-4 $IPR algorithm.step_score=rollout algorithm.step_reward=\"\" algorithm.t_min=0.8 epochs=28 lr=2e-4"
    "ipr-ro-t08-lr1e-4 $IPR algorithm.step_score=rollout algorithm.step_reward=\"\" algorithm.t_min=0.8 epochs=28 lr=1e-4"
  )
  SHIPPED=(dpo-t08 dpo-op-t08 dense-op-t08 adaptive-op-t06)
  COMPARE=dpo-op-t08
  DATA_ARG=""
fi
if [ "${ROUND:-1}" = 7 ]; then  # BalancedDPO with the verifier weighted above its two proxies (file pairs, the window)
  RUNS_LIST=(
    "balanced-t08-w2 balanced_dpo_shapes algorithm.t_min=0.8 algorithm.metric_weights=[2,1,1]"
    "balanced-t06-w2 balanced_dpo_shapes algorithm.t_min=0.6 algorithm.metric_weights=[2,1,1]"
    "balanced-t08-w3 balanced_dpo_shapes algorithm.t_min=0.8 algorithm.metric_weights=[3,1,1]"
    "balanced-t06-w3 balanced_dpo_shapes algorithm.t_min=0.6 algorithm.metric_weights=[3,1,1]"
  )
  SHIPPED=(dpo dpo-t06 dpo-t08 adaptive-t06 dense-t08-lr3e-5-b250-g08 balanced-t06 balanced-t08)
  COMPARE=dpo-t08
fi
if [ "${ROUND:-1}" = 8 ]; then  # PPD on the pairs file
  RUNS_LIST=(
    "ppd-t08 ppd_file_shapes algorithm.t_min=0.8"
    "ppd-t06 ppd_file_shapes algorithm.t_min=0.6"
  )
  SHIPPED=(dpo-t06 dpo-t08)
  COMPARE=dpo-t08
fi
if [ "${ROUND:-1}" = 9 ]; then  # SmPO and InPO at Diffusion-DPO's window (round 2 ran them at 0.6 only)
  RUNS_LIST=(
    "smpo-t08 smpo_shapes algorithm.t_min=0.8"
    "inpo-t08 inpo_shapes algorithm.t_min=0.8"
  )
  SHIPPED=(dpo-t06 dpo-t08 smpo-t06 inpo-t06)
  COMPARE=dpo-t08
fi
if [ "${ROUND:-1}" = 10 ]; then  # the two winners and Diffusion-DPO again, training seed 1 (pair order, t and noise)
  RUNS_LIST=(
    "dpo-t08-s1 dpo_shapes algorithm.t_min=0.8 seed=1"
    "adaptive-t06-s1 adaptive_dpo_shapes algorithm.t_min=0.6 seed=1"
    "dense-t08-s1 dense_reward_dpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=250 algorithm.gamma=0.8 seed=1"
  )
  SHIPPED=(dpo-t08 adaptive-t06 dense-t08-lr3e-5-b250-g08)
  COMPARE=dpo-t08-s1
fi
if [ "${ROUND:-1}" = 11 ]; then  # and at training seed 2
  RUNS_LIST=(
    "dpo-t08-s2 dpo_shapes algorithm.t_min=0.8 seed=2"
    "adaptive-t06-s2 adaptive_dpo_shapes algorithm.t_min=0.6 seed=2"
    "dense-t08-s2 dense_reward_dpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=250 algorithm.gamma=0.8 seed=2"
  )
  SHIPPED=()
  COMPARE=dpo-t08-s2
fi
if [ "${ROUND:-1}" = 12 ]; then  # Self-NPO: no pairs; a negative for the base and one for Diffusion-DPO at t_min 0.8
  RUNS_LIST=(
    "selfnpo-base self_npo_shapes"
    "selfnpo-dpo-t08 self_npo_shapes model=$RUNS/dpo-t08/final"
  )
  SHIPPED=(dpo-t08)
  COMPARE=dpo-t08
fi
if [ "${ROUND:-1}" = 13 ]; then  # Dense-reward DPO's discount averages 0.81 over U[0.8, 1]: is its gain a lower beta?
  RUNS_LIST=(
    "dpo-t08-b200 dpo_shapes algorithm.t_min=0.8 algorithm.beta=200"
    "dpo-t08-b125 dpo_shapes algorithm.t_min=0.8 algorithm.beta=125"
    "dpo-t09 dpo_shapes algorithm.t_min=0.9"
    "dpo-t08-b400 dpo_shapes algorithm.t_min=0.8 algorithm.beta=400"
  )
  SHIPPED=(dpo-t08 dense-t08-lr3e-5-b250-g08)
  COMPARE=dpo-t08
fi
if [ "${ROUND:-1}" = 14 ]; then  # Diffusion-DPO's beta at the window, and Self-NPO on its best; LANES=2 alternate:
  # lane 0 takes the 1st, 3rd, ... entry, so each Self-NPO run comes after the Diffusion-DPO run it starts from
  RUNS_LIST=(
    "selfnpo-dpo-t08-b125 self_npo_shapes model=$RUNS/dpo-t08-b125/final"
    "dpo-t08-b125-s1 dpo_shapes algorithm.t_min=0.8 algorithm.beta=125 seed=1"
    "selfnpo-dpo-t08-b125-s1 self_npo_shapes model=$RUNS/dpo-t08-b125-s1/final"
    "dpo-t08-b125-s2 dpo_shapes algorithm.t_min=0.8 algorithm.beta=125 seed=2"
    "dpo-t08-b80 dpo_shapes algorithm.t_min=0.8 algorithm.beta=80"
    "dpo-t08-b50 dpo_shapes algorithm.t_min=0.8 algorithm.beta=50"
    "dense-t08-b155-g08 dense_reward_dpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=155 algorithm.gamma=0.8"
    "selfnpo-dpo-t08-b125-s2 self_npo_shapes model=$RUNS/dpo-t08-b125-s2/final"
  )
  SHIPPED=(dpo-t08 dpo-t08-b125 dense-t08-lr3e-5-b250-g08)
  COMPARE=dpo-t08-b125
fi
if [ "${ROUND:-1}" = 15 ]; then  # Self-NPO at more seeds: of Diffusion-DPO (beta 250) and of the negative itself
  RUNS_LIST=(
    "selfnpo-dpo-t08-s1 self_npo_shapes model=$RUNS/dpo-t08-s1/final"
    "selfnpo-dpo-t08-s2 self_npo_shapes model=$RUNS/dpo-t08-s2/final"
    "selfnpo-dpo-t08-b125-s2-n1 self_npo_shapes model=$RUNS/dpo-t08-b125-s2/final seed=1"
  )
  SHIPPED=(dpo-t08 dpo-t08-s1 dpo-t08-s2 dpo-t08-b125-s2)
  COMPARE=dpo-t08
fi
if [ "${ROUND:-1}" = 16 ]; then  # Adaptive-DPO at beta 125, against Diffusion-DPO at its best (beta 125, t_min 0.8)
  RUNS_LIST=(
    "adaptive-t08-b125 adaptive_dpo_shapes algorithm.t_min=0.8 algorithm.beta=125"
    "adaptive-t06-b125 adaptive_dpo_shapes algorithm.t_min=0.6 algorithm.beta=125"
  )
  SHIPPED=(dpo-t08-b125 adaptive-t06)
  COMPARE=dpo-t08-b125
fi
if [ "${ROUND:-1}" = 17 ]; then  # the rest at Diffusion-DPO's best (t_min 0.8, lr 3e-5, beta 125); LANES=2 alternate,
  # the longest runs first: lane 0 takes the 1st, 3rd, ... entry
  RUNS_LIST=(
    "inversion-t08-b125 inversion_dpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=125"
    "smpo-t08-lr3e-5 smpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=125"
    "sdpo-t08-b125 sdpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=125"
    "inpo-t08-lr3e-5 inpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=125"
    "balanced-t08-w3-b125 balanced_dpo_shapes algorithm.t_min=0.8 algorithm.metric_weights=[3,1,1] algorithm.beta=125"
    "dcpo-t08-b125 dcpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=125"
    "ppd-t08-b125 ppd_file_shapes algorithm.t_min=0.8 algorithm.beta=125"
  )
  SHIPPED=(dpo-t08-b125)
  COMPARE=dpo-t08-b125
fi
if [ "${ROUND:-1}" = 18 ]; then  # the other side for the round-17 runs that fell; LANES=2 alternate, longest first
  RUNS_LIST=(
    "inversion-t08-lr1e-5-b125 inversion_dpo_shapes algorithm.t_min=0.8 algorithm.beta=125"
    "smpo-t08-b250 smpo_shapes algorithm.t_min=0.8 algorithm.beta=250"
    "inpo-t08-b250 inpo_shapes algorithm.t_min=0.8 algorithm.beta=250"
    "sdpo-t08-b125-mu07 sdpo_shapes algorithm.t_min=0.8 lr=3e-5 algorithm.beta=125 algorithm.mu=0.7"
    "dcpo-t08-lr1e-5-b125 dcpo_shapes algorithm.t_min=0.8 algorithm.beta=125"
  )
  SHIPPED=(dpo-t08-b125)
  COMPARE=dpo-t08-b125
fi
if [ "${ROUND:-1}" = 19 ]; then  # on-policy (round 5) at Diffusion-DPO's best beta: Diffusion-DPO and ranking DPO
  RUNS_LIST=(
    "dpo-op-t08-b125 dpo_shapes algorithm.source=reference algorithm.data=\"\" epochs=25 algorithm.t_min=0.8 algorithm.beta=125"
    "ranking-op-t08-b125 ranking_dpo_shapes algorithm.data=\"\" epochs=25 algorithm.t_min=0.8 algorithm.beta=125"
  )
  SHIPPED=(dpo-op-t08 ranking-op-t08)
  COMPARE=dpo-op-t08-b125
fi
if [ "${ROUND:-1}" = summary ]; then  # after rounds 1-19, nothing to train: each method at its train-split choice
  # (the highest train-split accuracy among its training-seed-0 runs on the pairs file), in one evaluation
  RUNS_LIST=()
  SHIPPED=(dpo-t08-b125 dense-t08-b155-g08 adaptive-t06 sdpo-t08-b125-mu07 balanced-t08-w3-b125 ppd-t08-b125
           smpo-t08-lr3e-5 inpo-t08-b250 inversion-t08-lr3e-5 dcpo-t08 selfnpo-dpo-t08-b125)
  COMPARE=dpo-t08-b125
fi
if [ "${ROUND:-1}" = summary-op ]; then  # the same for the on-policy runs (rounds 5, 6, 19; 1,600 pairs)
  RUNS_LIST=()
  SHIPPED=(dpo-op-t08-b125 ranking-op-t08-b125 dense-op-t08 adaptive-op-t06 ipr-ro-t06)
  COMPARE=dpo-op-t08-b125
fi
OUT=$RUNS/eval_tune${ROUND:-1}

train() {
  [ -f "$PAIRS/pairs.jsonl" ] || locked $PY -m diffalign make-pairs --model shapes-flow --reward shapes --split train \
    --n-prompts 768 --per-prompt 4 --mode all --seed 7 --out "$PAIRS"
  local i=0
  for spec in "${RUNS_LIST[@]}"; do
    read -r label config overrides <<< "$spec"
    if [ $((i % LANES)) -eq "$LANE" ]; then
      local data=$DATA_ARG
      [ "$config" = self_npo_shapes ] && data=""  # Self-NPO learns from the model's own samples
      # shellcheck disable=SC2086
      run "$label" "$config" $data eval_every=0 $overrides
    fi
    i=$((i + 1))
  done
}

method_of() { sed -n 's/^method: *//p' "$RUNS/$1/config.yaml" 2>/dev/null; }

runs_args() {  # each run scored as its method needs: PPD as its user, Self-NPO guided by its negative
  args=()
  local labels=("${SHIPPED[@]}") label
  for spec in "${RUNS_LIST[@]}"; do read -r label _ <<< "$spec"; labels+=("$label"); done
  for label in "${labels[@]}"; do
    case "$(method_of "$label")" in
      ppd) args+=(--ppd "$label=$RUNS/$label:$PPD_USER") ;;
      self_npo) args+=(--npo "$label=$RUNS/$label") ;;
      *) args+=(--run "$label=$RUNS/$label") ;;
    esac
  done
}

select_() {  # the choice: training-split prompts only
  runs_args
  locked $PY benchmarks/bench_preference.py --split train --prompts 400 --seeds 2 --prompt-seed 11 \
    --metrics shapes_soft,colorfulness --compare "$COMPARE" --out "${OUT}_train.json" "${args[@]}"
}

heldout() {
  runs_args
  locked $PY benchmarks/bench_preference.py --prompts 400 --seeds 2 --metrics shapes_soft,colorfulness \
    --compare "$COMPARE" --out "${OUT}_heldout.json" "${args[@]}"
}

case "${1:-all}" in
  train) train ;;
  select) select_ ;;
  heldout) heldout ;;
  all) train; select_; heldout ;;
  *) echo "usage: $0 [train|select|heldout|all]" >&2; exit 2 ;;
esac
