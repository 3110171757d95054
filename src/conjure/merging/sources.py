"""The models a merge reads, tensor by tensor, under diffusers' names per component (`unet`, `vae`, `text_encoder`,
`text_encoder_2`; text-encoder keys always under `text_model.`, as real folders have them).

A diffusers folder (or a hub id's cached snapshot folder) is read lazily from its safetensors files (one tensor
in memory at a time); `conjure lora extract` reads its models here too. Anything else that
`conjure.models.loading.load_base_model` reads (a single-file checkpoint, a hub id) is loaded whole through it, since
its tensors need converting first; it then stays in memory for the merge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conjure import families
from conjure.errors import ConjureError
from conjure.export.single_file import canonical_text_key, folder_prediction_type, weights_file
from conjure.families import Family


@dataclass
class Source:
    """One model to merge: its family, its UNet config, and per component the tensor names and shapes."""

    name: str
    family: Family
    unet_config: dict[str, Any]
    shapes: dict[str, dict[str, tuple[int, ...]]]
    prediction_type: str | None = None
    folder: Path | None = None  # a diffusers folder, read lazily
    loaded: Any = None  # a LoadedModel otherwise
    _files: dict[str, Any] = field(default_factory=dict)  # open safetensors files (memory-mapped)
    _states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _names: dict[str, dict[str, str]] = field(default_factory=dict)  # canonical -> the file's own key

    def components(self) -> tuple[str, ...]:
        return ("unet", "vae", *(slot.encoder for slot in self.family.text_encoders))

    def tensor(self, component: str, key: str) -> torch.Tensor:
        if component in self._states:
            return self._states[component][key]
        return self._files[component].get_tensor(self._names[component][key])


def _folder_source(name: str, folder: Path) -> Source:
    from safetensors import safe_open

    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConjureError(f"cannot read the model folder {name!r}: {exc}") from None
    fam = families.detect(unet_config, has_text_encoder_2=bool(index.get("text_encoder_2", [None])[0]))
    source = Source(name, fam, unet_config, {}, folder_prediction_type(folder), folder=folder)
    for component in source.components():
        path = weights_file(folder / component)
        try:
            f = source._files[component] = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors' own error types: a truncated or corrupt file
            raise ConjureError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        names, shapes = {}, {}
        for key in f.keys():
            canonical = canonical_text_key(key) if component.startswith("text_encoder") else key
            names[canonical] = key
            shapes[canonical] = tuple(f.get_slice(key).get_shape())
        source._names[component], source.shapes[component] = names, shapes
    return source


def _loaded_source(name: str, config: str | None) -> Source:
    from conjure.models.loading import load_base_model

    try:
        model = load_base_model(name, base_model_config=config)
    except ConjureError as exc:  # its hint names the training setting; here the same thing is --config
        raise ConjureError(str(exc).replace("basic.base_model_config", "--config")) from None
    if model.family.name not in families.unet_families():
        raise ConjureError(f"{name}: {model.family.title} models cannot be read here (SD 1.x, 2.x and SDXL can)")
    source = Source(name, model.family, dict(model.unet.config), {}, model.facts["prediction_type"].value, loaded=model)
    for component in source.components():
        state = model.components[component].state_dict()
        if component.startswith("text_encoder"):
            state = {canonical_text_key(k): v for k, v in state.items() if not k.endswith("position_ids")}
        source._states[component] = state
        source.shapes[component] = {k: tuple(v.shape) for k, v in state.items()}
    return source


def _cached_snapshot(name: str) -> Path | None:
    """A hub id's snapshot folder in the local cache (huggingface_hub, nothing downloaded), if there is one."""
    from huggingface_hub import snapshot_download

    from conjure.models.loading import HUB_ID

    if not HUB_ID.match(name) or Path(name).expanduser().exists():
        return None
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid id
        return None


def open_source(name: str, config: str | None = None) -> Source:
    """A model to read: a diffusers folder or a hub id's cached snapshot folder (read lazily), else a single file or
    hub id loaded whole (`config`: the diffusers folder or hub id a single file's configs come from, as
    basic.base_model_config)."""
    path = _cached_snapshot(name) or Path(name).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file() and (path / "unet").is_dir():
        return _folder_source(name, path)
    return _loaded_source(name, config)


def check_compatible(sources: list[Source]) -> None:
    """One family, and the same tensors with the same shapes in every model; else one line naming the difference."""
    first = sources[0]
    for other in sources[1:]:
        if other.family is not first.family:
            raise ConjureError(f"cannot merge models of different families: {first.name} is {first.family.title}, "
                               f"{other.name} is {other.family.title}")
        if None not in (first.prediction_type, other.prediction_type) and first.prediction_type != other.prediction_type:
            raise ConjureError(f"cannot merge models trained to predict different things: {first.name} predicts "
                               f"{first.prediction_type}, {other.name} {other.prediction_type}")
        for component in first.components():
            mine, theirs = first.shapes[component], other.shapes[component]
            if mine == theirs:
                continue
            odd = sorted(set(mine) ^ set(theirs)) or sorted(k for k in mine if mine[k] != theirs[k])
            raise ConjureError(f"cannot merge {first.name} and {other.name}: their {component}s differ "
                               f"(first at {odd[0]!r}: {mine.get(odd[0])} vs {theirs.get(odd[0])})")
