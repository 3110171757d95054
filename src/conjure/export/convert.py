"""Which layout a LoRA file has, conversion between the kohya and diffusers/PEFT layouts, and conjure's own
applier (the reference for what apps compute from a file). Facts: shared FORMATS.md.

`convert_lora` changes a plain LoRA file between the two layouts without changing a value (kohya -> peft -> kohya
gives back every tensor bit for bit and the metadata). DoRA files cannot change layout: kohya DoRA normalises input
columns, PEFT DoRA output rows; the same numbers are a different function. FLUX.1's kohya layout fuses q/k/v
(export/kohya_flux.py): to peft splits the fused layers, back fuses them, both exactly for the files conjure writes;
a layer another tool trained fused (dense `lora_up`) splits into parts that share its `lora_down`, the same update,
which fuses back at k times the rank (the same function, a bigger file).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from conjure import families
from conjure.adapters import LoraModule, LoraWeights
from conjure.adapters.dora import group_column_norm
from conjure.errors import ConjureError
from conjure.export.kohya import KOHYA_PARTS, layout_from_metadata, parse_kohya, write_kohya
from conjure.export.kohya_names import resolve_module_path
from conjure.export.lora import (
    FORMATS,
    check_module,
    detect_family,
    dora_scale_tensor,
    file_dtype,
    read_lora_file,
    read_shapes,
)
from conjure.export.peft import PEFT_PREFIXES, load_peft, write_peft

__all__ = ["ALPHA_DTYPE_KEY", "apply_lora", "convert_lora", "detect_lora_format"]

ALPHA_DTYPE_KEY = "conjure.kohya_alpha_dtype"  # set by convert_lora when a kohya file's alphas were not float32


def _format_of_keys(keys: Iterable[str]) -> str | None:
    keys = [k for k in keys if not k.startswith("bundle_emb.")]
    if not keys:
        return None
    if all(re.match(r"lora_(unet|te\d?)_", k) and k.partition(".")[2] in KOHYA_PARTS for k in keys):
        return "kohya"
    if all(
        k.startswith(tuple(p + "." for p in PEFT_PREFIXES))
        and re.search(r"\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(\.weight)?)$", k)
        for k in keys
    ):
        return "peft"
    return None


def detect_lora_format(path: Path) -> str:
    """'kohya' or 'peft'; ConjureError for anything else (LyCORIS LoHa/LoKr, unprefixed PEFT, not a LoRA)."""
    shapes, _ = read_shapes(Path(path))
    fmt = _format_of_keys(shapes)
    if fmt is None:
        sample = ", ".join(sorted(shapes)[:3])
        raise ConjureError(
            f"{path} is neither a kohya LoRA (lora_unet_*/lora_te*_ .lora_down/.lora_up/.alpha) nor a diffusers/PEFT "
            f"LoRA (unet./text_encoder. ... .lora_A/.lora_B) file; first keys: {sample or '(none)'}"
        )
    return fmt


_DORA_REFUSAL = (
    "{src} is a DoRA file; DoRA files cannot change format: kohya DoRA (dora_scale [1, in]) normalises each input "
    "column, PEFT DoRA (lora_magnitude_vector [out]) each output row, so the same numbers are a different model. "
    "Save the format you need from the training run instead (lora.save_format)."
)


def _to_peft(src: Path, dst: Path, tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], fam: str) -> None:
    weights, _ = parse_kohya(tensors, header, fam, None, str(src))
    meta = dict(header)
    alpha_dtypes = {v.dtype for k, v in tensors.items() if k.endswith(".alpha")}
    if alpha_dtypes and alpha_dtypes != {torch.float32}:
        if len(alpha_dtypes) > 1:
            raise ConjureError(f"{src}: alphas of several dtypes ({alpha_dtypes}); cannot keep them exactly")
        meta[ALPHA_DTYPE_KEY] = str(alpha_dtypes.pop()).removeprefix("torch.")
    write_peft(dst, weights, meta, fam, None, add_format=False)


def convert_lora(src: Path, dst: Path, to: str, *, family: Any = None) -> Path:
    """Convert a plain LoRA file between the kohya and diffusers/PEFT layouts without changing a value.

    The metadata is carried over unchanged (the PEFT file adds diffusers' adapter config, which the way back
    drops), so kohya -> peft -> kohya gives back every tensor bit for bit and the same header. family: read from
    the file when not given; a PEFT file that names neither SDXL's second encoder nor its add_embedding and has no
    metadata is ambiguous and needs it. SDXL's LDM numbering follows the layout recorded in the metadata, else the
    real SDXL layout. `dst` is replaced if it exists (the CLI asks for --force first).
    """
    src, dst = Path(src), Path(dst)
    if to not in FORMATS:
        raise ConjureError(f"unknown LoRA format {to!r}: choose {' or '.join(FORMATS)}")
    source_format = detect_lora_format(src)
    if source_format == to:
        raise ConjureError(f"{src} is already a {to} file")
    if src.resolve() == dst.resolve():
        raise ConjureError("the output must be another file than the input")
    tensors, header = read_lora_file(src)
    if any(k.endswith((".dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight")) for k in tensors):
        raise ConjureError(_DORA_REFUSAL.format(src=src))
    if any(k.startswith("bundle_emb.") for k in tensors):
        raise ConjureError(f"{src} bundles embeddings (bundle_emb.*), which the diffusers/PEFT format cannot carry")
    if family is None:
        fam, certain = detect_family({k: tuple(v.shape) for k, v in tensors.items()}, header)
    else:
        fam, certain = families.get(family).name, True

    if to == "peft":
        _to_peft(src, dst, tensors, header, fam)
        return dst
    if not certain:
        raise ConjureError(
            f"cannot tell which model family {src} is for (no metadata, no modules only one family has); "
            f"give the family (conjure convert ... --family {'|'.join(families.FAMILIES)})"
        )
    weights, meta = load_peft(src)
    alpha_dtype = file_dtype(meta.pop(ALPHA_DTYPE_KEY, "float32"))
    write_kohya(dst, weights, meta, fam, layout_from_metadata(meta), None, alpha_dtype=alpha_dtype)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# applying (conjure's reader: what ComfyUI / A1111 compute from a kohya file)


def _delta(m: LoraModule, weight: torch.Tensor, where: str) -> torch.Tensor:
    up = m.up.detach().to(weight.device, torch.float32).flatten(1)
    down = m.down.detach().to(weight.device, torch.float32).flatten(1)
    if up.shape[0] != weight.shape[0] or down.shape[1] != weight[0].numel():
        raise ConjureError(
            f"{where}: LoRA of shapes up {list(m.up.shape)} / down {list(m.down.shape)} does not fit the weight "
            f"{list(weight.shape)}"
        )
    return (up @ down).reshape(weight.shape)


def _decomposed(m: LoraModule, new: torch.Tensor, norm: torch.Tensor, eps: float, where: str) -> torch.Tensor:
    """`new` (W') with the module's DoRA applied: input-column (`dora_scale`, `norm` = ||W'||_col of its
    decomposition) or output-row (`magnitude`)."""
    if m.dora_scale is not None:
        scale = dora_scale_tensor(where, m).to(new.device, torch.float32).reshape(norm.shape)
        return new * (scale / (norm + eps))
    if m.magnitude is not None:
        n_out = new.shape[0]
        if m.magnitude.numel() != n_out:
            raise ConjureError(f"{where}: magnitude of {m.magnitude.numel()} values for {n_out} outputs")
        shape = (n_out,) + (1,) * (new.dim() - 1)
        magnitude = m.magnitude.detach().to(new.device, torch.float32).reshape(shape)
        return new * (magnitude / new.reshape(n_out, -1).norm(dim=1).reshape(shape))
    return new


def _target(components: Mapping[str, Any], names: dict[str, set[str]], component: str, path: str) -> Any:
    where = f"{component} module {path!r}"
    model = components.get(component)
    if model is None:
        raise ConjureError(f"{where}: no {component} among the components")
    if component not in names:
        names[component] = {name for name, _ in model.named_modules()}
    module = model.get_submodule(resolve_module_path(path, names[component]))
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        raise ConjureError(f"{where} is a {type(module).__name__}, not a Linear or Conv2d")
    return module


def apply_lora(components: Mapping[str, Any], weights: LoraWeights, multiplier: float = 1.0) -> int:
    """Merge `weights` into the modules of `components` (pipeline attribute name -> model) in place, as
    ComfyUI / A1111 apply a kohya file; returns the number of modules changed. Computed in float32:

        W' = W + (alpha / rank) * up @ down
        input-column DoRA:  W'' = dora_scale * W' / (||W'||_col + eps)   (norm over the output and kernel dims of
                            each input column; eps = finfo(W.dtype).eps, as ComfyUI)
        output-row (PEFT) DoRA: W'' = magnitude * W' / ||W'||_row        (as PEFT, no eps)
        W_new = W + multiplier * (W'' - W)

    The parts of a fused layer's DoRA (`dora_group`, FLUX.1's q|k|v) share its ||W'||_col, over all their rows, as
    apps decompose the fused weight. Text-encoder paths match with or without `text_model.`.
    """
    names: dict[str, set[str]] = {}

    def updated(component: str, module_path: str, m: LoraModule) -> tuple[str, torch.Tensor, torch.Tensor]:
        where = f"{component} module {module_path!r}"
        weight = _target(components, names, component, module_path).weight
        check_module(where, m)
        w = weight.detach().to(torch.float32)
        return where, weight, w + m.scale * _delta(m, w, where)

    # W' of every part of a fused DoRA layer first: each part's norm spans them all
    groups: dict[tuple[str, str], list[torch.Tensor]] = collections.defaultdict(list)
    for (component, module_path), m in weights.items():
        if m.dora_group is not None:
            groups[(component, m.dora_group)].append(updated(component, module_path, m)[2])
    for (component, module_path), m in weights.items():
        where, weight, new = updated(component, module_path, m)
        norm = group_column_norm(groups[(component, m.dora_group)] if m.dora_group is not None else [new])
        new = _decomposed(m, new, norm, torch.finfo(weight.dtype).eps, where)
        if multiplier != 1.0:
            new = weight.detach().to(torch.float32) + multiplier * (new - weight.detach().to(torch.float32))
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))
    return len(weights)

