"""Kohya key names of adapted modules, both ways (FORMATS.md, "LoRA (kohya format)"); the family says which scheme.

`kohya_name(component, module_path, family, unet_config)` gives the name that prefixes a module's tensors in a
kohya file (`NAME.lora_down.weight`, ...); `module_path_from_kohya(name, family, unet_config)` reads it back.

- UNet, the family's `unet_naming="diffusers"` (SD 1.x/2.x): `lora_unet_` + the diffusers module path, `.` -> `_`.
- UNet, `unet_naming="ldm"` (SDXL): the original (LDM / SGM) module paths, as kohya sd-scripts writes them: down
  block i, layer j -> `input_blocks_{1+(L+1)i+j}`, its downsampler -> `input_blocks_{(L+1)(i+1)}_0_op`; mid block ->
  `middle_block_0/1/2`; up block i, layer j -> `output_blocks_{(L+1)i+j}`, its upsampler ->
  `output_blocks_{(L+1)i+L}_{2|1}_conv` (2 when the level has attention); resnets are part `_0_` with LDM part names
  (`in_layers_2`, `out_layers_3`, `emb_layers_1`, `skip_connection`), attentions part `_1_` with the diffusers names
  inside (`transformer_blocks_0_attn1_to_q`, `proj_in`, ...); top level: `input_blocks_0_0` (conv_in), `out_2`
  (conv_out), `time_embed_0/2`, `label_emb_0_0/0_2` (add_embedding). L = layers per block (2 in SDXL). Checked
  against diffusers' `convert_ldm_unet_checkpoint` and its kohya LoRA loader in tests/export/test_kohya_names.py.
- Text encoders: each slot's `kohya_prefix` (`lora_te_` for SD 1.x/2.x, `lora_te1_` / `lora_te2_` for SDXL) + the
  path under the old `text_model.` attribute: `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`.
  transformers 5's `CLIPTextModel` has no `text_model` attribute (its modules are `encoder.layers.0...`), while
  `CLIPTextModelWithProjection` keeps it; the names always contain `text_model_`.

The reader accepts both spellings for every family (diffusers paths and LDM paths for the UNet, with or without
`text_model_` for the text encoders), so files from other tools read too; the writer uses the one spelling every
app loads. Names that fit neither raise `ConjureError`.

The module paths returned for text encoders are "as the model names it": pass the model (or its module names)
to `module_path_from_kohya`, or leave it out to get the spelling of the installed transformers' class for that
encoder (`text_model.` prefix or not). `canonical_module_path` / `resolve_module_path` convert between spellings.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from conjure import families
from conjure.errors import ConjureError

__all__ = [
    "COMPONENTS",
    "SDXL_LAYOUT",
    "UnetLayout",
    "canonical_module_path",
    "kohya_name",
    "kohya_prefixes",
    "ldm_unet_path",
    "module_path_from_kohya",
    "resolve_module_path",
    "unet_layout",
]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_TEXT_MODEL = "text_model."


def kohya_prefixes(family: Any) -> dict[str, str]:
    """component -> kohya name prefix for `family`."""
    return families.get(family).kohya_prefixes()


# ---------------------------------------------------------------------------------------------------------------
# UNet layout (what the LDM numbering depends on)


@dataclass(frozen=True)
class UnetLayout:
    """The facts of a UNet's config that the LDM (SDXL) names depend on.

    layers_per_block: L in the index rule (2 in SD 1.x/2.x and SDXL).
    up_block_attention: per up block, whether it has attentions (decides `_2_conv` vs `_1_conv` for its upsampler);
    None: unknown, taken as True (real SDXL: the up blocks that have upsamplers have attention).
    """

    layers_per_block: int = 2
    up_block_attention: tuple[bool, ...] | None = None

    def up_has_attention(self, block: int) -> bool:
        if self.up_block_attention is None or block >= len(self.up_block_attention):
            return True
        return self.up_block_attention[block]


SDXL_LAYOUT = UnetLayout(2, tuple("CrossAttn" in t for t in families.SDXL.reference.up_blocks))


def _config_get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def unet_layout(unet_config: Any = None) -> UnetLayout:
    """A `UnetLayout` from a diffusers UNet config (FrozenDict, dict or object with attributes), a `UnetLayout`,
    or None (the real SDXL layout)."""
    if unet_config is None:
        return SDXL_LAYOUT
    if isinstance(unet_config, UnetLayout):
        return unet_config
    layers = _config_get(unet_config, "layers_per_block")
    if layers is None:
        layers = 2
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ConjureError(
                f"UNets with different layers per block ({list(layers)}) have no kohya (LDM) names; "
                "only the SD/SDXL layouts with one layer count are supported"
            )
        layers = layers[0]
    up_types = _config_get(unet_config, "up_block_types")
    attention = tuple("CrossAttn" in t for t in up_types) if up_types else None
    return UnetLayout(int(layers), attention)


# ---------------------------------------------------------------------------------------------------------------
# name tables (underscore form -> dotted diffusers form)

_RESNET_PARTS = {p: p for p in ("conv1", "conv2", "time_emb_proj", "conv_shortcut", "norm1", "norm2")}
_RESNET_TO_LDM = {
    "conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0",
}
_LDM_RESNET_PARTS = {v.replace(".", "_"): k for k, v in _RESNET_TO_LDM.items()}

_BLOCK_PARTS = {"ff_net_0_proj": "ff.net.0.proj", "ff_net_2": "ff.net.2"}
_BLOCK_PARTS.update({f"norm{i}": f"norm{i}" for i in (1, 2, 3)})
for _attn in ("attn1", "attn2"):
    for _proj in ("to_q", "to_k", "to_v"):
        _BLOCK_PARTS[f"{_attn}_{_proj}"] = f"{_attn}.{_proj}"
    _BLOCK_PARTS[f"{_attn}_to_out_0"] = f"{_attn}.to_out.0"

_UNET_TOP = {p.replace(".", "_"): p for p in (
    "conv_in", "conv_out", "conv_norm_out", "time_embedding.linear_1", "time_embedding.linear_2",
    "add_embedding.linear_1", "add_embedding.linear_2",
)}
_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
_LDM_TOP = {v.replace(".", "_"): k for k, v in _TOP_TO_LDM.items()}

_TE_LAYER_PARTS = {f"self_attn_{p}_proj": f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")}
_TE_LAYER_PARTS.update(
    {"mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2", "layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2"}
)


def _attention_rest(rest: str) -> str | None:
    """Underscore form of a path inside a Transformer2DModel -> dotted form, or None."""
    if rest in ("proj_in", "proj_out", "norm"):
        return rest
    m = re.fullmatch(r"transformer_blocks_(\d+)_(.+)", rest)
    if m and m.group(2) in _BLOCK_PARTS:
        return f"transformer_blocks.{int(m.group(1))}.{_BLOCK_PARTS[m.group(2)]}"
    return None


def _diffusers_unet_path(s: str) -> str | None:
    if s in _UNET_TOP:
        return _UNET_TOP[s]
    m = re.fullmatch(r"(down_blocks|up_blocks)_(\d+)_(resnets|attentions)_(\d+)_(.+)", s)
    if m:
        kind, rest = m.group(3), m.group(5)
        inner = _RESNET_PARTS.get(rest) if kind == "resnets" else _attention_rest(rest)
        return None if inner is None else f"{m.group(1)}.{int(m.group(2))}.{kind}.{int(m.group(4))}.{inner}"
    m = re.fullmatch(r"(down_blocks|up_blocks)_(\d+)_(downsamplers|upsamplers)_0_conv", s)
    if m and (m.group(1), m.group(3)) in (("down_blocks", "downsamplers"), ("up_blocks", "upsamplers")):
        return f"{m.group(1)}.{int(m.group(2))}.{m.group(3)}.0.conv"
    m = re.fullmatch(r"mid_block_(resnets|attentions)_(\d+)_(.+)", s)
    if m:
        kind, rest = m.group(1), m.group(3)
        inner = _RESNET_PARTS.get(rest) if kind == "resnets" else _attention_rest(rest)
        return None if inner is None else f"mid_block.{kind}.{int(m.group(2))}.{inner}"
    return None


def _ldm_input_path(index: int, part: int, rest: str, layout: UnetLayout) -> str | None:
    """`input_blocks_{index}_{part}_{rest}` -> dotted diffusers down-block path (None: not a UNet module)."""
    if index < 1:
        return None
    level, layer = divmod(index - 1, layout.layers_per_block + 1)
    if layer == layout.layers_per_block:  # the level's downsampler slot
        return f"down_blocks.{level}.downsamplers.0.conv" if (part, rest) == (0, "op") else None
    if part == 0 and rest in _LDM_RESNET_PARTS:
        return f"down_blocks.{level}.resnets.{layer}.{_LDM_RESNET_PARTS[rest]}"
    inner = _attention_rest(rest) if part == 1 else None
    return None if inner is None else f"down_blocks.{level}.attentions.{layer}.{inner}"


def _ldm_unet_path(s: str, layout: UnetLayout) -> str | None:
    if s in _LDM_TOP:
        return _LDM_TOP[s]
    per_level = layout.layers_per_block + 1
    m = re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", s)
    if m:
        return _ldm_input_path(int(m.group(1)), int(m.group(2)), m.group(3), layout)
    m = re.fullmatch(r"middle_block_(\d+)_(.+)", s)
    if m:
        part, rest = int(m.group(1)), m.group(2)
        if part in (0, 2) and rest in _LDM_RESNET_PARTS:
            return f"mid_block.resnets.{part // 2}.{_LDM_RESNET_PARTS[rest]}"
        inner = _attention_rest(rest) if part == 1 else None
        return None if inner is None else f"mid_block.attentions.0.{inner}"
    m = re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", s)
    if m:
        index, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, layer = divmod(index, per_level)
        if part in (1, 2) and rest == "conv":
            return f"up_blocks.{level}.upsamplers.0.conv" if layer == layout.layers_per_block else None
        if part == 0 and rest in _LDM_RESNET_PARTS:
            return f"up_blocks.{level}.resnets.{layer}.{_LDM_RESNET_PARTS[rest]}"
        inner = _attention_rest(rest) if part == 1 else None
        return None if inner is None else f"up_blocks.{level}.attentions.{layer}.{inner}"
    return None


def _text_path(s: str) -> str | None:
    """Underscore form after the `lora_te*_` prefix -> canonical dotted path (with `text_model.`)."""
    if s == "text_projection":
        return "text_projection"
    body = s[len("text_model_"):] if s.startswith("text_model_") else s
    m = re.fullmatch(r"encoder_layers_(\d+)_(.+)", body)
    if m and m.group(2) in _TE_LAYER_PARTS:
        return f"{_TEXT_MODEL}encoder.layers.{int(m.group(1))}.{_TE_LAYER_PARTS[m.group(2)]}"
    if body == "final_layer_norm":
        return f"{_TEXT_MODEL}final_layer_norm"
    return None


# ---------------------------------------------------------------------------------------------------------------
# text-encoder path spellings


def canonical_module_path(component: str, module_path: str) -> str:
    """The spelling kohya names are built from: UNet paths as they are; text-encoder paths under `text_model.`
    (except the top-level `text_projection` of CLIPTextModelWithProjection)."""
    if not component.startswith("text_encoder") or module_path.startswith((_TEXT_MODEL, "text_projection")):
        return module_path
    return _TEXT_MODEL + module_path


def _module_names(model: Any) -> Collection[str]:
    if hasattr(model, "named_modules"):
        return {name for name, _ in model.named_modules()}
    return model


def resolve_module_path(module_path: str, model: Any) -> str:
    """The spelling of `module_path` that `model` (an nn.Module, or a collection of its module names) uses:
    adds or strips `text_model.` as needed. Raises ConjureError when the model has no such module."""
    names = _module_names(model)
    if module_path in names:
        return module_path
    alt = module_path[len(_TEXT_MODEL):] if module_path.startswith(_TEXT_MODEL) else _TEXT_MODEL + module_path
    if alt in names:
        return alt
    raise ConjureError(f"the model has no module {module_path!r}")


@lru_cache(maxsize=None)
def _clip_keeps_text_model(with_projection: bool) -> bool:
    """Whether the installed transformers' CLIP text model class nests its modules under `text_model.`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        max_position_embeddings=4, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return any(name.startswith(_TEXT_MODEL) for name, _ in model.named_modules())


