"""Stable Diffusion 2.x (reference: stable-diffusion-2-1, the 768-v model; 2.x-base differs in target and size)."""

from conjure.families.encoders import OPENCLIP_H
from conjure.families.unet_presets import UNET_PRESETS
from conjure.families.record import Family, ReferenceArchitecture, TextEncoderSlot
from conjure.families.sd1 import DOWN_BLOCKS, UP_BLOCKS

SD2 = Family(
    name="sd2",
    title="Stable Diffusion 2.x",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", 1024, "emb_params", "!",
                                   checkpoint_prefix="cond_stage_model.model.", checkpoint_layout="open_clip",
                                   checkpoint_dropped_layers=1),),
    reference=ReferenceArchitecture(
        resolution=768, down_blocks=DOWN_BLOCKS, up_blocks=UP_BLOCKS, block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=(5, 10, 20, 20), encoders=(OPENCLIP_H,), vae_scale=0.18215,
        prediction_type="v_prediction", linear_projection=True, upcast_attention=True,
    ),
    ss_base_model_version="sd_v2",
    ss_v2=True,
    modelspec_prefix="stable-diffusion-v2-512",
    modelspec_prefix_v="stable-diffusion-v2-768-v",
    modelspec_implementation="diffusers",
    ss_version_prefix="sd_v2",
    modelspec_family="stable-diffusion-v2",
    pipeline_class="StableDiffusionPipeline",
    prediction_probe="output_blocks.11.1.transformer_blocks.0.norm1.bias",
    prediction_probe_threshold=0.09,
    resolution_by_prediction=(("epsilon", 512), ("v_prediction", 768)),
    lora_presets=UNET_PRESETS,
    default_lora_preset="attention_ff",
)
