"""FLUX.1 (reference: black-forest-labs/FLUX.1-dev; FLUX.1-schnell has the same architecture without the
guidance input, and was distilled for 256 T5 tokens)."""

from conjure.families.encoders import CLIP_L, T5_XXL
from conjure.families.record import Family, TextEncoderSlot, TransformerArchitecture, Variant

_DOUBLE = r"^transformer_blocks\.\d+\."
_SINGLE = r"^single_transformer_blocks\.\d+\."
# diffusers' FluxTransformer2DModel paths. Image and text streams of the double blocks, then the single blocks'
# attention (whose output projection is the fused `proj_out`, kohya's `linear2`, counted with the MLP).
ATTENTION = (
    _DOUBLE + r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
    _SINGLE + r"attn\.(to_q|to_k|to_v)$",
)
MLP = (_DOUBLE + r"(ff|ff_context)\.net\.(0\.proj|2)$", _SINGLE + r"(proj_mlp|proj_out)$")
# The adaptive-norm modulation linears (kohya's img_mod_lin / txt_mod_lin / modulation_lin). Never the model's
# final norm_out / proj_out: anchored to the blocks, so the top-level `proj_out` does not match.
MODULATION = (_DOUBLE + r"(norm1|norm1_context)\.linear$", _SINGLE + r"norm\.linear$")

FLUX = Family(
    name="flux",
    title="FLUX.1",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", 768, "clip_l", "<|endoftext|>", output="pooled",
                        kohya_prefix="lora_te1_", checkpoint_prefix="text_encoders.clip_l.transformer."),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", 4096, "t5", "<pad>", kind="t5", kohya_prefix="lora_te2_",
                        checkpoint_prefix="text_encoders.t5xxl.transformer."),
    ),
    reference=TransformerArchitecture(
        resolution=1024, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), latent_channels=16,
        vae_scale=0.3611, vae_shift=0.1159, encoders=(CLIP_L, T5_XXL),
    ),
    # ComfyUI's all-in-one checkpoint (comfy/supported_models.py class Flux: vae_key_prefix ["vae."],
    # text_encoder_key_prefix ["text_encoders."]; comfy/text_encoders/flux.py FluxClipModel's clip_l / t5xxl, each
    # an SDClipModel holding the transformers model as `.transformer`): models/flux_single_file.py's docstring
    checkpoint_vae_prefix="vae.",
    ss_base_model_version="flux1",  # sd-scripts flux_train_network.py
    ss_v2=False,
    modelspec_prefix="flux-1-dev",
    modelspec_prefix_v="flux-1-dev",
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    ss_version_prefix="flux1",
    modelspec_family="flux-1",
    pipeline_class="FluxPipeline",
    # kohya names FLUX.1 modules after BFL's model, with q/k/v fused (export/kohya_flux.py)
    unet_naming="bfl",
    safety_checker=False,
    clip_skip=False,
    pixel_multiple=16,
    guidance_scale=3.5,  # FluxPipeline's default: dev's distilled guidance
    denoiser="transformer",
    objective="flow",
    conditioning="flux",
    variants=(
        Variant("dev", "FLUX.1-dev", "flux-1-dev", guidance=True, text_tokens=512),
        Variant("schnell", "FLUX.1-schnell", "flux-1-schnell", guidance=False, text_tokens=256),
    ),
    lora_presets=(
        ("attention", ATTENTION),
        ("attention_mlp", ATTENTION + MLP),
        ("all", ATTENTION + MLP + MODULATION),
    ),
    default_lora_preset="attention_mlp",
)
