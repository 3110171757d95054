"""Textual-inversion embedding files, in the exact layouts the apps load (shared FORMATS.md).

SD 1.x/2.x: one tensor `emb_params` [n_vectors, width]; SDXL: `clip_l` and `clip_g`. Nothing else goes
into the tensors (A1111/Forge reject a file with an extra tensor such as a step counter); facts go into
the string metadata. The file name is what A1111/ComfyUI users type, so it is derived from the token.

Pivotal tuning can also bundle the embedding inside its LoRA file, as A1111/Forge read it (extensions-builtin/
Lora network.py): `bundle_emb.<name>.string_to_param.*` (SD 1.x/2.x) or `bundle_emb.<name>.clip_l` / `.clip_g`
(SDXL), where `<name>` is what users type (A1111 splits the key at dots, so the name has none). ComfyUI's LoRA
loader skips these keys (comfy/sd1_clip.py `bundled_embed` reads them only from a file in models/embeddings) and
InvokeAI drops them, so the separate embedding file is always written too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from conjure.errors import ConjureError
from conjure.families import Family
from conjure.files import save_safetensors_atomically


def embedding_file_name(token: str) -> str:
    """'<my-style>' -> 'my-style.safetensors': no characters that prompts or file systems mangle."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", token).strip("-.") or "embedding"
    return f"{stem}.safetensors"


def embedding_name(token: str) -> str:
    """What users type for an embedding file or bundle: the file name's stem, without dots."""
    return embedding_file_name(token).removesuffix(".safetensors").replace(".", "-")


BUNDLE_PREFIX = "bundle_emb."
SD_BUNDLE_KEY = "string_to_param.*"  # A1111's legacy embedding layout, which its bundle reader expects for SD1/2


def bundle_tensors(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An embedding (file layout: `emb_params`, or `clip_l` + `clip_g`) as the `bundle_emb` keys of a LoRA file."""
    if "." in name or not name:
        raise ConjureError(f"bundled embedding name {name!r} must be non-empty and have no dots")
    out = {}
    for key, value in tensors.items():
        part = SD_BUNDLE_KEY if key == "emb_params" else key
        out[f"{BUNDLE_PREFIX}{name}.{part}"] = value.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def unbundle(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The embeddings bundled in a LoRA file's tensors, by name, in the embedding-file layout."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        name, _, part = key[len(BUNDLE_PREFIX):].partition(".")
        out.setdefault(name, {})["emb_params" if part == SD_BUNDLE_KEY else part] = value
    return out


def check_embedding(tensors: Mapping[str, torch.Tensor], family: Family, where: str, text_width: int | None) -> None:
    """The tensors are an embedding for `family`'s apps: exactly its CLIP encoders' tensor names (FORMATS.md: SD 1.x/2.x
    `emb_params`, SDXL `clip_l` + `clip_g`), each [n_vectors, width] with one n_vectors, the widths those of the real
    encoders or, given `text_width` (what a LoRA's UNet cross-attends to), adding up to it (tiny and toy models)."""
    expected = {slot.embedding_key: slot.width for slot in family.text_encoders if slot.kind == "clip"}
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    widths = [shape[-1] for shape in found.values()]
    fits = sum(widths) == text_width if text_width else all(shape[-1] == expected.get(k) for k, shape in found.items())
    shaped = all(len(shape) == 2 for shape in found.values()) and len({shape[0] for shape in found.values()}) == 1
    if set(found) != set(expected) or not shaped or not fits:
        want = " + ".join(f"{key} [n, {width}]" for key, width in expected.items())
        if text_width:
            want += f", widths adding up to the LoRA's text width {text_width}"
        have = ", ".join(f"{key} {list(shape)}" for key, shape in found.items()) or "no tensors"
        raise ConjureError(f"{where} is not a {family.name} embedding ({want}); it holds {have}")


def bundle_from_file(
    path: Path, family: Family, text_width: int | None, bundle: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The `bundle_emb` tensors of embedding file `path` for a LoRA of `family` (`text_width`: check_embedding) that
    bundles `bundle` already, named as A1111 names the file (its stem)."""
    tensors, _ = load_embedding(path)
    check_embedding(tensors, family, str(path), text_width)
    name = embedding_name(path.stem)
    if name in unbundle(dict(bundle)):
        raise ConjureError(f"the LoRA already bundles an embedding named {name!r}")
    return bundle_tensors(name, tensors)


def split_targets(
    bundle: Mapping[str, torch.Tensor], dst: Path, force: bool
) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """name -> (embedding file beside the LoRA file `dst`, tensors) for each embedding in `bundle`, refusing files
    that exist without force."""
    embeddings = unbundle(dict(bundle))
    if not embeddings:
        raise ConjureError("--split-bundle: the input bundles no embedding (no bundle_emb.* tensors)")
    out = {}
    for name, tensors in embeddings.items():
        path = dst.parent / embedding_file_name(name)
        if path.resolve() == dst.resolve():
            raise ConjureError(f"the bundled embedding {name!r} would be written to {path}, the LoRA's own path")
        if path.exists() and not force:
            raise ConjureError(f"{path} exists (embedding {name!r}); use --force to overwrite")
        out[name] = (path, tensors)
    return out


def save_embedding(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: a crash leaves either the old file or the new one, never half a file."""
    clean = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_safetensors_atomically(clean, Path(path), metadata)


def load_embedding(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConjureError(f"cannot read embedding file {path}: {exc}") from None