def default_module_path(component: str, canonical: str, family: Any) -> str:
    """The spelling the installed transformers gives `canonical` in `family`'s encoder class (SDXL's second
    encoder is a CLIPTextModelWithProjection, every other one a CLIPTextModel)."""
    if not canonical.startswith(_TEXT_MODEL):
        return canonical
    slot = families.get(family).slot(component)
    with_projection = slot is not None and slot.pooled
    return canonical if _clip_keeps_text_model(with_projection) else canonical[len(_TEXT_MODEL):]


# ---------------------------------------------------------------------------------------------------------------
# the two directions


def _canonical_from_kohya(name: str, family: str, layout: UnetLayout) -> tuple[str, str]:
    fam = families.get(family)
    readers = [(prefix, component) for component, prefix in fam.kohya_prefixes().items()]
    # some tools name a two-encoder family's first encoder like a one-encoder family's (SDXL's like SD 1.x's)
    readers.append((families.SD1.text_encoders[0].kohya_prefix, fam.text_encoders[0].encoder))
    for prefix, component in readers:
        if not name.startswith(prefix):
            continue
        body = name[len(prefix):]
        if component == "unet":
            path = _diffusers_unet_path(body) or _ldm_unet_path(body, layout)
        else:
            path = _text_path(body)
        if path is None:
            break
        return component, path
    else:
        owners = (f for f in families.FAMILIES.values() for s in f.text_encoders if name.startswith(s.kohya_prefix))
        owner = next(owners, None)
        if owner is not None:
            raise ConjureError(f"{name!r} is a {owner.title} text-encoder name, but the model family is {family}")
        raise ConjureError(
            f"{name!r} is not a kohya LoRA module name (expected a lora_unet_ or lora_te prefix for {family})"
        )
    raise ConjureError(f"cannot map kohya module name {name!r} to a {family} module")


