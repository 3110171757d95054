"""An inspected file's LoRA / DoRA modules in conjure's neutral form (`adapters.LoraWeights`), whatever layout the
file had: what `save_kohya` / `save_peft` (and so `conjure convert`) write back in the layouts every app loads.

Only modules whose update is `(alpha / rank) * up @ down` convert; LoHa, LoKr, a Tucker `lora_mid` and full weight
differences have no such form at their rank and are refused by name. DoRA scales keep their meaning: `[1, in]`
(input columns) becomes `dora_scale`; `[out, 1]` and PEFT's `[out]` magnitude (output rows) become `magnitude`."""

from __future__ import annotations

from typing import Mapping

import torch
from safetensors import safe_open

from conjure import families
from conjure.adapters import LoraModule, LoraWeights
from conjure.errors import ConjureError
from conjure.export.kohya_flux import flux_module_paths
from conjure.export.kohya_names import default_module_path
from conjure.inspection.model import Inspection, Module

__all__ = ["lora_weights", "read_tensors"]


def read_tensors(insp: Inspection, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors `keys` (default: every module part) of an inspected safetensors file."""
    wanted = keys if keys is not None else [k for m in insp.modules for k in m.keys]
    if insp.format != "safetensors":
        raise ConjureError(f"{insp.path}: only .safetensors files convert")
    with safe_open(insp.path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in wanted}


def _module(m: Module, tensors: Mapping[str, torch.Tensor], where: str) -> LoraModule:
    if m.algorithm != "lora" or "mid" in m.parts or not {"down", "up"} <= set(m.parts):
        raise ConjureError(f"{where}: module {m.name} is {m.algorithm}{' with lora_mid' if 'mid' in m.parts else ''}, "
                           "which has no LoRA form of its rank")
    down, up = tensors[m.parts["down"]], tensors[m.parts["up"]]
    module = LoraModule(down=down, up=up, alpha=m.alpha if m.alpha is not None else float(down.shape[0]))
    orientation = m.dora_orientation
    if orientation == "in":
        module.dora_scale = tensors[m.parts["dora_scale"]]
    elif orientation in ("out", "flat"):
        module.magnitude = tensors[m.parts["dora_scale"]].flatten()
    elif orientation == "bad":
        raise ConjureError(f"{where}: module {m.name} has a dora_scale of shape {list(m.shapes['dora_scale'])}, "
                           f"neither [1, in] nor [out, 1]")
    if "magnitude" in m.parts:
        module.magnitude = tensors[m.parts["magnitude"]].flatten()
    return module


def _pieces(m: Module, module: LoraModule) -> list[tuple[str, LoraModule]]:
    """(diffusers path, module) of each part: a fused FLUX.1 layer (kohya or BFL-dotted name) splits as
    `load_kohya` splits it."""
    if len(m.targets) == 1:
        return [(m.targets[0], module)]
    name = m.name if m.naming == "kohya-bfl" else "lora_unet_" + m.name.split(".", 1)[1].replace(".", "_")
    return flux_module_paths(name, module)


def lora_weights(insp: Inspection, tensors: Mapping[str, torch.Tensor] | None = None) -> LoraWeights:
    """(component, module path) -> LoraModule for every module of `insp` (tensors: default read from the file).
    Module paths take the installed transformers' spelling (export/kohya_names.py default_module_path)."""
    tensors = tensors if tensors is not None else read_tensors(insp)
    fam = families.get(insp.family or families.SD1.name)
    weights: LoraWeights = {}
    for m in insp.modules:
        if m.component is None or not m.targets:
            raise ConjureError(f"{insp.path}: module {m.name} adapts no module of a {fam.title} model")
        module = _module(m, tensors, insp.path)
        for path, piece in _pieces(m, module):
            key = (m.component, default_module_path(m.component, path, fam))
            if key in weights:
                raise ConjureError(f"{insp.path}: {m.component} module {path} appears twice")
            weights[key] = piece
    return weights
