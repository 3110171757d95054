"""Whole SD 1.x / 2.x / SDXL models as one `.safetensors` in the original key layout (LDM for SD 1.x/2.x, SGM for
SDXL), the "checkpoint" that A1111/Forge, ComfyUI and InvokeAI load as a main model and diffusers' `from_single_file`
reads. `save_single_file` writes one from pipeline components, state dicts or a diffusers folder;
`checkpoint_state_dict` is the key mapping alone.

The layout is the inverse of what diffusers 0.42.1 reads (loaders/single_file_utils.py: convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint) and what its scripts
convert_diffusers_to_original_stable_diffusion.py and convert_diffusers_to_original_sdxl.py write (read at commit
11f1a54). Prefixes come from the family record (`Family.checkpoint_*_prefix`, `TextEncoderSlot.checkpoint_prefix`):
- UNet, under `model.diffusion_model.`: the LDM module paths of `kohya_names.ldm_unet_path` (the map kohya's SDXL
  LoRA names use), parameter names unchanged.
- VAE, under `first_stage_model.`: `encoder.down.{i}.block.{j}` / `.downsample`, `decoder.up.{n-1-i}.block.{j}` /
  `.upsample` (the decoder's levels are numbered the other way round), `mid.block_{1,2}`, `nin_shortcut`,
  `norm_out`, and the mid attention as `mid.attn_1.{norm,q,k,v,proj_out}`, whose weights are 1x1 convolutions
  there ([C, C, 1, 1]) where diffusers has linear layers ([C, C]).
- Text encoders, slot layout "hf": transformers' CLIP names under `text_model.`, as they are; "open_clip" (SD 2.x,
  SDXL's second): `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.{i}.{ln_1, ln_2,
  attn.in_proj_weight/bias (q, k, v stacked), attn.out_proj, mlp.c_fc, mlp.c_proj}`, `ln_final`, and
  `text_projection` transposed (OpenCLIP multiplies `x @ text_projection`). diffusers splits `in_proj` at the
  text_projection's first dimension (or the hidden size without one), which is the hidden size in SD 2.x and SDXL.
  Every OpenCLIP tower also has a `logit_scale` (unused by image models; written as ln 100, the cap OpenCLIP
  trains it to). SD 2.x's OpenCLIP-H has 24 layers and a projection; diffusers keeps only the 23 that SD 2.x
  reads (`TextEncoderSlot.checkpoint_dropped_layers`), so those weights are gone from any diffusers model. Without
  them ComfyUI warns "clip missing" for the whole 24th layer (its SD2 CLIP has 24: comfy/sd.py
  load_state_dict_guess_config filters out only `logit_scale` and `text_projection`) and a user takes the file for
  broken. The file gets them back as weights that change nothing SD 2.x computes: the 24th layer as an identity
  block (layer norms of ones, every projection and bias zero, so `x + 0 + 0`), which gives an app set to read
  the last layer (ComfyUI's CLIPSetLastLayer -1) exactly the penultimate state the UNet was trained on, and the
  projection as the identity (ComfyUI's own initial value, comfy/clip_model.py CLIPTextModel). kohya sd-scripts
  (library/model_util.py convert_text_encoder_state_dict_to_sd_v2, make_dummy_weights, read at commit 036907e)
  instead copies layer 22 into 23, which runs layer 22 twice in that case, and writes `torch.ones((1024, 1024))`:
  diffusers splits `in_proj` at `text_projection.shape[0]`, so a fixed 1024 misreads any narrower encoder (a
  tiny test model's q took all of q, k and v); the identity of the encoder's own width keeps every size right.
A v-prediction model gets ComfyUI's `v_pred` marker key (an empty tensor; comfy/model_detection.py reads it, and so
does conjure's loader), since nothing else in a single file says what the model predicts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from conjure import families
from conjure.errors import ConjureError
from conjure.export.kohya_names import ldm_unet_path
from conjure.export.lora import file_dtype
from conjure.export.modelspec import conjure_keys, modelspec
from conjure.families import Family, ReferenceArchitecture
from conjure.files import save_safetensors_atomically

__all__ = [
    "V_PRED_MARKER", "canonical_text_key", "checkpoint_state_dict", "component_state_dicts", "folder_prediction_type",
    "save_single_file", "weights_file",
]

V_PRED_MARKER = "v_pred"
# a component's weights in a diffusers folder; a folder fetched with `variant="fp16"` may hold only the variant
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.fp16.safetensors")

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _unet(state: Mapping[str, torch.Tensor], unet_config: Any, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        path = ldm_unet_path(module, unet_config)
        if path is None:
            raise ConjureError(f"UNet tensor {key!r} has no place in a single-file checkpoint")
        out[f"{prefix}{path}.{param}"] = tensor
    return out


def _vae_key(key: str, up_blocks: int) -> tuple[str, bool]:
    """diffusers VAE key -> (LDM key, whether it is a linear weight that becomes a 1x1 convolution)."""
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m:
        if m.group(2) not in _VAE_ATTENTION:
            raise ConjureError(f"VAE tensor {key!r} has no place in a single-file checkpoint")
        return f"{m.group(1)}.mid.attn_1.{_VAE_ATTENTION[m.group(2)]}.{m.group(3)}", (
            m.group(3) == "weight" and m.group(2) != "group_norm")
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", lambda m: (
        f"decoder.up.{up_blocks - 1 - int(m.group(1))}.{'block' if m.group(2) == 'resnets' else 'upsample'}."), key)
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", key)
    return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out"), False


def ldm_vae_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under the original names, without a prefix (as a VAE file or BFL's
    FLUX.1 ae.safetensors has them)."""
    levels = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    out = {}
    for key, tensor in state.items():
        name, to_conv = _vae_key(key, len(levels))
        out[name] = tensor.reshape(*tensor.shape, 1, 1) if to_conv and tensor.dim() == 2 else tensor
    return out


