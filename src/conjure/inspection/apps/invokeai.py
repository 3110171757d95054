"""InvokeAI's LoRA probe and loader, restated as rules (read from invoke-ai/InvokeAI at 8e71a8a5, version
6.14.0-alpha, 2026-08):

- Probe (backend/model_manager/configs/lora.py, LoRA_LyCORIS_Config_Base): a FLUX.1 file must match one of the
  FLUX formats (lora_conversions/formats.py flux_format_from_state_dict; kohya: every key matches
  flux_kohya_lora_conversion_utils' regexes; diffusers: every key ends in lora_A/lora_B/lora.down/lora.up and
  `transformer.single_transformer_blocks.0.attn.to_q` and `transformer.transformer_blocks.0.attn.add_q_proj` are
  there); a kohya FLUX file whose `img_attn_proj` input is not FLUX.1's width is taken for FLUX.2
  (_is_flux2_lora_state_dict). Otherwise the base comes from backend/model_manager/util/model_util.py
  lora_token_vector_length (the in-width of the first `attn2_to_k/v` or `time_emb_proj` lora_down, or of the text
  encoders' self-attention: 768 sd-1, 1024 sd-2, 1280 / 768+1280 sdxl), then _state_dict_looks_like_sdxl_unet_lora.
- Loading (backend/model_manager/load/model_loaders/lora.py): `bundle_emb*` keys are dropped; SD 1.x/2.x keys are
  grouped at their first dot (sd_lora_conversion_utils._group_state) and must form a LoRA/LoHa/LoKr/full/IA3/norm
  layer (layers/utils.py any_lora_layer_from_state_dict, "Unsupported lora format" otherwise), then patched by
  flattened name with the prefixes `lora_unet_` / `lora_te_` (layer_patcher.py: "Failed to find module" skips the
  layer); SDXL keys go through sdxl_lora_conversion_utils.convert_sdxl_keys_to_diffusers_format, which accepts
  `lora_unet_` / `lora_te1_` / `lora_te2_` only and refuses a file with both LDM and diffusers UNet names.
- DoRA (layers/dora_layer.py DoRALayer.get_weight): always the per-input-column norm: `[1, in]` only.
"""

from __future__ import annotations

import re

from conjure.inspection.apps.rules import bundles_ignored, embedding_widths, family_of, modules_where
from conjure.inspection.model import DROPPED, REFUSED, WRONG, Finding, Inspection, Module

NAME = "InvokeAI"
VERSION = "invoke-ai/InvokeAI 6.14.0-alpha (8e71a8a5)"

_LORA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_", "lora_transformer_")
_LORA_SUFFIXES = ("to_k_lora.up.weight", "to_q_lora.down.weight", "lora_A.weight", "lora_B.weight", "lokr_w1",
                  "lokr_w2", "hada_w1_a", "hada_w2_a")
# flux_kohya_lora_conversion_utils.py FLUX_KOHYA_*_KEY_REGEX
_FLUX_KOHYA = (
    r"lora_unet_(\w+_blocks)_(\d+)_(img_attn|img_mlp|img_mod|txt_attn|txt_mlp|txt_mod|linear1|linear2|modulation)_?(.*)",
    r"lora_unet_final_layer_(linear|linear1|linear2)_?(.*)",
    r"lora_te1_text_model_encoder_layers_(\d+)_(mlp|self_attn)_(\w+)\.?.*",
    r"lora_te2_encoder_block_(\d+)_layer_(\d+)_(DenseReluDense|SelfAttention)_(\w+)_?(\w+)?\.?.*",
)
_FLUX_DIFFUSERS_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora.down.weight", "lora.up.weight")
_FLUX_DIFFUSERS_KEYS = tuple(
    f"transformer.{path}.{part}.weight" for path in ("single_transformer_blocks.0.attn.to_q",
                                                      "transformer_blocks.0.attn.add_q_proj") for part in ("lora_A", "lora_B")
)
# lora_token_vector_length -> base; the base names are conjure's families
_BASE_BY_WIDTH = {768: "sd1", 1024: "sd2", 1280: "sdxl", 2048: "sdxl"}
_SDXL_UNET_ATTENTION = re.compile(
    r"^lora_unet_(?:(?:down_blocks|up_blocks)_\d+_attentions_\d+|mid_block_attentions_\d+"
    r"|(?:input_blocks|output_blocks)_\d+_\d+|middle_block_\d+)_transformer_blocks_(\d+)_"
)


