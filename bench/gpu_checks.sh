#!/usr/bin/env bash
# The GPU checks, as one prepared run on a lent GPU machine (see the device notes in the README):
# bf16 and fp32 DiT steps next to diffusers, the released 8B DiT's train step and sampling, the miniature's
# train steps and generate latency, and 1-process NCCL runs of the engine under DDP and FSDP2 (bf16).
# Usage there: bash bench/gpu_checks.sh OUTDIR   (expects the packages in PYTHONPATH, the repo's src/ too)
set -u
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run() { echo; echo "### $*"; timeout 150 "$@" 2>&1 | grep -v "Writing model\|Loading weights"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
run python3 bench/dit_step.py --device cuda --dtype bfloat16 --batch 256
run python3 bench/dit_step.py --device cuda --dtype float32 --batch 256
run python3 bench/dit_released.py --device cuda --batch 64
run python3 bench/dit_released.py --device cuda --batch 256 --checkpointing --iters 5
run python3 bench/train_step.py --device cuda --precision bf16 --batch 64
for strategy in ddp fsdp; do
  run python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m blip3o.cli.train --no-progress --device cuda \
    --preset tiny-gen --out "$out/run_$strategy" distributed=$strategy precision=bf16 stages.generation.steps=20 \
    stages.generation.batch_size=64 stages.generation.log_every=5 stages.generation.ckpt_every=10
  tail -n 4 "$out/run_$strategy/generation/log.jsonl"
done
