"""kohya LoRA / DoRA files, the layout every app loads (`save_kohya` / `load_kohya`). Facts: shared FORMATS.md.

Per module `NAME.lora_down.weight` [r, in] (conv [r, in, kh, kw]), `NAME.lora_up.weight` [out, r] (conv
[out, r, 1, 1]), `NAME.alpha` (float32 scalar: the configured alpha) and, for input-column DoRA, `NAME.dora_scale`
[1, in] (conv [1, in, 1, 1]). Names: `conjure.export.kohya_names`.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from conjure import families
from conjure.adapters import LoraModule, LoraWeights
from conjure.errors import ConjureError
from conjure.export.kohya_flux import flux_kohya_modules, flux_module_paths, fused_parts
from conjure.export.kohya_names import UnetLayout, kohya_name, module_path_from_kohya, unet_layout
from conjure.export.lora import (
    check_module,
    detect_family,
    dora_scale_tensor,
    family_metadata,
    file_dtype,
    file_tensor,
    read_lora_file,
    save_lora_file,
)

__all__ = [
    "KOHYA_PARTS", "kohya_fused_parts", "kohya_state_dict", "layout_from_metadata", "layout_metadata", "load_kohya",
    "one_alpha", "parse_kohya", "save_kohya", "write_kohya",
]

KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
# metadata keys conjure writes so a reader can undo the SDXL LDM numbering without the model at hand
META_LAYERS_PER_BLOCK = "conjure.unet_layers_per_block"
META_UP_ATTENTION = "conjure.unet_up_block_attention"


def layout_metadata(unet_config: Any) -> dict[str, str]:
    """Metadata keys recording the layout (written into SDXL kohya files so readers need no model)."""
    layout = unet_layout(unet_config)
    out = {META_LAYERS_PER_BLOCK: str(layout.layers_per_block)}
    if layout.up_block_attention is not None:
        out[META_UP_ATTENTION] = ",".join("1" if a else "0" for a in layout.up_block_attention)
    return out


def layout_from_metadata(metadata: Mapping[str, str] | None) -> UnetLayout | None:
    """The layout recorded by `layout_metadata`, or None when the metadata has none."""
    if not metadata or META_LAYERS_PER_BLOCK not in metadata:
        return None
    try:
        layers = int(metadata[META_LAYERS_PER_BLOCK])
        raw = metadata.get(META_UP_ATTENTION)
        attention = tuple(part == "1" for part in raw.split(",")) if raw else None
    except ValueError:
        raise ConjureError(
            f"bad {META_LAYERS_PER_BLOCK} in the file's metadata: {metadata[META_LAYERS_PER_BLOCK]!r}"
        ) from None
    return UnetLayout(layers, attention)


def kohya_fused_parts(family: Any, component: str, paths: list[str]) -> dict[str, tuple[str, ...]]:
    """The layers `family`'s kohya layout fuses, for the modules `paths` of `component`: fused layer name -> all its
    parts' paths (a kohya DoRA decomposes each as one: adapters/dora.py share_decomposition, `dora_group`). Empty
    where kohya names modules one to one (SD 1.x/2.x/SDXL)."""
    fam = families.get(family)
    if fam.unet_naming != "bfl" or component != fam.denoiser:
        return {}
    return fused_parts(paths)


def _named_modules(weights: LoraWeights, family: Any, unet_config: Any) -> dict[str, tuple[str, LoraModule]]:
    """kohya name -> (where, module): each module under its name, FLUX's transformer fused (export/kohya_flux.py)."""
    fam = families.get(family)
    out: dict[str, tuple[str, LoraModule]] = {}
    owners: dict[str, tuple[str, str]] = {}
    fused: dict[str, LoraModule] = {}
    for (component, path), m in weights.items():
        where = f"{component} module {path!r}"
        check_module(where, m)
        if m.magnitude is not None:
            raise ConjureError(
                f"{where} carries a PEFT DoRA magnitude (output-row decomposition): apps read kohya DoRA as "
                "input-column `dora_scale` [1, in], so this would load wrongly; save it with save_peft, or train "
                "the kohya (input-column) DoRA"
            )
        if fam.unet_naming == "bfl" and component == fam.denoiser:
            fused[path] = m
            continue
        name = kohya_name(component, path, fam.name, unet_config)
        if name in owners:
            raise ConjureError(f"{where} and {owners[name][0]} module {owners[name][1]!r} share the kohya name {name}")
        owners[name] = (component, path)
        out[name] = (where, m)
    for name, m in flux_kohya_modules(fused).items():
        out[name] = (f"{fam.denoiser} module {name}", m)
    return out


def kohya_state_dict(
    weights: LoraWeights,
    family: Any,
    unet_config: Any = None,
    *,
    dtype: Any = torch.float32,
    alpha_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The tensors of a kohya file (see the module docstring); dtype None keeps each tensor's own."""
    dtype = file_dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    for name, (where, m) in _named_modules(weights, family, unet_config).items():
        out[f"{name}.lora_down.weight"] = file_tensor(m.down, dtype)
        out[f"{name}.lora_up.weight"] = file_tensor(m.up, dtype)
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=alpha_dtype)
        if m.dora_scale is not None:
            out[f"{name}.dora_scale"] = file_tensor(dora_scale_tensor(where, m), dtype)
    if not out:
        raise ConjureError("no LoRA modules to save")
    return out


