"""A FLUX.1 transformer read into its meta-built model a block at a time, each block's Linear layers quantised
(`advanced.base_weights_dtype`: quantize.quantize_frozen) as soon as the block is filled, so neither the whole
transformer in the run's dtype (FLUX.1-dev: 23.8 GB in bf16) nor a whole-file dict ever exists: the peak is the
quantised model (11.9 GB in float8) and one block in the run's dtype (a double-stream block: 0.68 GB in bf16).

A block is a file's `name.N.` keys (BFL's `double_blocks.3.`, diffusers' `transformer_blocks.3.`); every other
key (embedders, final layer) is one more group. Each group is read tensor by tensor in the run's dtype
(single_file.CheckpointTensors: plain reads, no memory map whose touched pages would count as resident):
- a diffusers folder or hub id: the transformer's .safetensors file(s), one or the shards its index names, with
  diffusers' key names;
- a single file in BFL's layout (flux1-dev.safetensors, bare or under ComfyUI's prefix): renamed by diffusers' own
  converter (diffusers 0.42 loaders/single_file_utils.py, convert_flux_transformer_checkpoint_to_diffusers, which
  `FluxTransformer2DModel.from_single_file` runs on the whole file), run once per group on the file's names in
  which only that group's tensors are real and every other one is a meta tensor of its header's shape: the
  converter's chunk/cat of meta tensors costs nothing, and it splits and fuses within a block only (a real and a
  meta tensor in one cat would raise), so the group's real outputs are its part of the whole conversion.
The layers a block's group fills are converted once the group is read (each unit: a top-level child of the
transformer, or one element of its block lists); place_model then converts nothing twice (quantize_frozen skips
converted layers). Anything else (a .bin folder, no .safetensors) loads whole as before and place_model converts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from conjure.errors import ConjureError

Reader = Callable[[list[str]], dict[str, Any]]


def groups(keys: list[str], prefix: str = "") -> list[list[str]]:
    """`keys` a block at a time (module docstring), in the file's block order; `prefix` (ComfyUI's) is skipped."""
    by_block: dict[tuple[str, int], list[str]] = {}
    rest = []
    for key in keys:
        head, _, tail = key.removeprefix(prefix).partition(".")
        index = tail.partition(".")[0]
        if index.isdigit():
            by_block.setdefault((head, int(index)), []).append(key)
        else:
            rest.append(key)
    return [by_block[block] for block in sorted(by_block)] + ([rest] if rest else [])


def stream_into(model: Any, keys: list[str], read: Reader, choice: str, source: str, prefix: str = "") -> Any:
    """Fill the meta-built `model` from `read` (names -> its tensors under the model's names) a group of `keys` at
    a time, converting each filled unit's Linear layers to `choice` on the CPU at once (module docstring)."""
    import torch

    from conjure.models.quantize import quantize_frozen
    from conjure.models.single_file import filled

    by_name = dict(units(model))
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for group in groups(keys, prefix):
        state = read(group)
        unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise ConjureError(f"cannot load checkpoint {source!r}: the transformer has no {unexpected[0]!r}")
        touched = {_unit_of(name, by_name) for name in state}
        del state
        for name in sorted(touched):
            unit = by_name[name]
            if not any(p.is_meta for p in unit.parameters()):
                quantize_frozen(unit, choice, torch.device("cpu"), keep=keep)
    return filled(model, "transformer", Path(source)).eval()


def units(model: Any) -> list[tuple[str, Any]]:
    """The transformer's top-level children, its block lists split into their blocks."""
    import torch

    out = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            out += [(f"{name}.{i}", block) for i, block in enumerate(child)]
        else:
            out.append((name, child))
    return out


def _unit_of(key: str, units: dict[str, Any]) -> str:
    head, _, tail = key.partition(".")
    block = f"{head}.{tail.partition('.')[0]}"
    return block if block in units else head


def folder_reader(folder: Path, variant: str | None, dtype: Any) -> tuple[list[str], Reader] | None:
    """The transformer folder's weights (one .safetensors file, or the shards its index names): their keys and a
    reader in `dtype`; None where it has neither (for from_pretrained)."""
    import json

    from conjure.models.loading import weight_files
    from conjure.models.single_file import CheckpointTensors

    name, index = weight_files(variant)
    if (folder / index).is_file():
        files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
    elif (folder / name).is_file():
        files = [name]
    else:
        return None
    shards = [CheckpointTensors(folder / file) for file in files]
    where = {key: shard for shard in shards for key in shard.keys}

    def read(names: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for shard in shards:
            out.update(shard.read([n for n in names if where[n] is shard], dtype))
        return out

    return sorted(where), read


def bfl_reader(tensors: Any, names: list[str], dtype: Any) -> Reader:
    """A reader of a BFL-layout file's groups under diffusers' names (module docstring)."""
    import torch
    from diffusers.loaders import single_file_utils

    from conjure.models.single_file import SAFETENSORS_DTYPES

    def meta(name: str) -> Any:
        entry = tensors.header[name]
        stored = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
        return torch.empty(entry["shape"], dtype=dtype if stored.is_floating_point else stored, device="meta")

    shapes = {name: meta(name) for name in names}

    def read(group: list[str]) -> dict[str, Any]:
        checkpoint = {**shapes, **tensors.read(group, dtype)}
        converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
        return {k: v for k, v in converted.items() if not v.is_meta}

    return read
