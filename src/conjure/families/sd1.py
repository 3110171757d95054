"""Stable Diffusion 1.x (reference: stable-diffusion-v1-5)."""

from conjure.families.encoders import CLIP_L
from conjure.families.unet_presets import UNET_PRESETS
from conjure.families.record import Family, ReferenceArchitecture, TextEncoderSlot

# four levels, cross-attention in the first three (SD 2.x keeps this layout)
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

SD1 = Family(
    name="sd1",
    title="Stable Diffusion 1.x",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", 768, "emb_params", "<|endoftext|>",
                                   checkpoint_prefix="cond_stage_model.transformer."),),
    reference=ReferenceArchitecture(
        resolution=512, down_blocks=DOWN_BLOCKS, up_blocks=UP_BLOCKS, block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=8, encoders=(CLIP_L,), vae_scale=0.18215, prediction_type="epsilon",
    ),
    ss_base_model_version="sd_v1",
    ss_v2=False,
    modelspec_prefix="stable-diffusion-v1",
    modelspec_prefix_v="stable-diffusion-v1",
    modelspec_implementation="diffusers",
    ss_version_prefix="sd_v1",
    modelspec_family="stable-diffusion-v1",
    pipeline_class="StableDiffusionPipeline",
    lora_presets=UNET_PRESETS,
    default_lora_preset="attention_ff",
)