def canonical_text_key(key: str) -> str:
    """transformers 5 saves a CLIPTextModel without `text_model.`; checkpoints always have it."""
    return key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"


def _complete_open_clip(out: dict[str, torch.Tensor], prefix: str, dropped_layers: int) -> None:
    """Add what the original OpenCLIP tower holds beyond the diffusers encoder (see the module docstring)."""
    blocks = f"{prefix}transformer.resblocks."
    last = max(int(k[len(blocks):].split(".", 1)[0]) for k in out if k.startswith(blocks))
    template = {k[len(f"{blocks}{last}."):]: v for k, v in out.items() if k.startswith(f"{blocks}{last}.")}
    for layer in range(last + 1, last + 1 + dropped_layers):
        for name, tensor in template.items():
            norm_weight = name.startswith("ln_") and name.endswith(".weight")
            out[f"{blocks}{layer}.{name}"] = torch.ones_like(tensor) if norm_weight else torch.zeros_like(tensor)
    embedding = out[prefix + "token_embedding.weight"]
    like = {"dtype": embedding.dtype, "device": embedding.device}
    if prefix + "text_projection" not in out:
        out[prefix + "text_projection"] = torch.eye(embedding.shape[1], **like)
    out[prefix + "logit_scale"] = torch.tensor(math.log(100.0), **like)


