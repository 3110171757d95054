"""`inspect_file`: a file's tensors, names and metadata read into an `Inspection`, without loading its weights
(safetensors' header and shapes; only the scalar `.alpha` tensors are read). A1111 `.pt` embeddings load through
torch's restricted unpickler (`weights_only=True`: tensors, dicts, numbers and strings, never code); a pickle that
needs anything else is refused unless the caller allows arbitrary pickles."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open

from conjure import families
from conjure.errors import ConjureError
from conjure.export.embeddings import BUNDLE_PREFIX, SD_BUNDLE_KEY
from conjure.export.kohya import layout_from_metadata
from conjure.export.lora import detect_family, family_from_metadata, read_shapes
from conjure.export.peft import adapter_alpha, adapter_config
from conjure.inspection.checkpoint import model_file
from conjure.inspection.keys import family_keys, group_modules, resolve
from conjure.inspection.model import EmbeddingInfo, Inspection, Module, Shape

__all__ = ["inspect_file"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_ZIP_OR_PICKLE = (b"PK\x03\x04", b"\x80")  # torch.save's zip container, a bare pickle's PROTO opcode


def _read_safetensors(path: Path) -> tuple[dict[str, Shape], dict[str, str], dict[str, str], dict[str, float]]:
    """(shapes, dtypes, metadata, alphas) from the header; the scalar alphas are the only tensors read."""
    shapes, metadata = read_shapes(path)
    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in shapes}
        alphas = {k: float(f.get_tensor(k).float().reshape(-1)[0]) for k in shapes
                  if k.endswith(".alpha") and math.prod(shapes[k]) == 1}
    return shapes, dtypes, metadata, alphas


def _flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle, nested dict keys joined with dots (A1111: `string_to_param.*`)."""
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    if isinstance(obj, Mapping):
        out: dict[str, torch.Tensor] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {}


def _read_pickle(path: Path, allow_pickle: bool) -> tuple[dict[str, Shape], dict[str, str], dict[str, str], dict]:
    with open(path, "rb") as f:
        zipped = f.read(4) == _ZIP_OR_PICKLE[0]
    try:
        # mmap: a multi-GB .ckpt maps its tensors instead of reading them (torch.save's zip container only)
        data = torch.load(str(path), map_location="cpu", weights_only=not allow_pickle, mmap=zipped)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "restricted unpickler refused it"
        raise ConjureError(
            f"{path} is a pickle that needs more than tensors to load ({first[:160]}); it was not opened. "
            "Rerun with --allow-pickle only if you trust where the file came from (a pickle can run any code)"
        ) from None
    tensors = _flatten(data)
    meta = {k: str(v) for k, v in data.items() if isinstance(v, (str, int, float))} if isinstance(data, Mapping) else {}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
    alphas = {k: float(v.float().reshape(-1)[0]) for k, v in tensors.items() if k.endswith(".alpha") and v.numel() == 1}
    return shapes, dtypes, meta, alphas


def _is_pickle(path: Path) -> bool:
    """By suffix, else by the first bytes. A safetensors file starts with its header's length (8 bytes, little
    endian) and the header's "{": a length whose low byte is 0x80 (one in 32 of them, padded to 8) would look
    like a pickle's PROTO opcode otherwise."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    safetensors_layout = len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size
    return head.startswith(_ZIP_OR_PICKLE) and not safetensors_layout


def _read(path: Path, allow_pickle: bool):
    if path.is_dir():
        raise ConjureError(f"{path} is a folder; give one .safetensors (or .pt) file")
    if not path.is_file():
        raise ConjureError(f"no such file: {path}")
    try:
        if _is_pickle(path):
            return ("pickle", *_read_pickle(path, allow_pickle))
        return ("safetensors", *_read_safetensors(path))
    except ConjureError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as exc:
        kind = "a torch pickle" if _is_pickle(path) else "a safetensors file"
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConjureError(f"cannot read {path} as {kind} (truncated or not that format?): {why[:200]}") from None


# ---------------------------------------------------------------------------------------------------------------
# embeddings

_A1111_KEY = SD_BUNDLE_KEY.replace(".*", "")  # `string_to_param.*` -> `string_to_param`


def _embedding_key(key: str) -> str:
    """emb_params for A1111's legacy `string_to_param.<token>`, the key itself otherwise."""
    return "emb_params" if key.startswith(_A1111_KEY + ".") else key


def _embedding_family(shapes: Mapping[str, Shape]) -> tuple[str | None, bool]:
    """The family whose embedding tensors (names and widths, family records) the file holds exactly; else the
    families any of its tensors fits, uncertain."""
    widths = {_embedding_key(k): s[-1] for k, s in shapes.items()}
    partial = None
    for fam in families.FAMILIES.values():
        expected = {slot.embedding_key: slot.width for slot in fam.text_encoders}
        if widths == expected:
            return fam.name, True
        if partial is None and widths.items() <= expected.items():
            partial = fam.name
    return partial, False