def _width_of(key: str, insp: Inspection) -> int | None:
    """model_util.lora_token_vector_length's _get_shape_1 over shapes: the in-width a key tells."""
    module, _, part = key.partition(".")
    shape = insp.shapes[key]
    if part in ("lora_down.weight", "hada_w1_b", "hada_w2_b", "diff"):
        return shape[1] if len(shape) > 1 else None
    if "lokr_" in part:
        w1 = insp.shapes.get(module + ".lokr_w1")
        w2 = insp.shapes.get(module + ".lokr_w2")
        return w1[1] * w2[1] if w1 and w2 else None
    return None


def token_vector_length(insp: Inspection) -> int | None:
    te1 = te2 = None
    for key in sorted(insp.shapes):  # safetensors headers list keys sorted; the first that tells wins
        length = None
        if key.startswith("lora_unet_") and ("_attn2_to_k." in key or "_attn2_to_v." in key
                                             or "time_emb_proj.lora_down" in key):
            length = _width_of(key, insp)
        elif key.startswith("lora_te") and "_self_attn_" in key:
            width = _width_of(key, insp)
            if key.startswith("lora_te_"):
                length = width
            elif key.startswith("lora_te1_"):
                te1 = width
            elif key.startswith("lora_te2_"):
                te2 = width
        if te1 is not None and te2 is not None:
            length = te1 + te2
        if length is not None:
            return length
    return None


def _flux_format(insp: Inspection) -> str | None:
    keys = list(insp.shapes)
    if all(any(re.match(p, k) for p in _FLUX_KOHYA) for k in keys):
        return "kohya"
    if all(k.endswith(_FLUX_DIFFUSERS_SUFFIXES) for k in keys) and all(k in insp.shapes for k in _FLUX_DIFFUSERS_KEYS):
        return "diffusers"
    return None


def _flux_probe(insp: Inspection) -> list[Finding]:
    fmt = _flux_format(insp)
    if fmt is None:
        return [Finding(REFUSED, "not one of the FLUX LoRA formats InvokeAI detects (formats.py "
                        "flux_format_from_state_dict: every key kohya-named, or lora_A/lora_B with the first single "
                        "and double blocks' q)", tuple(insp.shapes))]
    ref = family_of(insp).reference
    width = getattr(ref, "num_attention_heads", 0) * getattr(ref, "attention_head_dim", 0)
    bad = [k for k, s in insp.shapes.items()
           if k.endswith("_img_attn_proj.lora_down.weight") and len(s) == 2 and s[1] != width]
    if fmt == "kohya" and bad:
        return [Finding(REFUSED, f"img_attn_proj input is not {width} wide: configs/lora.py _is_flux2_lora_state_dict "
                        "takes the file for FLUX.2", tuple(bad))]
    return []


def _sd_probe(insp: Inspection) -> list[Finding]:
    keys = list(insp.shapes)
    if not any(k.startswith(_LORA_PREFIXES) for k in keys) and not any(k.endswith(_LORA_SUFFIXES) for k in keys):
        return [Finding(REFUSED, "no kohya prefix or LoRA suffix: not identified as a LoRA", tuple(keys))]
    length = token_vector_length(insp)
    base = _BASE_BY_WIDTH.get(length or 0)
    if base is None and any((m := _SDXL_UNET_ATTENTION.match(k)) and int(m.group(1)) >= 2 for k in keys):
        base = "sdxl"
    if base is None:
        return [Finding(REFUSED, f"base not identified (token vector length {length}): the LoRA has no cross-attention "
                        "to_k/to_v, time_emb_proj or text-encoder self-attention of a real model's width",
                        tuple(keys))]
    if insp.family_certain and base != insp.family:
        return [Finding(REFUSED, f"identified as {base} (token vector length {length}), not {insp.family}: offered "
                        f"only with {base} models", tuple(keys))]
    return []


