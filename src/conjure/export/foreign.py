"""Other trainers' LoRA layouts as `LoraWeights`, for `conjure convert`: OneTrainer (`lora_transformer_`), SimpleTuner
(`lycoris_`), ai-toolkit and unprefixed PEFT, diffusers' old attention processors (`...processor.to_q_lora.down`),
ComfyUI's `diffusion_model.` FLUX.1 paths. Every key is named by `conjure inspect`'s reader (inspection/reader.py,
keys.py): conjure reads foreign layouts in one place, and this module only takes the tensors where it points.

Only what has an exact LoRA form converts: plain LoRA / DoRA modules of a known model module, with every tensor of
the file placed. Tucker cores (`lora_mid`), full differences (`diff`), modules of no known layer and tensors no
module claims are refused with the reason, since writing the rest would drop them; LyCORIS LoHa / LoKr too, unless
a resize asks for an approximation (export/lycoris.py gives their exact factors, export/resize.py the rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from conjure.adapters import LoraModule, LoraWeights
from conjure.errors import ConjureError
from conjure.export.kohya import layout_from_metadata
from conjure.export.kohya_flux import flux_module_paths
from conjure.export.kohya_names import default_module_path, resolve_module_path
from conjure.export.lora import check_module
from conjure.export.lycoris import lycoris_module
from conjure.inspection.keys import resolve
from conjure.inspection.model import Inspection, Module

__all__ = ["foreign_weights", "not_lora_refusal"]

# What a module is when it is no LoRA (inspection.model.Module.algorithm, or its Tucker core `mid`), and why no
# LoRA of the file's rank is the same function (LyCORIS lycoris/modules/loha.py, lokr.py; applied as ComfyUI
# comfy/weight_adapter/loha.py, lokr.py calculate_weight does)
_NOT_LORA = {
    "loha": "LoHa: its update (w1_a @ w1_b) * (w2_a @ w2_b), an elementwise product, has rank up to r^2",
    "lokr": "LoKr: its update kron(w1, w2) has rank rank(w1) * rank(w2), up to the full width",
    "mid": "LoCon with a Tucker core (lora_mid), which conjure does not read",
    "full": "a full weight difference (no low-rank factors)",
}
_APPROXIMABLE = ("loha", "lokr")  # export/lycoris.py: exact factors, then resize.py's SVD


def not_lora_refusal(path: Path, modules: Iterable[Module], approximate: bool = False) -> str | None:
    """Why the file at `path` (its modules as `conjure inspect` reads them) is no LoRA, or None when nothing says so;
    `approximate` (a resize was asked for): LoHa and LoKr modules are let through."""
    for m in modules:
        kind = "mid" if "mid" in m.parts else m.algorithm
        if kind not in _NOT_LORA or (approximate and kind in _APPROXIMABLE):
            continue
        hint = "; --resize-rank R approximates it by a rank-R LoRA, reporting the energy kept" if (
            kind in _APPROXIMABLE) else ""
        return (
            f"{path} is a LyCORIS file, not a LoRA ({m.name} is {_NOT_LORA[kind]}), so it has no exact LoRA form to "
            f"convert to; apps with LyCORIS support (ComfyUI, A1111/Forge, InvokeAI) load it as it is{hint}"
        )
    return None


class _ReferenceShapes:
    """Weight shapes of the real `family` model's layers (built once, on the meta device: no weights)."""

    def __init__(self, family: str):
        self.family = family
        self.components: dict[str, Any] | None = None
        self.names: dict[str, set[str]] = {}

    def __call__(self, component: str, path: str) -> tuple[int, ...]:
        from conjure.models.reference import build_reference_components

        if self.components is None:
            self.components = build_reference_components(self.family, device="meta")
        model = self.components[component]
        names = self.names.setdefault(component, {name for name, _ in model.named_modules()})
        return tuple(model.get_submodule(resolve_module_path(path, names)).weight.shape)


def _module(m: Module, component: str, tensors: Mapping[str, torch.Tensor], where: str,
            shapes: _ReferenceShapes | None) -> LoraModule:
    if m.algorithm in ("loha", "lokr"):
        if shapes is None or len(m.targets) != 1:
            raise ConjureError(f"{where}: {m.name} is a LyCORIS {m.algorithm} module on a fused layer, not converted")
        return lycoris_module(m, tensors, shapes(component, m.targets[0]), where)
    if "down" not in m.parts or "up" not in m.parts:
        raise ConjureError(f"{where}: module {m.name} lacks its down or up tensor")
    down, up = tensors[m.parts["down"]], tensors[m.parts["up"]]
    magnitude = tensors[m.parts["magnitude"]].flatten() if "magnitude" in m.parts else None
    dora_scale = tensors[m.parts["dora_scale"]] if "dora_scale" in m.parts else None
    # kohya networks/lora.py: an alpha of 0 or none is the rank (no scaling); diffusers reads a missing one so too
    module = LoraModule(down=down, up=up, alpha=m.alpha or float(down.shape[0]), dora_scale=dora_scale,
                        magnitude=magnitude)
    check_module(f"{where}: {m.name}", module)
    return module


def _targets(m: Module, component: str, module: LoraModule, family: str) -> list[tuple[tuple[str, str], LoraModule]]:
    if len(m.targets) == 1:
        return [((component, default_module_path(component, m.targets[0], family)), module)]
    # a layer that computes several diffusers modules (FLUX.1's q|k|v): split as its kohya name is
    kohya = "lora_unet_" + m.name.removeprefix("diffusion_model.").replace(".", "_")
    return [((component, path), part) for path, part in flux_module_paths(kohya, module)]


def foreign_weights(
    src: Path, tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], family: str, inspection: Inspection,
    approximate: bool = False,
) -> LoraWeights:
    """The modules of foreign file `src` (its LoRA tensors `tensors`, bundles left out) read as `family`'s; the
    caller has refused LyCORIS files (not_lora_refusal) already, except LoHa / LoKr when `approximate` (a resize
    follows): those come as their exact LoRA factors (export/lycoris.py)."""
    where = str(src)
    shapes = _ReferenceShapes(family) if approximate else None
    claimed = {key for m in inspection.modules for key in m.parts.values()}
    left = sorted(set(tensors) - claimed)
    if left:
        raise ConjureError(f"{where}: {len(left)} tensors are no part of a LoRA module ({', '.join(left[:3])}); "
                           "converting would drop them")
    layout = layout_from_metadata(header)
    weights: LoraWeights = {}
    for m in inspection.modules:
        m.naming, component, m.targets = resolve(m.name, family, layout)
        if component is None or not m.targets:
            raise ConjureError(f"{where}: module {m.name} names no layer of a {family} model that conjure knows")
        for key, module in _targets(m, component, _module(m, component, tensors, where, shapes), family):
            if key in weights:
                raise ConjureError(f"{where}: two modules adapt {key[0]} {key[1]}")
            weights[key] = module
    return weights
