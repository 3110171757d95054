#!/usr/bin/env bash
# The prepared FLUX.1 memory/speed run on a lent GPU machine (issue 15), one device call of ~3 minutes (run it with
# timeout_s 480): benchmarks/flux_memory.py on the tiny FLUX (all modes, a smoke test of the float8/nf4 paths in
# seconds), then on the full-size random-weight FLUX.1-dev transformer (LoRA rank 16, 1024 px, batch 1, gradient
# checkpointing, AdamW; base weights bf16, float8 and nf4). Results land in $OUT: machine.txt, flux-bench.md (the
# tables for docs/benchmarks.md), flux-bench.log.
#
# Wheels the GPU image lacks travel in .whl/ (ignored by git; name it in the call's carry). Fetch them here first,
# with PyPI reachable:  scripts/gpu_flux_bench.sh --wheels
# The image (2026-11) has Python 3.12 and torch 2.11.0+cu130, transformers 5.17, accelerate, peft, but no diffusers
# or pydantic. torchao 0.18 is the release built for torch 2.11 (its weight-only float8 is Python and runs without
# its C++ ops on another torch); bitsandbytes 0.50.2 ships CUDA 13.0/13.2 libraries (the others are cut from the
# wheel: the 9 wheels are 20 MB, the repository ~27 MB, under the 64 MiB a call carries; BNB_CUDA_VERSION=130
# points a CUDA 12 torch at the 13.0 one). Checked here (CPU, Python 3.11) with the image's transformers 5.17,
# accelerate 1.15 and huggingface_hub 1.33 beside these wheels: the tiny harness runs bf16, and float8 and nf4 with
# the CPU refusal (check_base_weights_dtype) bypassed.
# Estimated time (2026-12-05, measured here at reduced scale): the 11.9B-parameter transformer builds on the meta
# device in ~5 s; its bf16 master copy (23.8 GB of CPU RAM) is drawn on the GPU in seconds (on one CPU core it would
# take ~90 s: 4.2 s for a 546M-parameter 1+1-block slice); each mode moves it to the GPU (~5 s; float8/nf4 convert
# each layer on its way, ~10-20 s) and takes 8 steps of ~1-3 s: about 2-3 minutes in all, inside the 360 s given below.
set -o pipefail
WHEELS="torchao==0.18.0 bitsandbytes==0.50.2 diffusers==0.42.1 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
if [ "$1" = "--wheels" ]; then  # here, not on the GPU machine
  platforms=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms="$platforms --platform $p"
  done
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl $WHEELS || exit 1
  zip -q -d .whl/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_rocm*' \
    'bitsandbytes/libbitsandbytes_xpu*' 2>/dev/null
  du -sh .whl && exit 0
fi
python3 -c 'import torch; print(torch.__version__)' | tee "$OUT/machine.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
if ! python3 -c 'import sys, torch; sys.exit(not (torch.version.cuda or "").startswith("13"))'; then
  export BNB_CUDA_VERSION=130
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee -a "$OUT/machine.txt"
python3 -c "import torch, diffusers, transformers, peft, torchao, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'torchao', torchao.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tee -a "$OUT/machine.txt"
free -g | head -2 | tee -a "$OUT/machine.txt"
timeout 90 python3 benchmarks/flux_memory.py --size tiny --steps 4 --write "$OUT/flux-bench.md" 2>&1 | tee "$OUT/flux-bench.log"
timeout 360 python3 benchmarks/flux_memory.py --size full --steps 8 --write "$OUT/flux-bench.md" 2>&1 | tee -a "$OUT/flux-bench.log"
