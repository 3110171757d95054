"""Stable Diffusion XL (reference: stable-diffusion-xl-base-1.0)."""

from conjure.families.encoders import CLIP_L, OPENCLIP_BIGG
from conjure.families.unet_presets import UNET_PRESETS
from conjure.families.record import Family, ReferenceArchitecture, TextEncoderSlot

SDXL = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", 768, "clip_l", "<|endoftext|>", hidden_layer=2, final_norm=False,
                        kohya_prefix="lora_te1_", checkpoint_prefix="conditioner.embedders.0.transformer."),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", 1280, "clip_g", "!", hidden_layer=2, final_norm=False,
                        pooled=True, kohya_prefix="lora_te2_", checkpoint_prefix="conditioner.embedders.1.model.",
                        checkpoint_layout="open_clip"),
    ),
    reference=ReferenceArchitecture(
        resolution=1024, down_blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
        attention_head_dim=(5, 10, 20), encoders=(CLIP_L, OPENCLIP_BIGG), vae_scale=0.13025,
        prediction_type="epsilon", transformer_layers=(1, 2, 10), linear_projection=True,
        addition_time_embed_dim=256, addition_embed_heads=64, vae_force_upcast=True,
    ),
    ss_base_model_version="sdxl_base_v1-0",
    ss_v2=False,
    modelspec_prefix="stable-diffusion-xl-v1-base",
    modelspec_prefix_v="stable-diffusion-xl-v1-base",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    ss_version_prefix="sdxl",
    modelspec_family="stable-diffusion-xl",
    pipeline_class="StableDiffusionXLPipeline",
    unet_naming="ldm",
    safety_checker=False,
    clip_skip=False,
    lora_presets=UNET_PRESETS,
    default_lora_preset="attention_ff",
)
