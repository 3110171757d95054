"""Whole-model files in `conjure inspect`: a single-file SD 1.x/2.x/SDXL checkpoint (the original LDM/SGM names,
export/single_file.py), a FLUX.1 transformer (Black Forest Labs' names, bare or under ComfyUI's
`model.diffusion_model.`, or diffusers'), or a diffusers UNet's weights file. Told from the key names and shapes
of the header alone: the family from the text-encoder and UNet prefixes in the family records
(`TextEncoderSlot.checkpoint_prefix`, `Family.checkpoint_unet_prefix` / `checkpoint_vae_prefix`), else from the
UNet's structure as `families.detect` reads a config; the prediction type from ComfyUI's `v_pred` marker or the
modelspec header. Each app gets one line (where it loads such a file as a main model), not per-tensor rules: a
model is no adapter, and every app's LoRA loader refuses it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import ModuleType

from conjure import families
from conjure.export.single_file import V_PRED_MARKER
from conjure.families import Family
from conjure.inspection.model import REFUSED, Finding, Inspection, ModelFile, Shape, Verdict
from conjure.models.flux_single_file import is_all_in_one
from conjure.models.transformer_loading import file_has_guidance, is_flux_file

__all__ = ["model_file", "model_verdict"]

SINGLE_FILE = "single-file"  # SD 1.x/2.x/SDXL in the original LDM/SGM layout
FLUX_FILE = "flux-transformer"  # FLUX.1's transformer alone
FLUX_ALL_IN_ONE = "flux-all-in-one"  # ComfyUI's FLUX.1 checkpoint: the transformer, VAE and text encoders
DIFFUSERS_UNET = "diffusers-unet"  # a diffusers UNet2DConditionModel's weights
LAYOUTS = {
    SINGLE_FILE: "single-file checkpoint (original LDM/SGM key names)",
    FLUX_FILE: "FLUX.1 transformer (the VAE and text encoders are separate files)",
    FLUX_ALL_IN_ONE: "FLUX.1 all-in-one checkpoint (ComfyUI's: transformer, VAE, CLIP-L and T5-XXL in one file)",
    DIFFUSERS_UNET: "diffusers UNet weights (diffusion_pytorch_model.safetensors of a model folder's unet/)",
}
_DIFFUSERS_UNET_KEYS = ("conv_in.weight", "time_embedding.linear_1.weight", "conv_norm_out.weight")
# the transformer family whose file `is_flux_file` recognises (FLUX.1)
_FLOW = next(f for f in families.FAMILIES.values() if f.denoiser == "transformer")

# Where each app loads a FLUX.1 all-in-one file: ComfyUI's Load Checkpoint splits it by class Flux's prefixes
# (comfy/supported_models.py vae_key_prefix / text_encoder_key_prefix); Forge's backend/loader.py split_state_dict
# by the same guess (commit dfdcbab685e5); InvokeAI's FLUX main-checkpoint loader keeps the transformer only
# (invokeai/backend/model_manager/load/model_loaders/flux.py _load_from_singlefile:
# convert_bundle_to_flux_transformer_checkpoint, commit 8e71a8a51939); diffusers' from_single_file reads the text
# encoders through its SD 3 converters (loaders/single_file.py load_single_file_sub_model, is_t5_in_single_file).
_FLUX_ALL_IN_ONE_LOADS = {
    "InvokeAI": "loads as a FLUX main model (checkpoint), its transformer only: the T5, CLIP-L and VAE models "
                "installed apart",
    "ComfyUI": "loads as a main model: models/checkpoints, Load Checkpoint node (comfy/sd.py "
               "load_checkpoint_guess_config), VAE and text encoders included",
    "AUTOMATIC1111/Forge": "Forge loads it from models/Stable-diffusion, VAE and text encoders included; "
                           "AUTOMATIC1111 has no FLUX.1",
    "diffusers": "FluxPipeline.from_single_file(FILE) (loaders/single_file.py), its configs from the Hub",
}


def _single_file_families() -> list[Family]:
    return [f for f in families.FAMILIES.values() if f.text_encoders and all(s.checkpoint_prefix for s in f.text_encoders)]


def _unet_family(keys: Mapping[str, Shape]) -> tuple[Family, bool]:
    """The family a UNet's structure says (LDM or diffusers names): SDXL's add-embedding, SD 2.x's linear
    projections, the cross-attention width; certain only at a real model's width."""
    width = next((s[1] for k, s in keys.items() if re.search(r"attn2\.to_k\.weight$", k) and len(s) == 2), None)
    config = {
        "addition_embed_type": "text_time" if any(".label_emb." in f".{k}" or k.startswith("add_embedding.")
                                                  for k in keys) else None,
        "use_linear_projection": any(k.endswith("proj_in.weight") and len(s) == 2 for k, s in keys.items()),
        "cross_attention_dim": width,
    }
    fam = families.detect(config, has_text_encoder_2=False)
    real = {sum(slot.width for slot in f.text_encoders): f for f in _single_file_families()}
    return fam, real.get(width or 0) is fam


