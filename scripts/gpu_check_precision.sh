#!/usr/bin/env bash
# A prepared run on a lent GPU machine (one device call of its own, ~2 minutes): issue 13's precision checks
# (scripts/gpu_check_precision.py: SDXL-size VAE decode under fp16 autocast through conjure's decode; what
# mixed_precision: auto picks on the card). Wheels the image lacks travel in .whl/. Results land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/machine.txt"
timeout 150 python3 scripts/gpu_check_precision.py --write "$OUT/precision.md" 2>&1 | tee "$OUT/precision.log"
