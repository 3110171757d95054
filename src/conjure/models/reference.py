"""Full-size SD 1.5, SD 2.1, SDXL and FLUX.1 architectures with random weights, built from their public configs.

For speed/memory benchmarks and for checks that need the real module tree (e.g. that every adapted module
of the real UNet gets a name in an exported file) without downloading weights. `device="meta"` builds the
module tree without allocating memory (FLUX.1 is 12B parameters in its transformer and 4.8B in T5-XXL: ~68 GB
in float32, so build it on "meta", or on a GPU to benchmark). The configs are copied from the models' published
config.json files (stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0, FLUX.1-dev and
FLUX.1-schnell); the CLIP text encoders keep the real models' legacy token ids (bos 0 / eos 2 / pad 1) as their
configs do. FLUX.1's T5 tokenizer is not shipped (a SentencePiece model of Google's): the reference gets the
toy FLUX's (`conjure.toy.tokenizer`), with T5's special-token ids, at 512 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conjure import families
from conjure.families import Family, ReferenceArchitecture, T5Architecture, TransformerArchitecture

# FlowMatchEulerDiscreteScheduler configs of FLUX.1 (scheduler/scheduler_config.json): dev shifts its sigmas by
# the image's token count (base_shift at 256 tokens to max_shift at 4096, i.e. 256 to 1024 px); schnell, distilled
# for few steps, does not shift.
FLUX_SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}


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
    differ in sample size and scaling factor; FLUX.1's has 16 latent channels."""
    import torch
    from diffusers import AutoencoderKL

    arch = families.get(family).reference
    with torch.device(device):
        if isinstance(arch, TransformerArchitecture):
            return AutoencoderKL(**flux_vae_config(arch))
        return AutoencoderKL(
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
            sample_size=arch.resolution, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=arch.vae_scale, force_upcast=arch.vae_force_upcast,
        )


def transformer_config(arch: TransformerArchitecture, *, guidance: bool) -> dict[str, Any]:
    """The FluxTransformer2DModel config of a full-size family (transformer/config.json); `guidance`: the
    variant's guidance input (dev: True)."""
    return dict(
        patch_size=1, in_channels=arch.in_channels, num_layers=arch.num_layers,
        num_single_layers=arch.num_single_layers, attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.num_attention_heads, joint_attention_dim=arch.joint_attention_dim,
        pooled_projection_dim=arch.pooled_projection_dim, guidance_embeds=guidance,
        axes_dims_rope=list(arch.axes_dims_rope),
    )


def flux_vae_config(arch: TransformerArchitecture) -> dict[str, Any]:
    """FLUX.1's VAE (vae/config.json): SD's layout with 16 latent channels, no quant convolutions, and a shift."""
    return dict(
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=arch.latent_channels,
        sample_size=arch.resolution, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=arch.vae_scale, shift_factor=arch.vae_shift,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    )


def t5_config(arch: T5Architecture, **ids: int) -> Any:
    """FLUX.1's text_encoder_2/config.json (T5 v1.1 XXL, encoder only); `ids`: pad/eos token ids."""
    from transformers import T5Config

    return T5Config(
        vocab_size=arch.vocab_size, d_model=arch.d_model, d_ff=arch.d_ff, d_kv=arch.d_kv, num_layers=arch.layers,
        num_heads=arch.heads, feed_forward_proj=arch.feed_forward_proj, is_encoder_decoder=False, use_cache=False,
        tie_word_embeddings=False, **ids,
    )


def _build_flow_components(fam: Family, arch: TransformerArchitecture, variant: str | None) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    from conjure.toy.tokenizer import toy_t5_tokenizer
    from conjure.models.tokenizer import clip_tokenizer

    chosen = fam.variant(variant)
    t5_tokenizer = toy_t5_tokenizer()
    t5_tokenizer.model_max_length = 512  # FLUX.1-dev's T5 length
    clip, t5 = arch.encoders
    assert isinstance(t5, T5Architecture) and not isinstance(clip, T5Architecture)
    clip_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=clip.hidden, intermediate_size=clip.intermediate, num_hidden_layers=clip.layers,
        num_attention_heads=clip.heads, hidden_act=clip.activation, projection_dim=clip.projection_dim,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    clip_slot, t5_slot = fam.text_encoders
    return {
        "transformer": FluxTransformer2DModel(**transformer_config(arch, guidance=chosen.guidance)),
        "vae": AutoencoderKL(**flux_vae_config(arch)),
        clip_slot.encoder: CLIPTextModel(clip_config),
        clip_slot.tokenizer: clip_tokenizer(clip_slot.pad_token),
        t5_slot.encoder: T5EncoderModel(t5_config(t5, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
        t5_slot.tokenizer: t5_tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[chosen.name]),
        "image_encoder": None, "feature_extractor": None,
    }


def build_reference_components(
    family: str, *, device: str = "cpu", seed: int = 0, variant: str | None = None
) -> dict[str, Any]:
    """Pipeline components of the full-size `family` model, random weights, float32. `variant`: of a family that
    has them (FLUX.1: "dev", the default, or "schnell")."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conjure.models.tokenizer import clip_tokenizer

    fam = families.get(family)
    torch.manual_seed(seed)
    if isinstance(fam.reference, TransformerArchitecture):
        with torch.device(device):
            return _build_flow_components(fam, fam.reference, variant)
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


def save_configs(family: str, components: dict[str, Any], folder: Path) -> Path:
    """Write the configs (no weights, no tokenizer files) of `components` as a diffusers model folder has them:
    model_index.json, each model's config.json and the scheduler's config. The SD families' shipped configs
    (`models/assets/configs/<family>`, what a single file loads offline with: `models/single_file.py`) are this
    written for the full-size model on the meta device (`python -m conjure.models.reference`)."""
    import json

    import diffusers

    fam = families.get(family)
    index: dict[str, Any] = {"_class_name": fam.pipeline_class, "_diffusers_version": diffusers.__version__}
    for name, part in components.items():
        if part is None:
            index[name] = [None, None]
            continue
        library = "transformers" if type(part).__module__.startswith("transformers") else "diffusers"
        index[name] = [library, type(part).__name__]
        if hasattr(part, "save_config"):  # a diffusers model or scheduler
            part.save_config(folder / name)
        elif library == "transformers" and hasattr(part, "config"):
            part.config.save_pretrained(folder / name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


if __name__ == "__main__":  # regenerate the shipped configs of the SD families
    for name in ("sd1", "sd2", "sdxl"):
        save_configs(name, build_reference_components(name, device="meta"),
                     Path(__file__).parent / "assets" / "configs" / name)
