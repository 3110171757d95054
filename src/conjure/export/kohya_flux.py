"""kohya names of FLUX.1 transformer modules and the q/k/v fusion, both ways (a family with `unet_naming="bfl"`).

kohya sd-scripts trains FLUX.1 on Black Forest Labs' own module layout (networks/lora_flux.py, library/flux_models.py),
where one Linear computes q, k and v together, so its LoRA files name BFL modules, `.` -> `_`, after `lora_unet_`:

    diffusers (FluxTransformer2DModel)              kohya
    transformer_blocks.N.attn.to_q / to_k / to_v    lora_unet_double_blocks_N_img_attn_qkv   (fused, rows q|k|v)
    transformer_blocks.N.attn.to_out.0              lora_unet_double_blocks_N_img_attn_proj
    transformer_blocks.N.ff.net.0.proj / ff.net.2   lora_unet_double_blocks_N_img_mlp_0 / _img_mlp_2
    transformer_blocks.N.norm1.linear               lora_unet_double_blocks_N_img_mod_lin
    ... attn.add_q/k/v_proj, to_add_out, ff_context, norm1_context: the same with `txt_`
    single_transformer_blocks.N.attn.to_q / to_k / to_v / proj_mlp
                                                    lora_unet_single_blocks_N_linear1        (fused, rows q|k|v|mlp)
    single_transformer_blocks.N.proj_out            lora_unet_single_blocks_N_linear2
    single_transformer_blocks.N.norm.linear         lora_unet_single_blocks_N_modulation_lin

The table is ComfyUI's (comfy/utils.py flux_to_diffusers) and diffusers' (loaders/lora_conversion_utils.py
_convert_kohya_flux_lora_to_diffusers); InvokeAI reads the same names (flux_kohya_lora_conversion_utils.py). The
model's final `proj_out` / `norm_out` (BFL `final_layer`) are never adapted and have no name here; the embedders
other tools adapt (`img_in`, `txt_in`, `time_in`, ...) are read, never written (see `_TOP_LEVEL`).

Fusion (split -> fused, exact): the members' `lora_down` stacked on dim 0, their `lora_up` block-diagonal, rank and
alpha multiplied by the number of members, so alpha / rank and every member's update stay the same (kohya's
networks/convert_flux_lora.py convert_to_sd_scripts_cat does the same with alpha = rank). A member the preset does
not adapt (single-block proj_mlp under `attention`) is a zero block of the same rank, so every fused layer is
block-diagonal in equal chunks: the layout diffusers' converter splits back into rank-r modules ("sparse").

Reading (fused -> split): a block-diagonal layer in equal chunks splits exactly (rank / k, alpha / k each; an
all-zero chunk is padding and is dropped). A dense fused layer (trained fused, as kohya does) gives every member the
whole `lora_down` and its rows of `lora_up` at the fused rank and alpha: the same update, so exact too, but writing
it back fuses k copies (rank k x R): the same function, not the same file.

DoRA: apps apply a fused layer's `dora_scale` [1, in] to the fused weight (ComfyUI comfy/weight_adapter/base.py
weight_decompose on the whole qkv / linear1 weight, InvokeAI's DoRALayer likewise): one norm per input column over
all of q, k, v(, mlp). Separate decompositions of the parts (a scale and a norm each) have no such form, so the
parts of a fused DoRA layer are one decomposition (`LoraModule.dora_group`, trained by adapters/dora.py
share_decomposition): written as one `dora_scale`, read back as that scale on every part. Parts with scales of
their own, or a DoRA on only some parts, are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from conjure.adapters import LoraModule
from conjure.errors import ConjureError

__all__ = ["FusedGroup", "flux_kohya_modules", "flux_module_paths", "flux_path_from_underscores", "flux_targets",
           "fused_parts"]

PREFIX = "lora_unet_"


@dataclass(frozen=True)
class FusedGroup:
    """One BFL Linear that computes several diffusers Linears side by side (rows in member order)."""

    suffix: str  # kohya name after `lora_unet_{double|single}_blocks_N_`
    members: tuple[str, ...]  # diffusers paths inside the block
    units: tuple[int, ...]  # each member's output width in units of the hidden size (single proj_mlp: mlp_ratio 4)


_DOUBLE_GROUPS = (
    FusedGroup("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    FusedGroup("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
)
_SINGLE_GROUPS = (FusedGroup("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, 4)),)
_DOUBLE_PLAIN = {
    "attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin", "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2", "norm1_context.linear": "txt_mod_lin",
}
_SINGLE_PLAIN = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
# diffusers block list -> (kohya block list, fused groups, one-to-one names)
_BLOCKS = {
    "transformer_blocks": ("double_blocks", _DOUBLE_GROUPS, _DOUBLE_PLAIN),
    "single_transformer_blocks": ("single_blocks", _SINGLE_GROUPS, _SINGLE_PLAIN),
}
_KOHYA_BLOCKS = {kohya: diffusers for diffusers, (kohya, _, _) in _BLOCKS.items()}
# Top-level modules other tools adapt (kohya's --network_args train_blocks / in_dims, ai-toolkit), read as diffusers'
# converter reads them; never written: InvokeAI's kohya FLUX reader (flux_kohya_lora_conversion_utils.py) takes
# block names only and would not recognise the file. The final layer (norm_out / proj_out) is read by none of the
# apps alike (InvokeAI skips it; diffusers swaps norm_out's halves): refused.
_TOP_LEVEL = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
}


def fused_parts(paths: list[str]) -> dict[str, tuple[str, ...]]:
    """Fused layer (its `dora_group` name, e.g. "transformer_blocks.0.img_attn_qkv") -> all its parts' diffusers
    paths, for every fused layer one of `paths` is part of (parts not in `paths` included)."""
    out: dict[str, tuple[str, ...]] = {}
    for path in paths:
        m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
        group = None if m is None else next((g for g in _BLOCKS[m.group(1)][1] if m.group(3) in g.members), None)
        if group is not None:
            prefix = f"{m.group(1)}.{int(m.group(2))}."
            out[prefix + group.suffix] = tuple(prefix + member for member in group.members)
    return out


def _split_path(path: str) -> tuple[str, int, str]:
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
    if m is None:
        why = " (InvokeAI reads block modules only)" if path in _TOP_LEVEL.values() else ""
        raise ConjureError(f"transformer module {path!r} has no kohya FLUX name that apps load{why}")
    return m.group(1), int(m.group(2)), m.group(3)


# ---------------------------------------------------------------------------------------------------------------
# split -> fused (writing)


def _fuse(name: str, group: FusedGroup, present: dict[str, LoraModule]) -> LoraModule:
    first = next(iter(present.values()))
    rank, alpha = first.rank, float(first.alpha)
    for member, m in present.items():
        if m.down.dim() != 2 or m.up.dim() != 2:
            raise ConjureError(f"transformer module {member!r}: a FLUX LoRA adapts Linear layers only")
        if m.rank != rank or float(m.alpha) != alpha:
            raise ConjureError(
                f"{name}: fusing needs one rank and alpha across {', '.join(group.members)} (found rank "
                f"{m.rank} alpha {m.alpha:g} beside rank {rank} alpha {alpha:g})"
            )
    dora_scale = _fused_dora_scale(name, group, present)
    unit = first.up.shape[0] // group.units[group.members.index(next(iter(present)))]
    downs, ups = [], []
    for member, units in zip(group.members, group.units):
        part = present.get(member)
        out = units * unit
        if part is not None and part.up.shape[0] != out:
            raise ConjureError(f"{name}: {member!r} has {part.up.shape[0]} outputs, expected {out} beside its group")
        # an absent member is a zero block of the same rank: the layer stays block-diagonal in equal chunks
        downs.append(part.down if part is not None else first.down.new_zeros(first.down.shape))
        ups.append(part.up if part is not None else first.up.new_zeros((out, rank)))
    return LoraModule(down=torch.cat(downs, 0), up=torch.block_diag(*ups), alpha=alpha * len(group.members),
                      dora_scale=dora_scale)


def _fused_dora_scale(name: str, group: FusedGroup, present: dict[str, LoraModule]) -> torch.Tensor | None:
    """The fused layer's `dora_scale`: apps decompose the fused weight as one, so the parts must all be there and
    share one decomposition (`LoraModule.dora_group`, adapters/dora.py share_decomposition); None without DoRA."""
    scales = [m.dora_scale for m in present.values() if m.dora_scale is not None]
    if not scales:
        return None
    first = next(iter(present.values()))
    shared = (
        len(scales) == len(group.members) == len(present)
        and first.dora_group is not None
        and all(m.dora_group == first.dora_group and torch.equal(m.dora_scale, scales[0]) for m in present.values())
    )
    if not shared:
        raise ConjureError(
            f"{name}: apps normalise the fused {group.suffix} weight as one ({', '.join(group.members)} together), "
            "so a DoRA there must be one decomposition shared by all its parts (dora_group), not one per part"
        )
    return scales[0]


def flux_kohya_modules(modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """kohya name -> module for the transformer's modules (diffusers paths -> `LoraModule`), fused as kohya writes."""
    out: dict[str, LoraModule] = {}
    pending: dict[tuple[str, int, FusedGroup], dict[str, LoraModule]] = {}
    for path, m in modules.items():
        blocks, index, inner = _split_path(path)
        kohya_blocks, groups, plain = _BLOCKS[blocks]
        group = next((g for g in groups if inner in g.members), None)
        if group is not None:
            pending.setdefault((blocks, index, group), {})[inner] = m
        elif inner in plain:
            out[f"{PREFIX}{kohya_blocks}_{index}_{plain[inner]}"] = m
        else:
            raise ConjureError(f"transformer module {path!r} has no kohya FLUX name that apps load")
    for (blocks, index, group), present in pending.items():
        name = f"{PREFIX}{_BLOCKS[blocks][0]}_{index}_{group.suffix}"
        ordered = {member: present[member] for member in group.members if member in present}
        out[name] = _fuse(name, group, ordered)
    return out


