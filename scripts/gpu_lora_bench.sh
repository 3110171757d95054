#!/usr/bin/env bash
# The second prepared run on a lent GPU machine (one device call of its own, after scripts/gpu_check.sh: a call may
# take at most 10 minutes): LoRA / DoRA / pivotal tuning speed and memory on the full-size SD 1.5 architecture with
# AdamW and 8-bit AdamW, in bf16, with and without gradient checkpointing. Wheels the image lacks travel in .whl/
# (bitsandbytes included for adamw8bit). Results land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
timeout 420 python3 benchmarks/train_speed.py --size full --families sd1 --methods lora,dora,pivotal \
  --optimizers adamw,adamw8bit --precisions bf16 --steps 20 --write "$OUT/bench-lora.md" --workdir /tmp/bench 2>&1 \
  | grep -v "step/s" | tee "$OUT/bench-lora.log"