def _probe(insp: Inspection) -> list[Finding]:
    if insp.is_embedding:
        return []
    return _flux_probe(insp) if family_of(insp).unet_naming == "bfl" else _sd_probe(insp)


def _layers(insp: Inspection) -> list[Finding]:
    """SD 1.x/2.x: keys grouped at their first dot must form a layer; SDXL: the converter's key checks."""
    fam = family_of(insp)
    if insp.is_embedding or fam.unet_naming == "bfl":
        return []
    lora = [k for k in insp.shapes if not k.startswith("bundle_emb")]
    prefixes = tuple(fam.kohya_prefixes().values())
    foreign = [k for k in lora if not k.startswith(prefixes)]
    if fam.unet_naming == "ldm" and foreign:
        return [Finding(REFUSED, "convert_sdxl_keys_to_diffusers_format: unrecognized SDXL LoRA key prefix", tuple(foreign))]
    unet = [m for m in insp.modules if m.component == fam.denoiser and m.naming.startswith("kohya")]
    if fam.unet_naming == "ldm" and len({m.naming for m in unet}) > 1:
        return [Finding(REFUSED, "both LDM and diffusers UNet names: convert_sdxl_keys_to_diffusers_format refuses a "
                        "partial conversion", tuple(k for m in unet for k in m.keys))]
    ungrouped = [m for m in insp.modules if "." in m.name or m.spelling != "kohya"]
    if ungrouped:
        return [Finding(REFUSED, "keys that do not group into `NAME.lora_down.weight`-style layers: "
                        "any_lora_layer_from_state_dict raises \"Unsupported lora format\"",
                        tuple(k for m in ungrouped for k in m.keys))]
    return []


def _unpatched(insp: Inspection) -> list[Finding]:
    """SD 1.x/2.x layers whose flattened names find no module of the diffusers UNet / CLIP (layer_patcher.py)."""
    fam = family_of(insp)
    if fam.unet_naming != "diffusers":
        return []

    def why(m: Module) -> str | None:
        if "." in m.name or m.spelling != "kohya":
            return None  # refused whole by _layers
        if not m.name.startswith(tuple(fam.kohya_prefixes().values())):
            return f"prefix is not one of {fam.title}'s (lora_unet_, lora_te_): the layer patcher skips it"
        if m.naming == "kohya-ldm" or m.component is None:
            return "no module of the diffusers UNet/CLIP has this flattened name (LDM names): \"Failed to find module\""
        if m.component != fam.denoiser and "_text_model_" not in m.name:
            return "text-encoder name without text_model: \"Failed to find module\""
        return None
    return modules_where(insp, DROPPED, why)


def _dora(insp: Inspection) -> list[Finding]:
    out = modules_where(insp, WRONG, lambda m: (
        "dora_scale is not [1, in]: DoRALayer always normalises input columns, so it applies wrongly"
        if m.dora_orientation in ("out", "flat") else None))
    out += modules_where(insp, REFUSED, lambda m: (
        "dora_scale of no usable shape: DoRALayer.get_weight fails" if m.dora_orientation == "bad" else None))
    return out + [Finding(DROPPED, "PEFT DoRA magnitude: InvokeAI's diffusers-format readers take lora_A/lora_B only",
                          (m.parts["magnitude"],)) for m in insp.modules if "magnitude" in m.parts]


RULES = (
    _probe,
    _layers,
    _unpatched,
    _dora,
    bundles_ignored("InvokeAI drops bundle_emb keys when it loads a LoRA (model_loaders/lora.py); install the "
                    "embedding file too"),
    embedding_widths(NAME),
)
