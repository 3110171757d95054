"""ComfyUI's LoRA loader, restated as rules (read from Comfy-Org/ComfyUI at ec93dcac, comfy/lora.py; comfy/
lora_convert.py at 2bffe2f4; comfy/weight_adapter/lora.py at 6f98b150; late 2026).

- Names: `model_lora_keys_unet` / `model_lora_keys_clip` build the only names that load: `lora_unet_` + the UNet's
  own (LDM) or diffusers paths (utils.unet_to_diffusers), `lycoris_` + diffusers paths, and diffusers' attention-
  processor names with or without `unet.` (`attn1.processor.to_q`: a PEFT name `unet....attn1.to_q` is not among
  them); FLUX: `lora_unet_` + BFL paths, `transformer.` / `lycoris_` / `lora_transformer_` + diffusers paths;
  CLIP: `lora_te_` / `lora_te1_` / `lora_te2_` + `text_model_encoder_layers_N_` + q/k/v/out_proj, mlp_fc1/2
  (LORA_CLIP_MAP) and `text_encoder(_2).text_model.encoder.layers.N....`. Anything else: "lora key not loaded".
- Parts: `load_lora` tries every weight adapter (LoRA in any spelling incl. lora_A/lora_B, LoHa, LoKr, GLoRA,
  OFT/BOFT, diff); DoRA only from `.dora_scale` (LoRAAdapter.load) - a PEFT `lora_magnitude_vector` is left over.
- DoRA: weight_adapter/base.py weight_decompose takes a scale whose first dim is the weight's out for a per-row
  decomposition, any other for per-column; a 1-D `[out]` broadcasts over the inputs (wrong).
- Alpha: only from `.alpha` tensors (load_lora); no alpha means scale 1 - diffusers' adapter config in the header
  is not read (utils.load_torch_file returns no metadata to it).
- Bundled embeddings (`bundle_emb.*`) are not read by the LoRA loader (sd1_clip.py reads them only from an
  embedding file in models/embeddings).
"""

from __future__ import annotations

from conjure.inspection.apps.rules import (
    CLIP_LAYER,
    bundles_ignored,
    embedding_widths,
    family_of,
    modules_where,
    slot_kind,
    unknown_keys_dropped,
)
from conjure.inspection.model import DROPPED, WRONG, Finding, Inspection, Module

NAME = "ComfyUI"
VERSION = "Comfy-Org/ComfyUI ec93dcac (2026)"

# name spellings model_lora_keys_unet maps for a UNet family / a FLUX.1 (BFL-named) one
_UNET_NAMINGS = {"kohya", "kohya-ldm", "lycoris", "attn-procs", "bfl-dotted"}
_FLUX_NAMINGS = {"kohya-bfl", "lycoris", "onetrainer", "peft", "bare", "bfl-dotted"}


def _denoiser_unmapped(insp: Inspection, m: Module) -> str | None:
    if family_of(insp).unet_naming == "bfl":
        return None if m.naming in _FLUX_NAMINGS else "not a FLUX name in comfy/lora.py model_lora_keys_unet"
    if m.naming in _UNET_NAMINGS:
        return None
    if m.naming in ("peft", "bare") and not any(".to_" in t for t in m.targets):
        return None  # `unet.` + a path without attention projections is in the map as it is
    return ("diffusers/PEFT attention name: model_lora_keys_unet maps only the attention-processor spelling "
            "(`attn1.processor.to_q`), so `unet....attn1.to_q` is not loaded")


def _encoder_unmapped(insp: Inspection, m: Module) -> str | None:
    if slot_kind(insp, m.component) == "t5":
        return None  # OneTrainer's `lora_te2_` T5 names (the t5xxl branch of model_lora_keys_clip)
    target = m.targets[0] if m.targets else ""
    if target == "text_projection" and m.naming == "kohya":
        return None
    if not CLIP_LAYER.fullmatch(target):
        return f"{target or m.name}: model_lora_keys_clip maps only q/k/v/out_proj and mlp.fc1/fc2 of CLIP layers"
    if m.naming == "kohya" and "_text_model_encoder_layers_" in m.name:
        return None
    if m.naming == "peft" and m.name == f"{m.component}.{target}":
        return None
    return "text-encoder name without `text_model`: model_lora_keys_clip maps `..._text_model_encoder_layers_N_...`"


def _unmapped(insp: Inspection) -> list[Finding]:
    def why(m: Module) -> str | None:
        if m.component is None:
            return "no module of the model has this name in comfy/lora.py's key map"
        if m.component == family_of(insp).denoiser:
            return _denoiser_unmapped(insp, m)
        return _encoder_unmapped(insp, m)
    return modules_where(insp, DROPPED, why)


def _magnitude(insp: Inspection) -> list[Finding]:
    return [Finding(DROPPED, "PEFT DoRA magnitude: LoRAAdapter.load reads DoRA only from `.dora_scale`, so the layer "
                    "applies as a plain LoRA", (m.parts["magnitude"],)) for m in insp.modules if "magnitude" in m.parts]


def _dora_scale(insp: Inspection) -> list[Finding]:
    out = modules_where(insp, WRONG, lambda m: (
        "1-D dora_scale: weight_decompose broadcasts it over the inputs, not the outputs"
        if m.dora_orientation == "flat" else None))
    return out + modules_where(insp, DROPPED, lambda m: (
        "dora_scale fits neither [1, in] nor [out, 1]: weight_decompose fails and the layer is skipped"
        if m.dora_orientation == "bad" else None))


def _peft_alpha(insp: Inspection) -> list[Finding]:
    return modules_where(insp, WRONG, lambda m: (
        "alpha from diffusers' adapter config (header) is not read: ComfyUI scales by 1, not alpha / rank"
        if "alpha" not in m.parts and m.alpha is not None and m.rank and m.alpha != m.rank else None))


RULES = (
    _unmapped,
    _magnitude,
    _dora_scale,
    _peft_alpha,
    bundles_ignored("ComfyUI's LoRA loader does not read bundled embeddings (\"lora key not loaded\"); put the "
                    "embedding file in models/embeddings"),
    unknown_keys_dropped(NAME),
    embedding_widths(NAME),
)
