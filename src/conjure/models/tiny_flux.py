"""The tiny random-weight FLUX.1 (`conjure.models.tiny` builds it for family "flux").

FLUX.1-dev's layout scaled down, as tiny.py scales the SD families: FluxTransformer2DModel with 2 double- and
2 single-stream blocks, 2 heads of 16 (RoPE axes 4/6/6 for the reference's 16/56/56; each axis must be even),
joint_attention_dim and pooled_projection_dim the tiny encoders' widths (32); a VAE in SD's 4-level layout
(x8, 64 px <-> 8x8 latents) with FLUX's traits: no quant convolutions, its scaling and shift factors, and 4
latent channels (the reference has 16; packed 2x2 they are the transformer's 16 input channels); CLIP-L's
tiny twin (tiny.py's 32-wide CLIP text model with the real CLIP tokenizer) and a T5 v1.1-style encoder
(gated-gelu, 32 wide, 2 layers, 4 heads of 8); the variant's FlowMatchEulerDiscreteScheduler config
(`reference.FLUX_SCHEDULERS`). Builds in ~0.3 s; a folder is ~8 MB, mostly CLIP's 49,408-row embedding.

T5's real tokenizer is a SentencePiece model that is not shipped here, so the T5 tokenizer is the toy FLUX's
(`conjure.toy.tokenizer.toy_t5_tokenizer`): a Unigram vocabulary with T5's special tokens at T5's ids (pad 0,
eos 1, unk 2) in which every toy word is one token and any other printable text falls back to characters;
16 tokens long (FLUX reads min(the variant's T5 length, the tokenizer's)).
"""

from __future__ import annotations

from typing import Any

from conjure.families import Family, T5Architecture, TransformerArchitecture

# FLUX.1's layout at toy widths (module docstring)
_TRANSFORMER = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                    axes_dims_rope=(4, 6, 6))
_WIDTH = 32  # both text encoders' hidden size
_T5 = dict(d_model=_WIDTH, d_ff=64, d_kv=8, layers=2, heads=4)  # T5 v1.1: gated-gelu
_LATENT_CHANNELS = 4


def build_tiny_flux_components(fam: Family, arch: TransformerArchitecture, *, variant: str | None,
                               seed: int) -> dict[str, Any]:
    """Random-weight FluxPipeline components (module docstring), each module under its own seed."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    from conjure.models.reference import FLUX_SCHEDULERS, t5_config
    from conjure.models.tiny import seeded
    from conjure.models.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, clip_tokenizer
    from conjure.toy.tokenizer import toy_t5_tokenizer

    chosen = fam.variant(variant)
    clip_slot, t5_slot = fam.text_encoders
    clip_tok, t5_tok = clip_tokenizer(clip_slot.pad_token), toy_t5_tokenizer()
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=_LATENT_CHANNELS * arch.patch ** 2, joint_attention_dim=_WIDTH,
            pooled_projection_dim=_WIDTH, guidance_embeds=chosen.guidance, **_TRANSFORMER,
        )
    with seeded(seed + 1):
        vae = AutoencoderKL(
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
            latent_channels=_LATENT_CHANNELS, sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=arch.vae_scale, shift_factor=arch.vae_shift,
            use_quant_conv=False, use_post_quant_conv=False,
        )
    clip_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH, hidden_act="quick_gelu", projection_dim=_WIDTH,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    )
    with seeded(seed + 2):
        clip = CLIPTextModel(clip_config).eval()
    t5_arch = T5Architecture(vocab_size=len(t5_tok), **_T5)
    with seeded(seed + 3):
        t5 = T5EncoderModel(t5_config(t5_arch, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                                      decoder_start_token_id=t5_tok.pad_token_id)).eval()
    return {
        "transformer": transformer.eval(), "vae": vae.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[chosen.name]),
        clip_slot.encoder: clip, clip_slot.tokenizer: clip_tok, t5_slot.encoder: t5, t5_slot.tokenizer: t5_tok,
        "image_encoder": None, "feature_extractor": None,
    }
