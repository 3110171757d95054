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
from conjure.errors import ConjureError

_CROSS_ATTN3 = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_CROSS_ATTN3_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

UNET = {
    "sd1": dict(
        sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, down_block_types=_CROSS_ATTN3, up_block_types=_CROSS_ATTN3_UP,
    ),
    "sd2": dict(
        sample_size=96, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20], down_block_types=_CROSS_ATTN3, up_block_types=_CROSS_ATTN3_UP,
        use_linear_projection=True, upcast_attention=True,
    ),
    "sdxl": dict(
        sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
        addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
# (hidden, intermediate, layers, heads, activation, projection_dim, with projection)
TEXT = {
    "clip-l": (768, 3072, 12, 12, "quick_gelu", 768, False),
    "openclip-h": (1024, 4096, 23, 16, "gelu", 512, False),
    "openclip-bigg": (1280, 5120, 32, 20, "gelu", 1280, True),
}
ENCODERS = {"sd1": ["clip-l"], "sd2": ["openclip-h"], "sdxl": ["clip-l", "openclip-bigg"]}
VAE = {"sd1": (512, 0.18215), "sd2": (768, 0.18215), "sdxl": (1024, 0.13025)}
SCHEDULER = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}


def build_reference_vae(family: str, *, device: str = "cpu") -> Any:
    """The full-size VAE of `family` (random weights, float32): SD 1.x/2.x and SDXL share the architecture and
    differ in sample size and scaling factor."""
    import torch
    from diffusers import AutoencoderKL

    size, scale = VAE[family]
    with torch.device(device):
        return AutoencoderKL(
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=size,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            scaling_factor=scale, force_upcast=family == "sdxl",
        )


def build_reference_components(family: str, *, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Pipeline components of the full-size `family` model, random weights, float32."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conjure.models.tokenizer import clip_tokenizer

    if family not in UNET:
        raise ConjureError(f"unknown model family {family!r}: choose one of {', '.join(UNET)}")
    torch.manual_seed(seed)
    parts: dict[str, Any] = {}
    with torch.device(device):
        parts["unet"] = UNet2DConditionModel(**UNET[family])
        parts["vae"] = build_reference_vae(family, device=device)
        for i, (name, pad) in enumerate(zip(ENCODERS[family], families.get(family).pad_tokens)):
            hidden, inter, layers, heads, act, proj, with_proj = TEXT[name]
            config = CLIPTextConfig(
                vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, hidden_act=act, projection_dim=proj, max_position_embeddings=77,
                bos_token_id=0, eos_token_id=2, pad_token_id=1,
            )
            suffix = "" if i == 0 else f"_{i + 1}"
            parts[f"text_encoder{suffix}"] = (CLIPTextModelWithProjection if with_proj else CLIPTextModel)(config)
            parts[f"tokenizer{suffix}"] = clip_tokenizer(pad)
    parts["scheduler"] = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
        prediction_type=SCHEDULER[family],
    )
    if family != "sdxl":
        parts.update(safety_checker=None, feature_extractor=None, image_encoder=None)
    else:
        parts.update(feature_extractor=None, image_encoder=None)
    return parts
