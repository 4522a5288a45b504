#!/usr/bin/env bash
# Oracle-harness arms over several seeds at once on one lent GPU (bench/oracle_tokens.py --device cuda). Why: the
# arms turn on whether the lookup by shape arrives within 4,000 steps (a jump, 0.47 -> 0.97 count of a shape in
# one arm, never in others; docs/bench/understanding_position_trials.txt), how much that varies with the seed has
# never been measured, and on this CPU one arm takes ~45 min.
# Usage there: bash bench/gpu_oracle_arms.sh BACKBONE OUTDIR SECONDS SEEDS -- ORACLE_TOKENS_FLAGS...
#   e.g. bash bench/gpu_oracle_arms.sh .gpu/backbone $OUT 420 "0 1 2 3" -- --relation-truth --relation-steps
# BACKBONE: a backbone folder with a fresh language model (a clip- or vision-stage export's backbone/), carried.
# Writes the run's 20,000 ShapesWorld samples (seed 0, the recipe's) to /tmp/data first; every arm is stopped at
# SECONDS, so intermediate evaluations (every 500 steps, 700 questions) come back even if 4,000 steps do not fit.
# DEVICE, SAMPLES, STEPS, EVAL_EVERY (environment) change those for a smoke run here: DEVICE=cpu SAMPLES=200 ...
set -u
backbone=$1 out=$2 seconds=$3 seeds=$4
shift 4; [ "${1:-}" = "--" ] && shift
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
python3 -c "from blip3o.data.shards import write_shards; write_shards('/tmp/data', n=${SAMPLES:-20000}, seed=0, progress=False)"
for seed in $seeds; do
  timeout "$seconds" python3 bench/oracle_tokens.py "$backbone" /tmp/data --out "/tmp/arm_$seed" --device "${DEVICE:-cuda}" \
    --steps "${STEPS:-4000}" --qa-turns 8 --eval-every "${EVAL_EVERY:-500}" --threads 2 --seed "$seed" "$@" > "$out/arm_$seed.txt" 2>&1 &
done
wait
grep -H "step" "$out"/arm_*.txt