def module_path_from_kohya(
    name: str, family_name: Any, unet_config: Any = None, *, model: Any = None
) -> tuple[str, str]:
    """(component, module path) for a kohya module name (without the `.lora_down.weight` suffix; a full key is
    cut at its first dot).

    unet_config: the UNet's config (or a `UnetLayout`) for SDXL's LDM numbering; default the real SDXL layout.
    model: the component's module (or its module names): the path is returned as that model spells it and must
    exist there. Without it, text-encoder paths take the installed transformers' spelling.
    """
    family = families.get(family_name).name
    component, canonical = _canonical_from_kohya(name.split(".", 1)[0], family, unet_layout(unet_config))
    if model is not None:
        return component, resolve_module_path(canonical, model)
    return component, default_module_path(component, canonical, family)


def _ldm_block_name(blocks: str, level: int, kind: str, layer: int, rest: str, layout: UnetLayout) -> str | None:
    """`{down|up}_blocks.{level}.{resnets|attentions}.{layer}.{rest}` -> LDM module path (None: no LDM name)."""
    per_level = layout.layers_per_block + 1
    if blocks == "down_blocks":
        if layer >= layout.layers_per_block:
            return None
        block = f"input_blocks.{1 + per_level * level + layer}"
    else:
        if layer > layout.layers_per_block:
            return None
        block = f"output_blocks.{per_level * level + layer}"
    if kind == "resnets":
        return f"{block}.0.{_RESNET_TO_LDM[rest]}" if rest in _RESNET_TO_LDM else None
    return f"{block}.1.{rest}"


