#!/usr/bin/env bash
# A prepared run on a lent GPU machine (one device call of its own, at most 10 minutes): the full fine-tune of the
# full-size SDXL architecture (random weights) at 1024 px, batch 1, bf16, with AdamW, 8-bit AdamW and Adafactor,
# with and without gradient checkpointing, an EMA on the CPU: peak GPU memory and step time (issue 18). Wheels the
# image lacks travel in .whl/ (bitsandbytes for adamw8bit). Results land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
timeout 540 python3 benchmarks/train_speed.py --size full --families sdxl --methods finetune \
  --optimizers adafactor,adamw8bit,adamw --precisions bf16 --batch 1 --steps 12 --write "$OUT/bench-finetune.md" \
  --workdir /tmp/bench 2>&1 | grep -v "step/s" | tee "$OUT/bench-finetune.log"