# ---------------------------------------------------------------------------------------------------------------
# fused -> split (reading)


def _block_diagonal(up: torch.Tensor, rows: list[int], k: int) -> bool:
    """Whether `up` is block-diagonal with k equal column chunks over the row blocks `rows` (diffusers' rule)."""
    if up.shape[1] % k:
        return False
    r, start = up.shape[1] // k, 0
    for i, height in enumerate(rows):
        block = up[start:start + height]
        if block[:, : i * r].any() or block[:, (i + 1) * r:].any():
            return False
        start += height
    return True


def _with_dora(parts: list[tuple[str, LoraModule]], m: LoraModule, group: str) -> list[tuple[str, LoraModule]]:
    """The parts of a fused DoRA layer: each carries the shared scale, decomposed together as `group`."""
    if m.dora_scale is None:
        return parts
    for _, part in parts:
        part.dora_scale, part.dora_group = m.dora_scale.clone(), group
    return parts


def _unfuse(name: str, prefix: str, group: FusedGroup, m: LoraModule) -> list[tuple[str, LoraModule]]:
    total = m.up.shape[0]
    if m.down.dim() != 2 or total % sum(group.units):
        raise ConjureError(
            f"{name}: lora_up has {total} rows, which do not split into {', '.join(group.members)} "
            f"({'+'.join(map(str, group.units))} x hidden size)"
        )
    rows = [u * total // sum(group.units) for u in group.units]
    ups = torch.split(m.up, rows, dim=0)
    k = len(group.members)
    out = []
    if _block_diagonal(m.up, rows, k):
        r = m.up.shape[1] // k
        for i, (member, up) in enumerate(zip(group.members, ups)):
            down, up = m.down[i * r:(i + 1) * r], up[:, i * r:(i + 1) * r]
            # an all-zero chunk is a member the writer padded in (a DoRA scales every part: all are kept)
            if down.any() or up.any() or m.dora_scale is not None:
                out.append((f"{prefix}{member}", LoraModule(down=down.clone(), up=up.clone(), alpha=m.alpha / k)))
    else:
        out = [
            (f"{prefix}{member}", LoraModule(down=m.down.clone(), up=up.clone(), alpha=m.alpha))
            for member, up in zip(group.members, ups)
        ]
    return _with_dora(out, m, prefix + group.suffix)


def _lookup(name: str) -> tuple[str, FusedGroup | None, str]:
    """(diffusers block prefix, fused group or None, one-to-one inner path) of kohya FLUX name `name`."""
    refusal = f"{name!r} is not a FLUX.1 module conjure reads (LoRA on the blocks' and embedders' linear layers)"
    if name.removeprefix(PREFIX) in _TOP_LEVEL:
        return "", None, _TOP_LEVEL[name.removeprefix(PREFIX)]
    hit = re.fullmatch(rf"{PREFIX}(double_blocks|single_blocks)_(\d+)_(.+)", name)
    if hit is None:
        raise ConjureError(refusal)
    blocks = _KOHYA_BLOCKS[hit.group(1)]
    prefix = f"{blocks}.{int(hit.group(2))}."
    _, groups, plain = _BLOCKS[blocks]
    group = next((g for g in groups if g.suffix == hit.group(3)), None)
    if group is not None:
        return prefix, group, ""
    inner = next((path for path, suffix in plain.items() if suffix == hit.group(3)), None)
    if inner is None:
        raise ConjureError(refusal)
    return prefix, None, inner


def flux_targets(name: str) -> tuple[str, ...]:
    """The diffusers paths kohya FLUX module `name` covers (a fused layer: all its members), without its tensors."""
    prefix, group, inner = _lookup(name)
    return tuple(prefix + member for member in group.members) if group is not None else (prefix + inner,)


def flux_module_paths(name: str, m: LoraModule) -> list[tuple[str, LoraModule]]:
    """(diffusers path, module) pairs of the kohya FLUX module `name` (a fused layer gives several). Raises
    ConjureError for names that are not FLUX transformer modules apps load."""
    prefix, group, inner = _lookup(name)
    if group is not None:
        return _unfuse(name, prefix, group, m)
    return [(prefix + inner, m)]


def flux_path_from_underscores(body: str) -> str | None:
    """A FLUX.1 transformer path from its diffusers path with `.` -> `_` (OneTrainer's `lora_transformer_` and
    SimpleTuner's `lycoris_` names; comfy/lora.py model_lora_keys_unet maps both), or None."""
    top = {path.replace(".", "_"): path for path in _TOP_LEVEL.values()}
    if body in top:
        return top[body]
    for blocks, (_, groups, plain) in _BLOCKS.items():
        hit = re.fullmatch(rf"{blocks}_(\d+)_(.+)", body)
        inners = {inner.replace(".", "_"): inner for inner in [*plain, *(m for g in groups for m in g.members)]}
        if hit and hit.group(2) in inners:
            return f"{blocks}.{int(hit.group(1))}.{inners[hit.group(2)]}"
    return None
