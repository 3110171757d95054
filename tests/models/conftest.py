"""Synthetic single-file checkpoints: a tiny model's weights under the real original (LDM / sgm) key names.

diffusers ships only the original -> diffusers converters; `ldm_state_dict` is their inverse (the layout of
diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` and ComfyUI's `unet_to_diffusers`),
checked against diffusers' own converters in tests/models/test_single_file.py. Marker keys (`v_pred`,
`ztsnr`, `edm_*`) are added as the files that carry them do: empty tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        rest = rest.replace(f"{new}.", f"{old}.")
    return rest


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    per_level = unet.config.layers_per_block + 1
    state = unet.state_dict()
    attention_levels = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        module, leaf = ".".join(parts[:-1]), parts[-1]
        if module in _UNET_TOP:
            name = f"{_UNET_TOP[module]}.{leaf}"
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            name = f"middle_block.{2 * j}.{_resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        else:
            i, kind = int(parts[1]), parts[2]
            j, rest = int(parts[3]), ".".join(parts[4:])
            if parts[0] == "down_blocks":
                block = per_level * i + j + 1
                name = {"resnets": f"input_blocks.{block}.0.{_resnet(rest)}",
                        "attentions": f"input_blocks.{block}.1.{rest}",
                        "downsamplers": f"input_blocks.{per_level * (i + 1)}.0.op.{leaf}"}[kind]
            else:
                block = per_level * i + j
                upsampler = f"output_blocks.{per_level * i + per_level - 1}.{2 if i in attention_levels else 1}"
                name = {"resnets": f"output_blocks.{block}.0.{_resnet(rest)}",
                        "attentions": f"output_blocks.{block}.1.{rest}",
                        "upsamplers": f"{upsampler}.conv.{leaf}"}[kind]
        out[f"model.diffusion_model.{name}"] = value
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = name.split(".")
        if parts[1] == "down_blocks":
            kind = "downsample" if parts[3] == "downsamplers" else f"block.{parts[4]}"
            name = ".".join([parts[0], "down", parts[2], kind, *parts[5:]])
        elif parts[1] == "up_blocks":
            level = levels - 1 - int(parts[2])
            kind = "upsample" if parts[3] == "upsamplers" else f"block.{parts[4]}"
            name = ".".join([parts[0], "up", str(level), kind, *parts[5:]])
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            name = ".".join([parts[0], "mid", f"block_{int(parts[3]) + 1}", *parts[4:]])
        elif parts[1] == "mid_block":
            module = ".".join(parts[4:-1])
            name = ".".join([parts[0], "mid", "attn_1", _VAE_ATTENTION[module], parts[-1]])
            if value.ndim == 2:  # the original attention is 1x1 convolutions
                value = value[:, :, None, None]
        out[f"first_stage_model.{name}"] = value
    return out


def _hf_clip(encoder: Any) -> dict[str, torch.Tensor]:
    """A CLIP text model's state dict with the `text_model.` prefix that real files have."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in encoder.state_dict().items()}


