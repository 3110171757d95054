"""LoRA / DoRA files: what the kohya and the diffusers/PEFT layouts share (tensor and metadata checks, reading,
atomic writing) and which family a file is for. Facts: shared FORMATS.md.

One file per layout, each with its inverse: `export/kohya.py` (the layout every app loads; names in
`export/kohya_names.py`) and `export/peft.py` (diffusers' `load_lora_weights` layout); `export/convert.py` tells
the layout of a file, converts between the two and applies a file to a model (conjure's own reader).

Both files carry the caller's string metadata (ss_*, modelspec.*, conjure.*) in the safetensors header; diffusers
keeps its adapter config in the `lora_adapter_metadata` header key, next to ours. Files are written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from conjure import families
from conjure.adapters import LoraModule
from conjure.errors import ConjureError
from conjure.families import Family
from conjure.files import save_safetensors_atomically

__all__ = ["FORMATS", "detect_lora_family"]

FORMATS = ("kohya", "peft")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


# ---------------------------------------------------------------------------------------------------------------
# tensors, metadata, reading and writing


def file_dtype(dtype: Any) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("fp16", "bfloat16", ...); None stays None (keep each tensor's own)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _DTYPES:
        return _DTYPES[str(dtype)]
    raise ConjureError(f"unknown dtype {dtype!r} (use float32, float16 or bfloat16)")


def file_tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    if dtype is not None:
        t = t.to(dtype)
    return t.contiguous().clone()  # clone: safetensors refuses tensors that share memory


def cast_checked(t: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """`t` in `dtype`; ConjureError naming `where` when a finite value would become inf (beyond float16's +-65504)."""
    out = t.to(dtype)
    if out.dtype.is_floating_point and bool((torch.isinf(out) & torch.isfinite(t)).any()):
        largest = float(t[torch.isfinite(t)].abs().max())
        raise ConjureError(
            f"{where}: values up to {largest:.6g} exceed {str(dtype).removeprefix('torch.')}'s range "
            f"(largest {torch.finfo(dtype).max:.6g}) and would be written as inf; keep float32 or use bf16"
        )
    return out


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(metadata or {})
    bad = [k for k, v in out.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConjureError(f"safetensors metadata must be strings; not strings: {', '.join(map(repr, bad))}")
    return out


def family_metadata(metadata: Mapping[str, str] | None, family: Family) -> dict[str, str]:
    """The caller's metadata (checked) with kohya's family keys filled in when missing: `ss_base_model_version`
    and `ss_v2`, which A1111 and ComfyUI read."""
    meta = check_metadata(metadata)
    meta.setdefault("ss_base_model_version", family.ss_base_model_version)
    meta.setdefault("ss_v2", str(family.ss_v2))
    return meta


def save_lora_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A crash leaves the old file or the new one, never half a file."""
    path = Path(path)
    if path.is_dir():
        raise ConjureError(f"cannot write a LoRA file to {path}: it is a folder")
    if not path.parent.is_dir():
        raise ConjureError(f"cannot write {path}: folder {path.parent} does not exist")
    save_safetensors_atomically(tensors, path, metadata)


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
        return load_file(str(path)), header
    except FileNotFoundError:
        raise ConjureError(f"no such file: {path}") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConjureError(f"cannot read {path} as a safetensors file: {exc}") from None


def read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Each tensor's shape and the header metadata, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise ConjureError(f"no such file: {path}") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConjureError(f"cannot read {path} as a safetensors file: {exc}") from None


def is_conv(m: LoraModule) -> bool:
    return m.down.dim() == 4


def dora_scale_tensor(where: str, m: LoraModule) -> torch.Tensor:
    """The input-column scale in the layout apps read: [1, in] (conv [1, in, 1, 1])."""
    scale, n_in = m.dora_scale, m.down.shape[1]
    if scale.numel() != n_in or (scale.dim() > 1 and scale.shape[0] != 1):
        raise ConjureError(
            f"{where}: dora_scale of shape {list(scale.shape)} is not an input-column scale for {n_in} inputs "
            f"(expected [1, {n_in}]{' or [1, %d, 1, 1]' % n_in if is_conv(m) else ''})"
        )
    return scale.reshape((1, n_in, 1, 1) if is_conv(m) else (1, n_in))


def check_module(where: str, m: LoraModule) -> None:
    if m.down.dim() not in (2, 4) or m.up.dim() != m.down.dim() or m.up.shape[1] != m.down.shape[0]:
        raise ConjureError(
            f"{where}: lora_down {list(m.down.shape)} and lora_up {list(m.up.shape)} do not form a LoRA pair"
        )
    if m.dora_scale is not None and m.magnitude is not None:
        raise ConjureError(f"{where}: a module cannot carry both an input-column and an output-row DoRA scale")


# ---------------------------------------------------------------------------------------------------------------
# family detection

# Metadata keys that name the family, in the order they are trusted, and the Family field each value starts with.
_METADATA_MARKS = (("ss_base_model_version", "ss_version_prefix"), ("modelspec.architecture", "modelspec_family"))
_LDM_MARKS = ("input_blocks", "middle_block", "output_blocks")  # kohya's LDM UNet names
# The real models' UNet cross-attention width: their text encoders' widths side by side (768, 1024, 768 + 1280).
_CROSS_WIDTHS = {sum(slot.width for slot in f.text_encoders): name for name, f in families.FAMILIES.items()}


# kohya names of a denoiser naming scheme that no other scheme writes (FLUX.1: BFL's double and single blocks)
_NAMING_MARKS = {"bfl": ("lora_unet_double_blocks_", "lora_unet_single_blocks_")}


def _marks(family: Family) -> set[str]:
    """Key fragments a LoRA of `family` may hold: its CLIP encoders' kohya prefixes and PEFT names (conjure never
    adapts a T5, and other tools name T5 modules their own ways), its denoiser's PEFT name and kohya block names,
    and the UNet's add-embedding (diffusers `add_embedding`, LDM `label_emb`) when it has one."""
    marks = {m for s in family.text_encoders if s.kind == "clip" for m in (s.kohya_prefix, s.encoder + ".")}
    marks |= {family.denoiser + ".", *_NAMING_MARKS.get(family.unet_naming, ())}
    if getattr(family.reference, "addition_time_embed_dim", None):
        marks |= {"add_embedding", "label_emb"}
    return marks


# family -> the fragments no other family's file holds (SDXL: lora_te2_, text_encoder_2., add-embedding; FLUX.1:
# `transformer.`, double/single blocks; CLIP-L's lora_te1_ is both SDXL's and FLUX.1's)
_OWN_MARKS = {
    name: tuple(sorted(_marks(f).difference(*(_marks(o) for o in families.FAMILIES.values() if o is not f))))
    for name, f in families.FAMILIES.items()
}
_LDM_NAMED = [name for name, f in families.FAMILIES.items() if f.unet_naming == "ldm"]


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family a file's header names (conjure.family, modelspec.architecture, ss_base_model_version...)."""
    fam = metadata.get("conjure.family")
    if fam in families.FAMILIES:
        return fam
    for key, field in _METADATA_MARKS:
        value = metadata.get(key, "")
        for family in families.FAMILIES.values():
            if value.startswith(getattr(family, field)):
                return family.name
    return None


def cross_attention_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The width of the text states a LoRA's UNet cross-attends to (its encoders' widths side by side), from the
    in-width of a cross-attention to_k / to_v `lora_down`; None without one."""
    for key, shape in shapes.items():
        if re.search(r"attn2[._]to_[kv]", key) and key.endswith(("lora_down.weight", "lora_A.weight")):
            return shape[1]
    return None


def detect_family(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> tuple[str, bool]:
    """(family, certain). From the metadata, then modules only one family has, then the real models'
    cross-attention widths (InvokeAI's rule), then LDM block names (kohya writes them for SDXL only); otherwise
    (SD 1.x, False): SD 1.x and 2.x have the same names, and SDXL cannot be ruled out."""
    fam = family_from_metadata(metadata)
    if fam:
        return fam, True
    for name, marks in _OWN_MARKS.items():
        if any(mark in key for key in shapes for mark in marks):
            return name, True
    width = cross_attention_width(shapes)
    if width in _CROSS_WIDTHS:
        return _CROSS_WIDTHS[width], True
    if len(_LDM_NAMED) == 1 and any(mark in key for key in shapes for mark in _LDM_MARKS):
        return _LDM_NAMED[0], True
    return families.SD1.name, False


def detect_lora_family(path: Path) -> str:
    """The family of a LoRA file ('sd1', 'sd2', 'sdxl', 'flux'); 'sd1' when nothing tells (SD 1.x and 2.x names are
    the same)."""
    return detect_family(*read_shapes(path))[0]
