#!/usr/bin/env bash
# The design study's smoke run (issue 5): all four variants on a 5-minute budget each, with small measurement
# settings, so the whole pipeline (VAE stage, budgeted segments, measurements, report) runs end to end.
#
#     bash bench/study_smoke.sh              # writes out/study_smoke/{report.md,results.json,*.png}
#     bash bench/study_smoke.sh --shards runs/shapes/data   # reuse existing ShapesWorld shards
#
# Measured: 25 min 12 s on the idle 2-core CPU with --shards runs/study/data (2026-11-28): 4 x 5 min of
# training, a 3-minute VAE stage, 2 points per variant at 6-16 s each (without --shards add ~10 s of writing
# 4,000 shards). Re-running the command resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/blip3o study --budget-minutes 5 --out out/study_smoke \
    --points 2 --vae-minutes 3 --geneval-prompts 24 --images-per-prompt 1 --vqa-questions 100 \
    --diversity-prompts 2 --num-samples 4000 --no-progress "$@"
