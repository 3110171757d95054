"""A run folder whose checkpoints hold real app files (a kohya LoRA and an SD 1.x embedding of real names and widths,
tiny ranks), as pivotal tuning leaves them, without training anything: for the export and install tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conjure.runs.checkpoints import write_checkpoint

LORA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def write_app_files(folder: Path, step: int, bundle: bool) -> list[Path]:
    embedding, lora = folder / "zq-thing.safetensors", folder / "zq-lora.safetensors"
    emb = {"emb_params": torch.full((2, 768), float(step))}
    save_file(emb, embedding, {"modelspec.architecture": "stable-diffusion-v1/textual-inversion"})
    lora_tensors = {f"{LORA_KEY}.lora_down.weight": torch.full((4, 768), float(step)),
                    f"{LORA_KEY}.lora_up.weight": torch.zeros(320, 4), f"{LORA_KEY}.alpha": torch.tensor(4.0)}
    metadata = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}
    save_file(lora_tensors, lora, metadata)
    if bundle:
        save_file({**lora_tensors, "bundle_emb.zq-thing.string_to_param.*": emb["emb_params"]},
                  folder / "zq-lora.bundle.safetensors", metadata)
    return [embedding, lora]


def files_run(root: Path, bundle: bool = False) -> Path:
    run = root / "run"
    for step in (2, 4):
        write_checkpoint(run, step, {"step": step}, lambda folder, step=step: write_app_files(folder, step, bundle))
    return run


@pytest.fixture
def app_files_run(tmp_path) -> Path:
    """A run with checkpoints at steps 2 and 4, each holding zq-thing.safetensors (embedding) and
    zq-lora.safetensors (LoRA)."""
    return files_run(tmp_path)


@pytest.fixture
def bundle_run(tmp_path) -> Path:
    """As `app_files_run`, with pivotal tuning's zq-lora.bundle.safetensors too (the LoRA with the embedding in)."""
    return files_run(tmp_path, bundle=True)