def _open_clip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
            continue
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = tensor
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise ConjureError(f"text-encoder tensor {key!r} has no place in an OpenCLIP checkpoint")
        block, module, param = f"{prefix}transformer.resblocks.{m.group(1)}.", m.group(2), m.group(3)
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj", module)
        if qkv:
            fused.setdefault(f"{block}attn.in_proj_{param}", {})[qkv.group(1)] = tensor
        elif module in _OPEN_CLIP_LAYER:
            out[f"{block}{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
        else:
            raise ConjureError(f"text-encoder tensor {key!r} has no place in an OpenCLIP checkpoint")
    for key, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConjureError(f"{key}: the text encoder lacks {sorted({'q', 'k', 'v'} - set(parts))} projections")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # torch's MultiheadAttention order
    return out


def checkpoint_state_dict(
    family: str | Family, states: Mapping[str, Mapping[str, torch.Tensor]], unet_config: Any
) -> dict[str, torch.Tensor]:
    """The single-file tensors of a model given as diffusers state dicts per pipeline component (`unet`, `vae`,
    `text_encoder`, and `text_encoder_2` for SDXL); `unet_config`: the UNet's config (its block layout names the
    LDM blocks). Tensors are passed through (the open_clip q/k/v are concatenated, the VAE attention reshaped)."""
    fam = _single_file_family(family)
    missing = [c for c in ("unet", "vae", *(s.encoder for s in fam.text_encoders)) if c not in states]
    if missing:
        raise ConjureError(f"a {fam.title} single-file checkpoint needs the {', '.join(missing)} too")
    out = _unet(states["unet"], unet_config, fam.checkpoint_unet_prefix)
    out.update({fam.checkpoint_vae_prefix + k: v for k, v in ldm_vae_state_dict(states["vae"]).items()})
    for slot in fam.text_encoders:
        text = {canonical_text_key(k): v for k, v in states[slot.encoder].items() if not k.endswith("position_ids")}
        if slot.checkpoint_layout == "open_clip":
            tower = _open_clip(text, slot.checkpoint_prefix)
            _complete_open_clip(tower, slot.checkpoint_prefix, slot.checkpoint_dropped_layers)
            out.update(tower)
        else:
            out.update({slot.checkpoint_prefix + k: v for k, v in text.items()})
    return out


def _single_file_family(family: str | Family) -> Family:
    fam = families.get(family)
    if not isinstance(fam.reference, ReferenceArchitecture) or not all(s.checkpoint_prefix for s in fam.text_encoders):
        raise ConjureError(f"{fam.title} models have no single-file checkpoint layout here (SD 1.x, 2.x, SDXL do)")
    return fam


def weights_file(folder: Path) -> Path:
    """The safetensors file of one component folder (the plain name first, else the fp16 variant)."""
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConjureError(f"{folder} has no {' or '.join(_WEIGHT_FILES)} (sharded or .bin weights are not read)")


def component_state_dicts(folder: Path, family: str | Family) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The state dicts of a diffusers folder's UNet, VAE and text encoders, and the UNet's config."""
    from safetensors.torch import load_file

    fam = _single_file_family(family)
    folder = Path(folder)
    names = ("unet", "vae", *(s.encoder for s in fam.text_encoders))
    try:
        states = {name: load_file(weights_file(folder / name)) for name in names}
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
    except ConjureError:
        raise
    except Exception as exc:
        raise ConjureError(f"cannot read the model folder {str(folder)!r}: {str(exc).splitlines()[0]}") from None
    return states, unet_config


def folder_prediction_type(folder: Path) -> str | None:
    config = folder / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(config.read_text()).get("prediction_type") if config.is_file() else None
    except (OSError, ValueError):
        return None


def save_single_file(
    model: Mapping[str, Any] | str | Path,
    path: str | Path,
    family: str | Family,
    *,
    dtype: Any = "fp16",
    metadata: Mapping[str, str] | None = None,
    prediction_type: str | None = None,
    unet_config: Any = None,
) -> Path:
    """Write `model` as one single-file checkpoint at `path` (atomically) and return the path.

    model: a diffusers model folder; or pipeline components by name (`unet`, `vae`, `text_encoder`,
    `text_encoder_2`; other entries such as tokenizers are ignored), each a module or a state dict (then pass
    `unet_config`). dtype: "fp16", "bf16", "fp32" (or a torch dtype; None keeps each tensor's). metadata: header
    entries over the defaults (modelspec 1.0.0 for a whole model, conjure.version). prediction_type: "epsilon" or
    "v_prediction"; default from the folder's or the components' scheduler, else the family's.
    """
    fam = _single_file_family(family)
    assert isinstance(fam.reference, ReferenceArchitecture)  # _single_file_family made sure
    states: Mapping[str, Mapping[str, torch.Tensor]]
    if isinstance(model, (str, Path)):
        states, unet_config = component_state_dicts(Path(model), fam)
        prediction_type = prediction_type or folder_prediction_type(Path(model))
    else:
        states = {name: part if isinstance(part, Mapping) else part.state_dict() for name, part in model.items()
                  if name in ("unet", "vae") or fam.slot(name) is not None}
        if unet_config is None and hasattr(model.get("unet"), "config"):
            unet_config = model["unet"].config
        scheduler = model.get("scheduler")
        if prediction_type is None and scheduler is not None:
            prediction_type = scheduler.config.prediction_type
    if unet_config is None:
        raise ConjureError("save_single_file: give unet_config when the UNet is a state dict")
    prediction_type = prediction_type or fam.reference.prediction_type
    tensors = checkpoint_state_dict(fam, states, unet_config)
    target = file_dtype(dtype)
    tensors = {k: (v.to(target) if target is not None and v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    if prediction_type == "v_prediction":
        tensors[V_PRED_MARKER] = torch.tensor([])
    path = Path(path)
    resolution = dict(fam.resolution_by_prediction).get(prediction_type, fam.reference.resolution)
    header = modelspec(fam, "", title=path.stem, resolution=resolution, prediction_type=prediction_type)
    header.update(conjure_keys())
    header.update(metadata or {})
    save_safetensors_atomically(tensors, path, header)
    return path
