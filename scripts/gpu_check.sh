#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool): wheels the image lacks travel in .whl/.
# Results land in $OUT: tiny-model CUDA checks, the full-size benchmark table, and the test suite on CUDA.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, diffusers, transformers, accelerate, pydantic; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/machine.txt"
timeout 120 python3 scripts/gpu_check.py 2>&1 | grep -v "step/s" | tee "$OUT/tiny.log"
timeout 250 python3 benchmarks/train_speed.py --size full --families sd1,sd2 --methods ti --steps 25 --write "$OUT/bench.md" --workdir /tmp/bench 2>&1 | grep -v "step/s" | tee "$OUT/bench.log"
timeout 90 python3 -m pytest tests -q -m "not slow" -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/pytest.log"