def _embeddings(rest: list[str], shapes: Mapping[str, Shape]) -> tuple[list[EmbeddingInfo], list[str]]:
    """The embeddings among the keys no module claimed (a file's own, or bundled), and the unknown keys."""
    own_keys = {slot.embedding_key for f in families.FAMILIES.values() for slot in f.text_encoders}
    widths = {slot.width for f in families.FAMILIES.values() for slot in f.text_encoders}
    out: dict[str, EmbeddingInfo] = {}
    unknown = []
    for key in rest:
        if key.startswith(BUNDLE_PREFIX):
            name, _, part = key[len(BUNDLE_PREFIX):].partition(".")
            info = out.setdefault(BUNDLE_PREFIX + name, EmbeddingInfo(name, {}, {}, bundled=True))
        elif _embedding_key(key) in own_keys and len(shapes[key]) == 2:
            info, part = out.setdefault("", EmbeddingInfo("", {}, {})), key
        elif len(shapes) == 1 and len(shapes[key]) in (1, 2) and shapes[key][-1] in widths:
            # diffusers' learned_embeds ({token: [width]}): apps take a lone tensor as the embedding
            info, part = out.setdefault("", EmbeddingInfo(key, {}, {})), "emb_params"
        else:
            unknown.append(key)
            continue
        info.tensors[_embedding_key(part)] = key
        info.shapes[_embedding_key(part)] = shapes[key]
    return list(out.values()), unknown


# ---------------------------------------------------------------------------------------------------------------
# the file


def _kind(modules: list[Module], embeddings: list[EmbeddingInfo]) -> str:
    if not modules:
        return "embedding" if embeddings else "unknown"
    kinds = []
    for m in modules:
        if m.algorithm in ("loha", "lokr"):
            kind = {"loha": "LoHa", "lokr": "LoKr"}[m.algorithm]
        elif "dora_scale" in m.parts or "magnitude" in m.parts:
            kind = "DoRA"
        elif m.conv_kernel not in (None, (1, 1)):
            kind = "LoCon"
        else:
            kind = "LoRA"
        if kind not in kinds:
            kinds.append(kind)
    # a file with some plain LoRA modules beside DoRA/LoCon ones is named after the richer kind
    main = sorted(k for k in kinds if k != "LoRA") or kinds
    return " + ".join(main) + (" + embedding" if embeddings else "")


def _module_alpha(m: Module, alphas: Mapping[str, float], config: Mapping[str, Any]) -> float | None:
    if "alpha" in m.parts:
        return alphas.get(m.parts["alpha"])
    if m.spelling == "peft" and config and m.component and m.rank:
        return adapter_alpha(config, m.component, m.name[len(m.component) + 1:], m.rank)
    return None


def inspect_file(path: Path | str, *, allow_pickle: bool = False) -> Inspection:
    """Read `path` into an `Inspection`. Raises ConjureError (one line) for a missing, unreadable, truncated or
    unrecognised file, and for a pickle that needs more than tensors unless `allow_pickle`."""
    path = Path(path)
    fmt, shapes, dtypes, metadata, alphas = _read(path, allow_pickle)
    by_name, rest = group_modules(shapes)
    embeddings, unknown = _embeddings(rest, shapes)
    if not by_name and not embeddings:
        found = model_file(shapes, metadata, path.stat().st_size)
        if found is None:
            sample = ", ".join(sorted(shapes)[:3]) or "(no tensors)"
            raise ConjureError(f"{path} holds no LoRA/LyCORIS modules and no embedding, and is no whole model "
                               f"(checkpoint) either; first keys: {sample}")
        model, family, certain = found
        return Inspection(path=str(path), format=fmt, kind="checkpoint", family=family, family_certain=certain,
                          modules=[], embeddings=[], metadata=metadata, shapes=shapes, dtypes=dtypes, model=model)
    family: str | None
    if by_name:
        family, certain = detect_family(dict(zip(family_keys(list(shapes)), shapes.values())), metadata)
    else:
        family, certain = _embedding_family(embeddings[0].shapes)
        # widths no real model has (a toy or tiny model's file): the family the header names, uncertain
        family = family or family_from_metadata(metadata)
    layout = layout_from_metadata(metadata)
    config = adapter_config(metadata, str(path))
    modules = list(by_name.values())
    for m in modules:
        m.naming, m.component, m.targets = resolve(m.name, family or families.SD1.name, layout)
        m.alpha = _module_alpha(m, alphas, config)
    return Inspection(
        path=str(path), format=fmt, kind=_kind(modules, embeddings), family=family, family_certain=certain,
        modules=modules, embeddings=embeddings, metadata=metadata, shapes=shapes, dtypes=dtypes, unknown=unknown,
    )
