#!/usr/bin/env bash
# A prepared run on a lent GPU machine (one device call, at most 10 minutes): FLUX.1-dev LoRA rank 16 at 1024 px,
# batch 1, gradient checkpointing, random full-size weights: peak memory and steps/s with
# advanced.base_weights_dtype auto (bf16), float8 and nf4 (benchmarks/flux_memory.py). Wheels the image lacks travel
# in .whl/: torchao and bitsandbytes for float8 and nf4, e.g.
#   pip download --no-deps -d .whl torchao==0.18.0 bitsandbytes
# The host needs ~50 GB of RAM (the bf16 transformer and one copy); the GPU ~30 GB for bf16. Results land in $OUT.
set -o pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
timeout 540 python3 benchmarks/flux_memory.py --size full --write "$OUT/bench-flux.md" 2>&1 | tee "$OUT/bench-flux.log"