def clip_to_ldm(encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP-L: the transformers layout under `prefix` (SD 1.x `cond_stage_model.transformer.`)."""
    return {f"{prefix}{k}": v for k, v in _hf_clip(encoder).items() if not k.startswith("text_projection")}


_OPEN_CLIP = (("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
              ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn.", ".attn."))


def open_clip_to_ldm(encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD 2.x ViT-H, SDXL bigG): fused q/k/v `in_proj`, `text_projection` as [width, dim]."""
    state, out = _hf_clip(encoder), {}
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif any(f"self_attn.{p}_proj." in key for p in "kv"):
            continue  # fused into in_proj with q below
        elif "self_attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            fused = torch.cat([state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            name = key.replace(".q_proj." + kind, f".in_proj_{kind}")
            for new, old in _OPEN_CLIP:
                name = name.replace(new, old)
            out[prefix + name] = fused
        elif key.startswith("text_model.encoder.layers."):
            name = key
            for new, old in _OPEN_CLIP:
                name = name.replace(new, old)
            out[prefix + name] = value
    return out


def ldm_state_dict(family: str, components: dict[str, Any], *, sgm: bool = False) -> dict[str, torch.Tensor]:
    """The whole model in the original layout: SD 1.x/2.x as the CompVis/Stability `.ckpt`s (`sgm` for SD 2.x: the
    generative-models layout), SDXL as `sd_xl_base_1.0.safetensors`."""
    state = {**unet_to_ldm(components["unet"]), **vae_to_ldm(components["vae"])}
    if family == "sd1":
        state.update(clip_to_ldm(components["text_encoder"], "cond_stage_model.transformer."))
    elif family == "sd2":
        prefix = "conditioner.embedders.0.model." if sgm else "cond_stage_model.model."
        state.update(open_clip_to_ldm(components["text_encoder"], prefix))
        width = components["text_encoder"].config.hidden_size  # real SD 2.x files keep OpenCLIP's projection
        state[prefix + "text_projection"] = torch.eye(width)
    else:
        state.update(clip_to_ldm(components["text_encoder"], "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(components["text_encoder_2"], "conditioner.embedders.1.model."))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def tiny_single_file_components(family: str) -> dict[str, Any]:
    """Tiny components a single file can hold unambiguously: the real UNet block layout (so SD 2.x's
    `output_blocks.11.1` exists), and for SDXL a second encoder wider than the first (diffusers tells the two
    SDXL encoders in a file apart by width; the default tiny model has 32 for both)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from conjure.models.tiny import build_tiny_components

    parts = build_tiny_components(family, real_layout=True)
    if family == "sdxl":
        from diffusers import UNet2DConditionModel

        first = parts["text_encoder"].config
        config = CLIPTextConfig(**{**parts["text_encoder_2"].config.to_dict(), "hidden_size": 48,
                                   "projection_dim": 48, "intermediate_size": 96})
        torch.manual_seed(5)
        parts["text_encoder_2"] = CLIPTextModelWithProjection(config).eval()
        unet_config = dict(parts["unet"].config)
        unet_config.update(cross_attention_dim=first.hidden_size + 48, projection_class_embeddings_input_dim=6 * 8 + 48)
        parts["unet"] = UNet2DConditionModel.from_config(unet_config).eval()
    return parts


@pytest.fixture(scope="session")
def single_file_model(tmp_path_factory):
    """family -> (diffusers folder of a tiny model, its components); built once per session."""
    from conjure.models.tiny import save_model_folder

    cache: dict[str, tuple[Path, dict[str, Any]]] = {}

    def get(family: str) -> tuple[Path, dict[str, Any]]:
        if family not in cache:
            parts = tiny_single_file_components(family)
            folder = save_model_folder(family, parts, tmp_path_factory.mktemp(f"single-file-config-{family}"))
            cache[family] = (folder, parts)
        return cache[family]

    return get


@pytest.fixture
def write_single_file(single_file_model, tmp_path):
    """Write the tiny `family` model as one checkpoint file with `markers` (names of empty marker tensors) and
    `tensors` (extra or replaced tensors); returns (file, diffusers config folder)."""
    from safetensors.torch import save_file

    def write(family: str, *, markers: tuple[str, ...] = (), tensors: dict[str, torch.Tensor] | None = None,
              suffix: str = ".safetensors", sgm: bool = False, name: str = "model") -> tuple[Path, Path]:
        folder, parts = single_file_model(family)
        state = ldm_state_dict(family, parts, sgm=sgm)
        state.update({m: torch.tensor([]) for m in markers})
        state.update(tensors or {})
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".ckpt":
            torch.save({"state_dict": state, "global_step": 1}, path)
        else:
            save_file(state, str(path))
        return path, folder

    return write


@pytest.fixture
def ldm():
    """The writers above, for tests (a conftest is not importable by name under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(vae=vae_to_ldm, state_dict=ldm_state_dict)
