"""`merge_models`: two or more models of one family merged tensor by tensor (formulas.py) into a diffusers folder or
a single-file checkpoint (export/single_file.py).

Streaming: for each tensor name, every model's tensor of that name is read (a diffusers folder's from its
memory-mapped file), merged in float32 and kept in the save dtype; a folder is written component by component, so
at most one component's merged tensors wait in memory (a single file holds them all, so it waits for all).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from conjure.errors import ConjureError
from conjure.export.lora import file_dtype
from conjure.export.sharing import finish_shared_file, model_name
from conjure.export.single_file import save_single_file, weights_file
from conjure.files import atomic_folder
from conjure.merging import METHODS, formulas
from conjure.merging.sources import Source, check_compatible, open_source

_NEEDS_BASE = ("add-difference", "ties", "dare")
_DEFAULT_DENSITY = {"ties": formulas.TIES_DENSITY, "dare": formulas.DARE_DENSITY}


@dataclass(frozen=True)
class MergeRecipe:
    """How the models are merged (the help of `conjure merge` says what each field means per method)."""

    method: str
    weights: tuple[float, ...] | None = None  # None: equal (lerp, slerp) or 1 each (the others)
    density: float | None = None  # ties/dare: None is the method's published default
    lam: float | None = None  # ties/dare: scale of the merged task vector, default 1
    seed: int | None = None  # dare: the drop masks' seed, default 0

    def resolved(self, models: int, has_base: bool) -> MergeRecipe:
        """The recipe with every default filled in, or ConjureError naming the option that does not fit."""
        if self.method not in METHODS:
            raise ConjureError(f"--method: {self.method!r} is not one of {', '.join(METHODS)}")
        if (self.method in _NEEDS_BASE) != has_base:
            raise ConjureError(f"--base: {self.method} {'needs' if self.method in _NEEDS_BASE else 'takes no'} base model")
        least = {"slerp": 2, "lerp": 2, "add-difference": 2}.get(self.method, 1)
        if models < least or (self.method == "slerp" and models != 2):
            raise ConjureError(f"{self.method} merges {'exactly' if self.method == 'slerp' else 'at least'} {least} "
                               f"models; {models} given")
        if self.method not in _DEFAULT_DENSITY and (self.density, self.lam) != (None, None):
            raise ConjureError(f"--density and --lambda apply to ties and dare, not {self.method}")
        if self.method != "dare" and self.seed is not None:
            raise ConjureError(f"--seed applies to dare, not {self.method}")
        count = models - 1 if self.method == "add-difference" else models
        weights = self.weights or ((1.0 / count,) * count if self.method in ("lerp", "slerp") else (1.0,) * count)
        if len(weights) != count:
            raise ConjureError(f"--weights: {self.method} of {models} models takes {count} weights, {len(weights)} given"
                               + (" (one per model after the first)" if self.method == "add-difference" else ""))
        if self.method in ("lerp", "slerp"):
            if min(weights) < 0 or sum(weights) <= 0:
                raise ConjureError(f"--weights: {self.method} needs weights >= 0 with a positive sum")
            weights = tuple(w / sum(weights) for w in weights)  # the help says so; the CLI prints them
        density = self.density if self.density is not None else _DEFAULT_DENSITY.get(self.method)
        if density is not None and not 0 < density <= 1:
            raise ConjureError(f"--density must be in (0, 1], not {density}")
        lam = self.lam if self.lam is not None else (1.0 if density is not None else None)
        seed = self.seed if self.seed is not None else (0 if self.method == "dare" else None)
        return MergeRecipe(self.method, tuple(weights), density, lam, seed)

    def apply(self, name: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        """Merge one tensor name's tensors (float32) of a resolved recipe."""
        weights = self.weights or ()
        if self.method == "lerp":
            return formulas.lerp(tensors, weights)
        if self.method == "slerp":
            return formulas.slerp(tensors[0], tensors[1], weights[1] / sum(weights))
        assert base is not None  # resolved() made sure
        if self.method == "add-difference":
            return formulas.add_difference(tensors[0], tensors[1:], base, weights)
        assert self.density is not None and self.lam is not None
        if self.method == "ties":
            return formulas.ties(base, tensors, weights, density=self.density, lam=self.lam)
        return formulas.dare(base, tensors, weights, name=name, density=self.density, lam=self.lam, seed=self.seed or 0)


@dataclass(frozen=True)
class MergeResult:
    path: Path
    family: str
    recipe: MergeRecipe
    tensors: int
    seconds: float