def ldm_unet_path(path: str, unet_config: Any = None) -> str | None:
    """Dotted diffusers UNet module path -> the original (LDM / SGM) module path, `down_blocks.0.resnets.1.conv1`
    -> `input_blocks.2.0.in_layers.2` (None: no LDM name). kohya's SDXL names are these with `.` -> `_`; the
    single-file checkpoint (export/single_file.py) prefixes them with `model.diffusion_model.`.
    unet_config: as for `kohya_name`."""
    layout = unet_layout(unet_config)
    if path in _TOP_TO_LDM:
        return _TOP_TO_LDM[path]
    per_level = layout.layers_per_block + 1
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        return _ldm_block_name(m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5), layout)
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{per_level * (int(m.group(1)) + 1)}.0.op"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m:
        level = int(m.group(1))
        part = 2 if layout.up_has_attention(level) else 1
        return f"output_blocks.{per_level * level + layout.layers_per_block}.{part}.conv"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        index, rest = int(m.group(2)), m.group(3)
        if m.group(1) == "resnets":
            return f"middle_block.{2 * index}.{_RESNET_TO_LDM[rest]}" if index < 2 and rest in _RESNET_TO_LDM else None
        return f"middle_block.1.{rest}" if index == 0 else None
    return None


def kohya_name(component: str, module_path: str, family_name: Any, unet_config: Any = None) -> str:
    """Kohya module name (without the `.lora_down.weight` suffix) of `module_path` in `component`.

    unet_config: the UNet's config (or a `UnetLayout`) for SDXL's LDM numbering; default the real SDXL layout.
    Raises ConjureError for a module that has no name that apps load (e.g. a VAE path, a norm layer of an
    unknown kind) and for an unknown component.
    """
    family = families.get(family_name).name
    prefixes = kohya_prefixes(family)
    if component not in prefixes:
        raise ConjureError(f"{family} has no component {component!r} with kohya names (known: {', '.join(prefixes)})")
    layout = unet_layout(unet_config)
    canonical = canonical_module_path(component, module_path)
    if component == "unet" and families.get(family).unet_naming == "ldm":
        ldm = ldm_unet_path(canonical, layout)
        body = None if ldm is None else ldm.replace(".", "_")
    else:
        body = canonical.replace(".", "_")
    name = None if body is None else prefixes[component] + body
    # every name is checked by reading it back: a name the reader cannot map would not load in apps either
    if name is not None:
        try:
            back = _canonical_from_kohya(name, family, layout)
        except ConjureError:
            back = None
        if back == (component, canonical):
            return name
    raise ConjureError(f"{component} module {module_path!r} has no kohya name that apps load ({family})")
