"""Synthetic single-file checkpoints: a tiny model's weights under the real original (LDM / sgm) key names.

`ldm_state_dict` writes them with conjure's single-file writer (export/single_file.py, tested against diffusers'
own converters in tests/export/test_single_file.py), plus what real files have that a diffusers model lacks. Marker keys (`v_pred`,
`ztsnr`, `edm_*`) are added as the files that carry them do: empty tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

def ldm_state_dict(family: str, components: dict[str, Any], *, sgm: bool = False) -> dict[str, torch.Tensor]:
    """The whole model in the original layout (export/single_file.py): SD 1.x/2.x as the CompVis/Stability `.ckpt`s
    (`sgm` for SD 2.x: the generative-models layout), SDXL as `sd_xl_base_1.0.safetensors`."""
    from conjure import families
    from conjure.export.single_file import checkpoint_state_dict

    fam = families.get(family)
    names = ("unet", "vae", *(slot.encoder for slot in fam.text_encoders))
    state = checkpoint_state_dict(family, {n: components[n].state_dict() for n in names}, components["unet"].config)
    if family == "sd2" and sgm:
        state = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v for k, v in state.items()}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    from conjure.export.single_file import ldm_vae_state_dict

    return {f"first_stage_model.{k}": v for k, v in ldm_vae_state_dict(vae.state_dict()).items()}


def tiny_single_file_components(family: str) -> dict[str, Any]:
    """Tiny components a single file can hold unambiguously: the real UNet block layout (so SD 2.x's
    `output_blocks.11.1` exists), and for SDXL a second encoder wider than the first (diffusers tells the two
    SDXL encoders in a file apart by width; the default tiny model has 32 for both)."""
    from conjure.models.tiny import build_tiny_components

    return build_tiny_components(family, real_layout=True, encoder_widths=(32, 48) if family == "sdxl" else None)


@pytest.fixture(scope="session")
def single_file_model(tmp_path_factory):
    """family -> (diffusers folder of a tiny model, its components); built once per session."""
    from conjure.models.tiny import save_model_folder

    cache: dict[str, tuple[Path, dict[str, Any]]] = {}

    def get(family: str) -> tuple[Path, dict[str, Any]]:
        if family not in cache:
            parts = tiny_single_file_components(family)
            folder = save_model_folder(family, parts, tmp_path_factory.mktemp(f"single-file-config-{family}"))
            cache[family] = (folder, parts)
        return cache[family]

    return get


@pytest.fixture
def write_single_file(single_file_model, tmp_path):
    """Write the tiny `family` model as one checkpoint file with `markers` (names of empty marker tensors) and
    `tensors` (extra or replaced tensors); returns (file, diffusers config folder)."""
    from safetensors.torch import save_file

    def write(family: str, *, markers: tuple[str, ...] = (), tensors: dict[str, torch.Tensor] | None = None,
              suffix: str = ".safetensors", sgm: bool = False, name: str = "model") -> tuple[Path, Path]:
        folder, parts = single_file_model(family)
        state = ldm_state_dict(family, parts, sgm=sgm)
        state.update({m: torch.tensor([]) for m in markers})
        state.update(tensors or {})
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".ckpt":
            torch.save({"state_dict": state, "global_step": 1}, path)
        else:
            save_file(state, str(path))
        return path, folder

    return write


@pytest.fixture
def ldm():
    """The writers above, for tests (a conftest is not importable by name under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(vae=vae_to_ldm, state_dict=ldm_state_dict)


def train_offline(script: str, configs: Path, runs: list[dict[str, Any]], tmp_path: Path) -> tuple[list[Any], Path]:
    """Run `script` (argv: `configs`, a JSON file of `runs`) in a fresh process, offline with an empty Hugging Face
    cache (HF_HUB_OFFLINE and HF_HOME are read when huggingface_hub is imported): the JSON lines it printed, and
    the cache folder, for the test to find still empty."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "runs.json").write_text(json.dumps(runs))
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    done = subprocess.run([sys.executable, "-c", script, str(configs), str(tmp_path / "runs.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()], hf_home
