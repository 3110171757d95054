"""Textual-inversion embedding files, in the exact layouts the apps load (shared FORMATS.md).

SD 1.x/2.x: one tensor `emb_params` [n_vectors, width]; SDXL: `clip_l` and `clip_g`. Nothing else goes
into the tensors (A1111/Forge reject a file with an extra tensor such as a step counter); facts go into
the string metadata. The file name is what A1111/ComfyUI users type, so it is derived from the token.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from conjure.errors import ConjureError
from conjure.export.files import save_atomically


def embedding_file_name(token: str) -> str:
    """'<my-style>' -> 'my-style.safetensors': no characters that prompts or file systems mangle."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", token).strip("-.") or "embedding"
    return f"{stem}.safetensors"


def save_embedding(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: a crash leaves either the old file or the new one, never half a file."""
    clean = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_atomically(clean, Path(path), metadata)


def load_embedding(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConjureError(f"cannot read embedding file {path}: {exc}") from None
