"""Full-size SD 1.5, SD 2.1 and SDXL architectures with random weights, built from their public configs.

For speed/memory benchmarks and for checks that need the real module tree (e.g. that every adapted module
of the real UNet gets a name in an exported file) without downloading weights. `device="meta"` builds the
module tree without allocating memory. The configs are copied from the models' published config.json files
(stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0); the text encoders keep the
real models' legacy token ids (bos 0 / eos 2 / pad 1) as their configs do.
"""

from __future__ import annotations

from typing import Any

from conjure import families
from conjure.families import ReferenceArchitecture


def unet_config(arch: ReferenceArchitecture) -> dict[str, Any]:
    """The diffusers UNet config of a full-size family (its published unet/config.json, non-default keys only)."""
    config: dict[str, Any] = dict(
        sample_size=arch.resolution // 8, block_out_channels=list(arch.block_out_channels), layers_per_block=2,
        cross_attention_dim=arch.cross_attention_dim, attention_head_dim=_listed(arch.attention_head_dim),
        down_block_types=list(arch.down_blocks), up_block_types=list(arch.up_blocks),
    )
    if arch.transformer_layers:
        config["transformer_layers_per_block"] = list(arch.transformer_layers)
    if arch.linear_projection:
        config["use_linear_projection"] = True
    if arch.upcast_attention:
        config["upcast_attention"] = True
    if arch.addition_time_embed_dim:
        # 6 micro-conditioning numbers (original size, crop top-left, target size), each time-embedded, and the
        # pooled embedding of the last encoder
        config.update(
            addition_embed_type="text_time", addition_embed_type_num_heads=arch.addition_embed_heads,
            addition_time_embed_dim=arch.addition_time_embed_dim,
            projection_class_embeddings_input_dim=6 * arch.addition_time_embed_dim + arch.encoders[-1].projection_dim,
        )
    return config


def _listed(value: int | tuple[int, ...]) -> int | list[int]:
    return list(value) if isinstance(value, tuple) else value


def build_reference_vae(family: str, *, device: str = "cpu") -> Any:
    """The full-size VAE of `family` (random weights, float32): SD 1.x/2.x and SDXL share the architecture and
    differ in sample size and scaling factor."""
    import torch
    from diffusers import AutoencoderKL

    arch = families.get(family).reference
    with torch.device(device):
        return AutoencoderKL(
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
            sample_size=arch.resolution, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=arch.vae_scale, force_upcast=arch.vae_force_upcast,
        )


def build_reference_components(family: str, *, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Pipeline components of the full-size `family` model, random weights, float32."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conjure.models.tokenizer import clip_tokenizer

    fam = families.get(family)
    torch.manual_seed(seed)
    parts: dict[str, Any] = {}
    with torch.device(device):
        parts["unet"] = UNet2DConditionModel(**unet_config(fam.reference))
        parts["vae"] = build_reference_vae(family, device=device)
        for slot, arch in zip(fam.text_encoders, fam.reference.encoders):
            config = CLIPTextConfig(
                vocab_size=49408, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                num_hidden_layers=arch.layers, num_attention_heads=arch.heads, hidden_act=arch.activation,
                projection_dim=arch.projection_dim, max_position_embeddings=77,
                bos_token_id=0, eos_token_id=2, pad_token_id=1,
            )
            parts[slot.encoder] = (CLIPTextModelWithProjection if slot.pooled else CLIPTextModel)(config)
            parts[slot.tokenizer] = clip_tokenizer(slot.pad_token)
    parts["scheduler"] = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
        prediction_type=fam.reference.prediction_type,
    )
    if fam.safety_checker:
        parts["safety_checker"] = None
    parts.update(feature_extractor=None, image_encoder=None)
    return parts
