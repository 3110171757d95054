"""`conjure lora combine A[:W] B[:W] ... --to OUT [--rank R]`: LoRAs of one family combined into one kohya file.

Exact by default: per module the ranks are concatenated, the `lora_down`s stacked and the `lora_up`s side by side,
each file's weight and alpha / rank folded into its `lora_up` columns, so

    up @ down = sum_i w_i * (alpha_i / r_i) * up_i @ down_i

the sum of the updates the files apply one after the other (plain LoRA updates add). A module in only some files
is kept with the ranks of those. The file gets one alpha (export/kohya.py `one_alpha`). `--rank R` then lowers
every module above R by SVD of the combined update (export/resize.py, `conjure convert --resize-rank`'s code).
DoRA files are refused: a DoRA layer renormalises W + update by its magnitude, a function of the whole update, so
two DoRA files applied in turn are not one DoRA of their summed updates.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conjure.adapters import LoraModule, LoraWeights
from conjure.errors import ConjureError
from conjure.export.resize import Resized
from conjure.export.kohya import one_alpha
from conjure.tools.lora_inputs import LoraInput, bundle_note, read_input

__all__ = ["Combined", "combine", "concatenated"]


@dataclass
class Combined:
    path: Path
    family: str
    ranks: dict[str, int] = field(default_factory=dict)  # module -> rank written
    resized: list[Resized] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left out (bundled embeddings)


def _stacked(key: tuple[str, str], parts: list[tuple[float, LoraModule]]) -> LoraModule:
    first = parts[0][1]
    downs, ups = [], []
    for weight, m in parts:
        if m.down.shape[1:] != first.down.shape[1:] and m.down[0].numel() != first.down[0].numel():
            raise ConjureError(f"{key[0]} module {key[1]!r}: the files' lora_down shapes {list(first.down.shape)} "
                               f"and {list(m.down.shape)} are for different layers")
        downs.append(m.down.to(torch.float32).reshape(m.rank, *first.down.shape[1:]))
        ups.append(m.up.to(torch.float32).reshape(m.up.shape[0], m.rank, *first.up.shape[2:]) * (weight * m.scale))
    down, up = torch.cat(downs), torch.cat(ups, dim=1)
    return LoraModule(down=down, up=up, alpha=float(down.shape[0]))


def concatenated(files: list[tuple[float, LoraWeights]]) -> LoraWeights:
    """The exact combination of (weight, weights) pairs (see the module docstring); alpha = rank per module."""
    by_module: dict[tuple[str, str], list[tuple[float, LoraModule]]] = collections.defaultdict(list)
    for weight, weights in files:
        for key, m in weights.items():
            by_module[key].append((weight, m))
    return {key: _stacked(key, parts) for key, parts in by_module.items()}


def _read(loras: list[LoraInput], notes: list[str]) -> tuple[list[tuple[float, LoraWeights]], str, dict[str, str]]:
    """Each file's (weight, weights), the family they share and the first file's metadata."""
    files: list[tuple[float, LoraWeights]] = []
    families_seen: dict[str, str] = {}
    meta: dict[str, str] = {}
    for lora in loras:
        read = read_input(lora)
        weights, family, header = read.weights, read.family, read.metadata
        if read.bundled:
            notes.append(bundle_note(lora.path, read.bundled))
        dora = [f"{c}.{p}" for (c, p), m in weights.items() if m.dora_scale is not None or m.magnitude is not None]
        if dora:
            raise ConjureError(
                f"{lora.path} is a DoRA file ({dora[0]} has a magnitude): DoRA files do not combine, since each "
                "renormalises its own W + update, and two renormalisations are not one of the summed updates"
            )
        families_seen[str(lora.path)] = family
        files.append((lora.weight, weights))
        meta = meta or header
    if len(set(families_seen.values())) > 1:
        raise ConjureError("the LoRAs are for different model families: "
                           + ", ".join(f"{path} {fam}" for path, fam in families_seen.items()))
    return files, next(iter(families_seen.values())), meta


def combine(loras: list[LoraInput], out: Path, *, rank: int | None = None, save_dtype: str = "fp16") -> Combined:
    """Combine `loras` into one kohya file at `out`; `rank`: resize to at most this rank by SVD."""
    from conjure.export.convert import cast_weights, fused_groups
    from conjure.export.kohya import layout_from_metadata, save_kohya
    from conjure.export.lora import file_dtype
    from conjure.export.resize import pad_fused, resize_weights
    from conjure.export.sharing import finish_shared_file

    if len(loras) < 2:
        raise ConjureError("give at least two LoRA files to combine")
    notes: list[str] = []
    files, family, first_meta = _read(loras, notes)
    weights = concatenated(files)
    result = Combined(Path(out), family, notes=notes)
    if rank is not None:
        weights, result.resized = resize_weights(weights, rank, None)
    weights, alpha = one_alpha(pad_fused(weights, fused_groups(weights, family)))
    weights = cast_weights(weights, file_dtype(save_dtype))  # refuses values beyond float16's range
    result.ranks = {f"{c}.{p}": m.rank for (c, p), m in weights.items()}
    layout = layout_from_metadata(first_meta)  # a tiny or unusual SDXL UNet's layout, for the LDM names
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(result.ranks.values())),
        "ss_network_alpha": str(alpha),
        "ss_training_comment": "combined by conjure lora combine: " + ", ".join(
            f"{lora.path.name}:{lora.weight:g}" for lora in loras),  # names: a shared file tells no folders
    }
    save_kohya(Path(out), weights, meta, family, layout, dtype=None)
    finish_shared_file(Path(out))  # its own hashes
    return result
