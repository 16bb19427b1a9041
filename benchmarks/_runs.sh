# Shared by the benchmark shell scripts (sourced, not run): one-thread training runs under the shared CPU
# lock, so other jobs are not starved, each skipped once its final/ model exists and resumed from its
# latest checkpoint otherwise. The sourcing script sets RUNS (where the run directories go) first;
# sourcing moves it to the repository root, where configs/ and relative RUNS paths resolve.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python}
LOCK=${LOCK:-/tmp/diffalign-cpu.lock}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
locked() { flock "$LOCK" nice -n 10 "$@"; }

run() {  # run LABEL CONFIG [OVERRIDES...]: configs/CONFIG.yaml trained into $RUNS/LABEL
  local label=$1 config=$2
  shift 2
  [ -d "$RUNS/$label/final" ] && return
  locked $PY -m diffalign train "configs/$config.yaml" "$@" --run-dir "$RUNS/$label" \
    $( [ -f "$RUNS/$label/checkpoints/latest.pt" ] && echo --resume )
}
