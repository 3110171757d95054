#!/usr/bin/env bash
# The prepared GPU calibration of `conjure estimate` (issue 16), one device call of ~4-6 minutes (timeout_s 540):
# writes the full-size random-weight SD 1.5 model (models/reference.py; 1.1B parameters, 4.3 GB as float32
# safetensors, ~40 s) and, for a few settings, runs a real 2-step `conjure train` on the GPU and compares its
# torch.cuda.max_memory_allocated (read in the run's process at exit) with `conjure estimate --json`
# (benchmarks/estimate_accuracy.py --gpu): LoRA and TI at 512 px batch 1, LoRA at 512 px batch 2 with gradient
# checkpointing. NOT RUN YET (no GPU was lent while it was written); the tiny-model harness it drives was checked here
# on the CPU. Wheels: the same .whl/ as scripts/gpu_flux_bench.sh (fetch them with `scripts/gpu_flux_bench.sh
# --wheels`, carry .whl). Results land in $OUT: estimate-check.md (the table for docs/benchmarks.md) and its log.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
python3 - <<'PY' 2>&1 | tee "$OUT/estimate-check.log" || exit 1
from pathlib import Path
from conjure.models.reference import build_reference_components
from conjure.models.tiny import save_model_folder
save_model_folder("sd1", build_reference_components("sd1", device="cuda"), Path("/tmp/sd15-random"))
PY
run() { timeout 170 python3 benchmarks/estimate_accuracy.py --gpu --model /tmp/sd15-random --steps 2 --write "$OUT/estimate-check.md" "$@" 2>&1 | tee -a "$OUT/estimate-check.log"; }
run --only lora:sd1 --only textual_inversion:sd1 --resolution 512 --batch 1
run --only lora:sd1 --resolution 512 --batch 2 --gradient-checkpointing