def _merged(recipe: MergeRecipe, sources: list[Source], base: Source | None, component: str,
            dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for key in sources[0].shapes[component]:
        first = sources[0].tensor(component, key)
        if not first.is_floating_point():  # integer buffers (older text encoders' position_ids) are not weights
            out[key] = first
            continue
        tensors = [first.float()] + [s.tensor(component, key).float() for s in sources[1:]]
        merged = recipe.apply(key, tensors, base.tensor(component, key).float() if base else None)
        out[key] = merged.to(dtype or first.dtype).contiguous()
        del tensors, merged
    return out


def _write_template(template: Source, tmp: Path) -> None:
    """The template model's folder without the weights that will be merged (configs, tokenizers, scheduler)."""
    from conjure.models.tiny import save_model_folder

    if template.folder is not None:
        merged = set(template.components())

        def skip(folder: str, names: list[str]) -> list[str]:
            if Path(folder).name not in merged:
                return []
            return [n for n in names if n.endswith((".safetensors", ".bin"))]

        shutil.copytree(template.folder, tmp, ignore=skip, dirs_exist_ok=True)
        return
    parts = dict(template.loaded.components, feature_extractor=None, image_encoder=None)
    if template.family.safety_checker:
        parts["safety_checker"] = None
    save_model_folder(template.family.name, parts, tmp)


def _write_folder(out: Path, recipe: MergeRecipe, sources: list[Source], base: Source | None,
                  dtype: torch.dtype | None) -> int:
    from safetensors.torch import save_file

    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        _write_template(sources[0], tmp)
        for component in sources[0].components():
            folder = tmp / component
            folder.mkdir(exist_ok=True)
            template = sources[0].folder / component if sources[0].folder else folder
            # the plain name: the merge is in --save-dtype, whichever variant the template had
            target = folder / weights_file(template).name.replace(".fp16.", ".")
            merged = _merged(recipe, sources, base, component, dtype)
            count += len(merged)
            save_file(merged, str(target), metadata={"format": "pt"})  # transformers reads "format"
            del merged

    atomic_folder(out, write)
    return count


def merge_models(models: list[str], out: Path, recipe: MergeRecipe, *, base: str | None = None,
                 config: str | None = None, save_dtype: str = "fp16", force: bool = False) -> MergeResult:
    """Merge `models` (diffusers folders, single files or hub ids; the first is the template whose configs,
    tokenizers and scheduler the output gets) into `out`: a `.safetensors` single file, else a diffusers folder.
    `config`: the diffusers folder or hub id single-file inputs take their configs from (offline they need one)."""
    started = time.perf_counter()
    recipe = recipe.resolved(len(models), base is not None)
    out = Path(out)
    inputs = [Path(m).expanduser().resolve() for m in [*models, *([base] if base else [])]]
    if out.expanduser().resolve() in inputs:
        raise ConjureError(f"--to {out} is one of the models being merged; write the merge somewhere else")
    if out.exists() and not force:
        raise ConjureError(f"{out} exists; use --force to replace it")
    sources = [open_source(m, config) for m in models]
    base_source = open_source(base, config) if base else None
    check_compatible(sources + ([base_source] if base_source else []))
    dtype = file_dtype(save_dtype)
    fam = sources[0].family
    if out.suffix.lower() == ".safetensors":
        states = {c: _merged(recipe, sources, base_source, c, dtype) for c in sources[0].components()}
        count = sum(len(s) for s in states.values())
        names = {"models": [model_name(m) for m in models], "base": model_name(base) if base else None}
        meta = {"conjure.merge": json.dumps({**names, **asdict(recipe)})}
        save_single_file(states, out, fam, dtype=dtype, metadata=meta, prediction_type=sources[0].prediction_type,
                         unet_config=sources[0].unet_config)
        finish_shared_file(out)  # its own hash
    else:
        count = _write_folder(out, recipe, sources, base_source, dtype)
    return MergeResult(out, fam.name, recipe, count, time.perf_counter() - started)


def describe(recipe: MergeRecipe) -> str:
    """The resolved recipe in one line, as the CLI prints it."""
    parts: list[Any] = [recipe.method, f"weights {', '.join(f'{w:g}' for w in recipe.weights or ())}"]
    if recipe.density is not None:
        parts.append(f"density {recipe.density:g}, lambda {recipe.lam:g}")
    if recipe.seed is not None:
        parts.append(f"seed {recipe.seed}")
    return "; ".join(str(p) for p in parts)
