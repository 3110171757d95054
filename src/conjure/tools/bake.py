"""`conjure lora bake BASE LORA[:WEIGHT] ... --to OUT`: LoRAs/DoRAs merged into a base model's weights, saved as a
diffusers model folder or, for OUT.safetensors, a single-file checkpoint (export/single_file.py).

Each file is applied in turn at its weight with conjure's applier, `export.convert.apply_lora` (ComfyUI's and
A1111's formula, float32: W + w * (alpha / rank) * up @ down; DoRA input-column for kohya files, output-row for PEFT
files, W + w * (W'' - W)), so a baked model computes what the app computes with the files loaded at those weights.
Files are checked before anything is merged: a file of another family, or naming modules the base does not have,
is refused in one line that names them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conjure.adapters import LoraWeights
from conjure.errors import ConjureError
from conjure.tools.lora_inputs import LoraFile, LoraInput, bundle_note, read_input

__all__ = ["Baked", "bake"]


@dataclass
class Baked:
    path: Path
    family: str
    modules: dict[str, int]  # file -> modules merged
    notes: list[str] = field(default_factory=list)  # what was left out (bundled embeddings)


def _missing(components: dict[str, Any], weights: LoraWeights) -> list[str]:
    from conjure.export.kohya_names import resolve_module_path

    names: dict[str, set[str]] = {}
    missing = []
    for component, path in weights:
        model = components.get(component)
        if model is None:
            missing.append(f"{component} (the whole component)")
            continue
        if component not in names:
            names[component] = {name for name, _ in model.named_modules()}
        try:
            resolve_module_path(path, names[component])
        except ConjureError:
            missing.append(f"{component}.{path}")
    return missing


def _checked(lora: LoraInput, family: str, components: dict[str, Any]) -> LoraFile:
    read = read_input(lora)
    if read.family != family:
        raise ConjureError(f"{lora.path} is a LoRA for {read.family}, but the base model is {family}")
    missing = _missing(components, read.weights)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConjureError(f"{lora.path}: {len(missing)} of its modules are not in the base model: {shown}")
    return read


def _own_scheduler(source: str, scheduler: Any) -> Any:
    """The model's own sampler (loading gives training's DDPM scheduler); a single file has only that."""
    import diffusers

    if Path(source).is_file():
        return scheduler
    name = diffusers.DiffusionPipeline.load_config(source).get("scheduler", [None, None])[1]
    cls = getattr(diffusers, name or "", None)
    return cls.from_pretrained(source, subfolder="scheduler") if cls is not None else scheduler


def _pipeline_parts(family: Any, components: dict[str, Any]) -> dict[str, Any]:
    """`components` plus None for the optional parts the family's pipeline takes (safety checker, image encoder)."""
    import diffusers

    wanted = inspect.signature(getattr(diffusers, family.pipeline_class)).parameters
    extra = {name: None for name, p in wanted.items()
             if name not in components and p.default is inspect.Parameter.empty and name != "self"}
    return {**components, **extra}


def bake(base: str, loras: list[LoraInput], out: Path, save_dtype: str = "fp16") -> Baked:
    """Merge `loras` (in order, each at its weight) into `base` and save the model at `out`: a diffusers folder,
    or a single-file checkpoint (LDM/SGM layout, what apps load as a main model) when `out` ends in .safetensors."""
    from conjure.export.convert import apply_lora
    from conjure.models.loading import load_base_model

    if not loras:
        raise ConjureError("give at least one LoRA file to bake")
    model = load_base_model(base)
    checked = [(lora, _checked(lora, model.family.name, model.components)) for lora in loras]
    baked = Baked(Path(out), model.family.name, {})
    for lora, read in checked:
        baked.modules[str(lora.path)] = apply_lora(model.components, read.weights, lora.weight)
        if read.bundled:
            baked.notes.append(bundle_note(lora.path, read.bundled))
    _save(model, out, save_dtype, loras)
    return baked


def _save(model: Any, out: Path, save_dtype: str, loras: list[LoraInput]) -> None:
    """A single-file checkpoint when `out` ends in .safetensors (export/single_file.py), else a diffusers folder
    (replaced atomically: a failed bake leaves what was there)."""
    import torch

    from conjure.export.lora import file_dtype
    from conjure.export.sharing import finish_shared_file
    from conjure.export.single_file import save_single_file
    from conjure.files import atomic_folder
    from conjure.models.tiny import save_model_folder

    fam = model.family
    if Path(out).suffix == ".safetensors":
        baked = "; ".join(f"{lora.path.name}:{lora.weight:g}" for lora in loras)
        save_single_file(model.components, out, fam, dtype=save_dtype, metadata={"conjure.baked_loras": baked})
        finish_shared_file(Path(out))  # its own hash
        return
    dtype = file_dtype(save_dtype)
    parts = {k: v.to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in model.components.items()}
    parts["scheduler"] = _own_scheduler(model.source, parts["scheduler"])
    parts = _pipeline_parts(fam, parts)
    atomic_folder(Path(out), lambda tmp: save_model_folder(fam.name, parts, tmp))