def _single_file(keys: Mapping[str, Shape]) -> tuple[Family, bool, dict[str, bool]] | None:
    candidates = _single_file_families()
    if not any(k.startswith(f.checkpoint_unet_prefix) for f in candidates for k in keys):
        return None
    with_encoders = [f for f in candidates
                     if all(any(k.startswith(s.checkpoint_prefix) for k in keys) for s in f.text_encoders)]
    if with_encoders:  # SDXL's prefixes include none of SD 1.x's or 2.x's, so the most encoders wins outright
        fam, certain = max(with_encoders, key=lambda f: len(f.text_encoders)), True
    else:
        unet = {k[len(candidates[0].checkpoint_unet_prefix):]: s for k, s in keys.items()
                if k.startswith(candidates[0].checkpoint_unet_prefix)}
        fam, certain = _unet_family(unet)
    parts = {"unet": True, "vae": any(k.startswith(fam.checkpoint_vae_prefix) for k in keys)}
    parts |= {s.encoder: any(k.startswith(s.checkpoint_prefix) for k in keys) for s in fam.text_encoders}
    return fam, certain, parts


def _prediction(fam: Family, layout: str, keys: Mapping[str, Shape], metadata: Mapping[str, str]) -> str:
    if fam.objective == "flow":
        return f"flow matching ({'dev: a guidance input' if file_has_guidance(set(keys)) else 'schnell: no guidance input'})"
    if V_PRED_MARKER in keys:
        return "v_prediction (v_pred marker)"
    if metadata.get("modelspec.prediction_type"):
        return f"{metadata['modelspec.prediction_type']} (modelspec.prediction_type)"
    if fam.prediction_probe and layout == SINGLE_FILE:
        return (f"not marked (ComfyUI and conjure's loader tell it by the spread of {fam.prediction_probe}; "
                "the header alone cannot)")
    return "epsilon (no v_pred marker)"


def model_file(keys: Mapping[str, Shape], metadata: Mapping[str, str], size: int) -> tuple[ModelFile, str, bool] | None:
    """(facts, family, certain) of a whole-model file from its key names and shapes; None when it is not one."""
    keys = {k.removeprefix("state_dict."): s for k, s in keys.items()}  # a .ckpt nests its tensors there
    if is_flux_file(set(keys)):
        whole = is_all_in_one(_FLOW, set(keys))
        layout, fam, certain = FLUX_ALL_IN_ONE if whole else FLUX_FILE, _FLOW, True
        parts = {"transformer": True} | ({"vae": True} | {s.encoder: True for s in _FLOW.text_encoders} if whole else {})
    elif found := _single_file(keys):
        layout, (fam, certain, parts) = SINGLE_FILE, found
    elif all(k in keys for k in _DIFFUSERS_UNET_KEYS):
        layout, parts = DIFFUSERS_UNET, {"unet": True}
        fam, certain = _unet_family(keys)
    else:
        return None
    info = ModelFile(layout=layout, description=LAYOUTS[layout], parts=parts,
                     prediction=_prediction(fam, layout, keys, metadata),
                     parameters=sum(math.prod(s) for s in keys.values()), size=size)
    return info, fam.name, certain


def _loads(app: str, insp: Inspection, fam: Family) -> tuple[bool, str]:
    """Whether `app` loads the model and where (each app's model loader, at the version its LoRA rules cite)."""
    model = insp.model
    assert model is not None
    missing = model.missing
    without = f"; without the file's missing {', '.join(missing)}, which the app must load separately" if missing else ""
    if model.layout == SINGLE_FILE:
        where = {
            "InvokeAI": "as a main model (Model Manager: install the file; its probe reads the LDM keys)",
            "ComfyUI": "as a main model: models/checkpoints, Load Checkpoint node (comfy/sd.py "
                       "load_checkpoint_guess_config)",
            "AUTOMATIC1111/Forge": "as a main model: models/Stable-diffusion, the checkpoint list (modules/sd_models.py)",
            "diffusers": f"{fam.pipeline_class}.from_single_file(FILE) (loaders/single_file_utils.py)",
        }[app]
        return True, f"loads {where}{without}"
    if model.layout == FLUX_FILE:
        where = {
            "InvokeAI": "loads as a FLUX main model (checkpoint), with the T5, CLIP-L and VAE models installed apart",
            "ComfyUI": "loads in models/diffusion_models with Load Diffusion Model, the VAE and text encoders loaded "
                       "apart (DualCLIPLoader, VAELoader)",
            "AUTOMATIC1111/Forge": "Forge loads it from models/Stable-diffusion with the VAE and text encoders picked "
                                   "in its VAE / Text Encoder box; AUTOMATIC1111 has no FLUX.1",
            "diffusers": "FluxTransformer2DModel.from_single_file(FILE), the rest from the model's folder",
        }[app]
        return True, where
    if model.layout == FLUX_ALL_IN_ONE:
        return True, _FLUX_ALL_IN_ONE_LOADS[app]
    if app == "ComfyUI":
        return True, "loads in models/diffusion_models with Load Diffusion Model (comfy/sd.py load_diffusion_model: " \
                     "diffusers UNet names are converted), the VAE and text encoders loaded apart"
    if app == "diffusers":
        return True, "UNet2DConditionModel.from_pretrained(FOLDER) with the file as unet/ beside its config.json"
    return False, "loads whole checkpoints or model folders, not a bare diffusers UNet file"


def model_verdict(app: ModuleType, insp: Inspection) -> Verdict:
    """The one-line verdict of `app` on a whole-model file: where it loads as a main model; never as an adapter."""
    fam = families.get(insp.family or families.SD1.name)
    loads, how = _loads(app.NAME, insp, fam)
    findings = [] if loads else [Finding(REFUSED, how)]
    return Verdict(app=app.NAME, version=app.VERSION, findings=findings, applied=len(insp.shapes) if loads else 0,
                   summary=f"{how}; not an adapter (its LoRA loader refuses it)" if loads else how)
