"""Two processes (gloo, CPU) under torchrun: distributed training works where a parameter that gets no gradient
would stop DDP at its second step (accelerate wraps trained models without find_unused_parameters)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

import conjure

ASSETS = Path(conjure.__file__).parent / "assets"


@pytest.mark.slow  # ~20 s: two processes each import torch, diffusers and transformers
def test_sdxl_lora_with_text_encoders_trains_in_two_processes(tmp_path):
    """The review's reproduction (issue 13, defect 4): before CLIP-L's last layer was left out of the targets,
    step 2 failed with "Expected to have finished reduction in the prior iteration"."""
    config = {
        "type": "lora",
        "basic": {"base_model": str(ASSETS / "toy" / "sdxl"), "family": "sdxl", "output_dir": str(tmp_path / "runs"), "run_name": "ddp",
                  "max_train_steps": 3, "save_every_n_steps": 3, "validate_every_n_steps": None, "seed": 1},
        "data": {"source": str(ASSETS / "demo" / "ti"), "resolution": 64, "batch_size": 2},
        "lora": {"rank": 2, "unet_targets": "attention", "train_text_encoder": True, "save_dtype": "fp32"},
        "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
        "advanced": {"cpu": True},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # --standalone: a free local port for the rendezvous (tests may run side by side)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "conjure", "train", str(path)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (one run folder: the main process names it for every rank and writes the checkpoints)
    (lora,) = (tmp_path / "runs").glob("*/checkpoints/step-000003/*.safetensors")
    with safe_open(str(lora), "pt") as f:
        keys = set(f.keys())
    te1 = {k.split("_layers_")[1].split("_")[0] for k in keys if k.startswith("lora_te1_")}
    te2 = {k.split("_layers_")[1].split("_")[0] for k in keys if k.startswith("lora_te2_")}
    assert te1 == {"0"} and te2 == {"0", "1"}  # the toy encoders have 2 layers; CLIP-L's last is never read