def write_kohya(
    path: Path, weights: LoraWeights, metadata: dict[str, str], family: Any, unet_config: Any, dtype: Any,
    alpha_dtype: torch.dtype = torch.float32, bundle: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the tensors of `weights` (and the `bundle_emb.*` tensors of `bundle`) with `metadata` as given
    (`conjure convert`: nothing added)."""
    tensors = kohya_state_dict(weights, family, unet_config, dtype=dtype, alpha_dtype=alpha_dtype)
    save_lora_file({**tensors, **(bundle or {})}, Path(path), metadata)


def save_kohya(
    path: Path,
    weights: LoraWeights,
    metadata: Mapping[str, str],
    family: Any,
    unet_config: Any = None,
    *,
    dtype: Any = torch.float32,
    bundle: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `weights` as a kohya LoRA/DoRA file every app loads (atomically). Returns the path.

    bundle: extra `bundle_emb.*` tensors (conjure.export.embeddings.bundle_tensors) written as given: the
    embedding of a pivotal run, for apps that read it from the LoRA file.

    family: 'sd1' / 'sd2' / 'sdxl' or a Family; unet_config: the UNet's config (SDXL's LDM numbering depends on
    it; None: the real SDXL layout). dtype: of down/up/dora_scale (float32 default; float16 / bfloat16 / None to keep
    the tensors' own); alphas are always float32 scalars. Metadata: strings only; `ss_base_model_version` and
    `ss_v2` are filled in when missing, and for SDXL with a unet_config the layout keys (conjure.unet_layers_per_block,
    conjure.unet_up_block_attention) so the file reads back without the model. Refuses modules with a PEFT
    `magnitude` (wrong layout for apps).

    Per-module alphas are written faithfully, but diffusers 0.42's kohya reader applies one alpha (the most common)
    to every attention projection (UNet to_q/k/v/out, text-encoder q/k/v/out_proj; under transformers 5 also
    CLIPTextModel's mlp): one alpha per file, as conjure trains, loads exactly everywhere.
    """
    fam = families.get(family)
    meta = family_metadata(metadata, fam)
    if fam.unet_naming == "ldm" and unet_config is not None:
        for key, value in layout_metadata(unet_config).items():
            meta.setdefault(key, value)
    tensors = kohya_state_dict(weights, fam.name, unet_config, dtype=file_dtype(dtype))
    for key, value in (bundle or {}).items():
        if not key.startswith("bundle_emb."):
            raise ConjureError(f"bundled tensor {key!r} must start with 'bundle_emb.'")
        tensors[key] = value
    save_lora_file(tensors, Path(path), meta)
    return Path(path)


def parse_kohya(
    tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], family: Any, unet_config: Any, where: str
) -> tuple[LoraWeights, str]:
    """(weights, family name) of a kohya file's tensors; `family` None: read from the header and the keys."""
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith("bundle_emb."):
            continue  # embeddings bundled for A1111/ComfyUI: not part of the LoRA
        name, _, part = key.partition(".")
        if part not in KOHYA_PARTS:
            raise ConjureError(
                f"{where}: {key!r} is not a kohya LoRA/DoRA tensor (only {', '.join(KOHYA_PARTS)} are read; "
                "LyCORIS LoHa/LoKr and other adapters are not supported)"
            )
        groups[name][part] = value
    if not groups:
        raise ConjureError(f"{where} holds no LoRA tensors")
    fam = families.get(family).name if family is not None else detect_family(
        {k: tuple(v.shape) for k, v in tensors.items()}, header
    )[0]
    layout = unet_layout(unet_config) if unet_config is not None else layout_from_metadata(header)
    weights: LoraWeights = {}
    names: dict[tuple[str, str], str] = {}
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ConjureError(f"{where}: module {name} lacks lora_down.weight or lora_up.weight")
        down = parts["lora_down.weight"]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        module = LoraModule(down=down, up=parts["lora_up.weight"], alpha=alpha, dora_scale=parts.get("dora_scale"))
        check_module(f"{where}: {name}", module)
        for target, piece in _module_paths(name, module, fam, layout):
            if target in names:
                raise ConjureError(f"{where}: {name} and {names[target]} are the same module ({target[0]} {target[1]})")
            names[target] = name
            weights[target] = piece
    return weights, fam


def _module_paths(
    name: str, module: LoraModule, family: str, layout: UnetLayout | None
) -> list[tuple[tuple[str, str], LoraModule]]:
    """The (component, module path) keys of kohya module `name`; a fused FLUX layer gives one per part."""
    fam = families.get(family)
    if fam.unet_naming == "bfl" and name.startswith(fam.kohya_prefixes()[fam.denoiser]):
        return [((fam.denoiser, path), part) for path, part in flux_module_paths(name, module)]
    return [(module_path_from_kohya(name, family, layout), module)]


def load_kohya(path: Path, family: Any = None, unet_config: Any = None) -> tuple[LoraWeights, dict[str, str]]:
    """Read a kohya LoRA/DoRA file: (weights, header metadata). Tensors keep the file's dtype; a module without
    `.alpha` gets alpha = rank (kohya's convention); `bundle_emb.*` tensors are skipped.

    family: read from the metadata/keys when not given; unet_config: for SDXL's LDM numbering, default the layout
    recorded in the metadata, else the real SDXL one. Text-encoder paths take the installed transformers' spelling.
    """
    tensors, header = read_lora_file(path)
    weights, _ = parse_kohya(tensors, header, family, unet_config, str(path))
    return weights, header


def one_alpha(weights: LoraWeights) -> tuple[LoraWeights, float]:
    """The same updates with one alpha for every module, the most common rank (scale 1 there), the rest folded into
    `lora_up`. One alpha because diffusers 0.42's kohya reader applies the most common alpha to every attention
    projection (save_kohya): per-module alphas would load wrongly there."""
    ranks = collections.Counter(m.rank for m in weights.values())
    alpha = float(ranks.most_common(1)[0][0])
    out = {
        key: m if m.alpha == alpha else dataclasses.replace(m, up=m.up * (m.alpha / alpha), alpha=alpha)
        for key, m in weights.items()
    }
    return out, alpha
