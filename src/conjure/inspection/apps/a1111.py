"""AUTOMATIC1111's Lora extension (and Forge), restated as rules (read from AUTOMATIC1111/stable-diffusion-webui
v1.10, extensions-builtin/Lora: networks.py load_network / convert_diffusers_name_to_compvis /
network_apply_weights, network.py NetworkModule.apply_weight_decompose; and lllyasviel/stable-diffusion-webui-forge
at cea9f37f, backend/patcher/lora.py).

- load_network splits every key at its first dot (`partition(".")`): a PEFT key `unet.down_blocks....lora_A.weight`
  names the module "unet", which matches nothing. Module names are converted by convert_diffusers_name_to_compvis
  (kohya diffusers names, with SD 1.x's up-block layout: `up_blocks_0_upsamplers` -> `output_blocks_2_1_conv`),
  else `lora_unet` -> `diffusion_model` (LDM names), `lora_te1_text_model` -> the first encoder; unmatched keys
  only reach a debug log. SDXL's add-embedding under diffusers' names (`add_embedding_linear_N`) has no rule.
- OpenCLIP encoders (SD 2.x's, SDXL's second) are one MultiheadAttention per layer: network_apply_weights applies
  q/k/v only when q, k, v and out_proj LoRAs are all there.
- DoRA (network.py apply_weight_decompose): the per-input-column norm only: `[1, in]`.
- Bundled embeddings (`bundle_emb.<name>.string_to_param.*` / `.clip_l` / `.clip_g`) are read.
- AUTOMATIC1111 has no FLUX.1; Forge loads FLUX.1 LoRAs with its copy of ComfyUI's loader (backend/patcher/lora.py
  get_function -> packages_3rdparty/comfyui_lora_collection), so a FLUX.1 file gets ComfyUI's rules.
"""

from __future__ import annotations

import re

from conjure.inspection.apps import comfyui
from conjure.inspection.apps.rules import (
    embedding_widths,
    family_of,
    modules_where,
    one_tensor_embedding,
    unknown_keys_dropped,
)
from conjure.inspection.model import DROPPED, WRONG, Finding, Inspection, Module

NAME = "AUTOMATIC1111/Forge"
VERSION = "AUTOMATIC1111 v1.10 (extensions-builtin/Lora); Forge cea9f37f (backend/patcher/lora.py)"

_MHA_PARTS = ("q", "k", "v", "out")


def _name_unmatched(insp: Inspection, m: Module) -> str | None:
    fam = family_of(insp)
    if "." in m.name:
        return "load_network cuts keys at the first dot, so a dotted (PEFT/diffusers) name matches no module"
    if m.component is None or not m.naming.startswith("kohya"):
        return "convert_diffusers_name_to_compvis maps no module to this name"
    if m.component == fam.denoiser and m.naming == "kohya" and fam.unet_naming == "ldm":
        target = m.targets[0]
        if target.startswith("add_embedding."):
            return "diffusers add_embedding name: convert_diffusers_name_to_compvis has no rule for it (label_emb)"
        if re.fullmatch(r"up_blocks\.0\.upsamplers\.0\.conv", target):
            return "up_blocks_0_upsamplers: converted with SD 1.x's layout (output_blocks_2_1_conv), not SDXL's"
    return None


def _names(insp: Inspection) -> list[Finding]:
    return modules_where(insp, DROPPED, lambda m: _name_unmatched(insp, m))


def _open_clip_attention(insp: Inspection) -> list[Finding]:
    """OpenCLIP layers (the encoders whose kohya names network.py converts to `model_transformer_resblocks`)."""
    fam = family_of(insp)
    width_open_clip = {s.encoder for s, a in zip(fam.text_encoders, getattr(fam.reference, "encoders", ()))
                       if s.kind == "clip" and getattr(a, "activation", "") == "gelu"}
    layers: dict[tuple[str, str], dict[str, Module]] = {}
    for m in insp.modules:
        hit = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj", m.targets[0]) \
            if m.targets and m.component in width_open_clip else None
        if hit:
            layers.setdefault((m.component or "", hit.group(1)), {})[hit.group(2)] = m
    partial = [mods for mods in layers.values() if set(mods) != set(_MHA_PARTS)]
    return modules_where(insp, DROPPED, lambda m: (
        "OpenCLIP attention: network_apply_weights applies q/k/v only with all of q, k, v and out_proj"
        if any(m in mods.values() and m is not mods.get("out") for mods in partial) else None))


def _dora(insp: Inspection) -> list[Finding]:
    return modules_where(insp, WRONG, lambda m: (
        "dora_scale is not [1, in]: AUTOMATIC1111's apply_weight_decompose normalises input columns only"
        + (" (Forge's weight_decompose, ComfyUI's, also reads [out, 1])" if m.dora_orientation == "out" else "")
        if m.dora_orientation in ("out", "flat", "bad") else None))


def _magnitude(insp: Inspection) -> list[Finding]:
    return [Finding(DROPPED, "PEFT DoRA magnitude: not a part any network module type reads",
                    (m.parts["magnitude"],)) for m in insp.modules if "magnitude" in m.parts]


def _sd_rules(insp: Inspection) -> list[Finding]:
    if insp.is_embedding:
        return []
    return [f for rule in (_names, _open_clip_attention, _dora, _magnitude, unknown_keys_dropped(NAME))
            for f in rule(insp)]


def _forge_flux(insp: Inspection) -> list[Finding]:
    findings = [f for rule in comfyui.RULES for f in rule(insp)]
    return [Finding(f.outcome, f"Forge (AUTOMATIC1111 has no FLUX.1): {f.reason}", f.keys) for f in findings]


def _by_family(insp: Inspection) -> list[Finding]:
    return _forge_flux(insp) if family_of(insp).unet_naming == "bfl" else _sd_rules(insp)


RULES = (
    _by_family,
    embedding_widths(NAME),
    one_tensor_embedding("textual_inversion.py create_embedding_from_data asserts \"embedding file has multiple terms "
                         "in it\" (A1111 and Forge)"),
)
