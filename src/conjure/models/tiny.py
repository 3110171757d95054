"""Small random-weight Stable Diffusion and FLUX.1 models (SD1, SD2, SDXL, FLUX layouts) for tests, demos and
benchmarks. FLUX.1 (dev-like by default, `variant="schnell"` without the guidance input) is built by
`conjure.models.tiny_flux`, which says its widths; the rest of this docstring is about the SD families.

They are real diffusers pipelines in the standard folder layout (model_index.json + unet/, vae/, text_encoder/,
tokenizer/, scheduler/, and text_encoder_2/, tokenizer_2/ for SDXL): everything that loads, trains or exports a
real model can run on them in seconds on a CPU, offline. The tokenizers are the real CLIP ones
(`conjure.models.tokenizer`), so token ids match real models; the weights are random, so images are noise.

Two sizes:

- default: text encoders of hidden size 32 (2 layers, 4 heads, intermediate 64), a 2-level UNet with 32/64
  channels, a 4-level VAE with 8/16 channels (keeps the real x8 scale: 64x64 px <-> 8x8 latents). The 49,408-row
  token embedding dominates the size.
- `real_widths=True`: the text encoders have the real families' widths (SD1 768, 12 heads; SD2 1024, 16 heads;
  SDXL 768 + 1280 with a 1280 projection) and the real MLP widths (4x hidden), but only 2 layers; the UNet has the
  real cross-attention width (768 / 1024 / 2048), `layers_per_block=2` and the real block layout (SD1/SD2: 4 levels,
  three with cross-attention; SDXL: 3 levels, the last two with cross-attention, 1/2/2 transformer layers instead
  of the real 1/2/10) with small channels (32..64), SDXL's real time-embedding sizes (256, 6*256+1280).
  Embeddings trained on these have exactly the real shapes; text-encoder LoRAs have the real shapes and a subset
  of the real key names (layers 0-1 of 12/23/32); UNet LoRA key names are a subset of the real ones, but UNet
  channel widths stay small, so only the cross-attention to_k/to_v input widths match. The VAE stays tiny.
- `real_layout=True` (with the default widths): the UNet block layout of `real_widths` (SD1/SD2: 4 levels, SDXL:
  3 levels, `layers_per_block=2`, so every kohya/LDM key-naming case of the real UNets occurs) with the default
  small text encoders and cross-attention widths; about as fast as the default (for LoRA naming tests).

Measured (2-core CPU, 1 thread, torch 2.13, diffusers 0.42.1, transformers 5.24; best of 2; fp32 safetensors;
not counting the ~3 s import of diffusers/transformers):

    family  widths    build_tiny_components   write_tiny_model (build + save)   on disk
    sd1     default   0.14 s                  0.5-0.6 s                          15 MB
    sd2     default   0.14 s                  0.5-0.6 s                          15 MB
    sdxl    default   0.24 s                  0.6 s                              27 MB
    sd1     real      1.1 s                   1.9 s                             228 MB (text encoder 209 MB)
    sd2     real      1.5 s                   4.3 s                             324 MB (text encoder 304 MB)
    sdxl    real      4.0 s                   6.9 s                             674 MB (encoders 209 + 417 MB)

Each tokenizer folder is 5.1 MB (tokenizer.json, vocab.json, merges.txt); the rest of a default model is mostly
the 49,408 x 32 token embedding (6.4 MB per text encoder). Loading a default folder back takes 0.3-0.9 s and a
2-step 64x64 image 0.05 s; real widths load in ~0.7 s and generate in ~0.2 s.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from conjure import families
from conjure.errors import ConjureError
from conjure.families import Family, TransformerArchitecture
from conjure.models.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, clip_tokenizer, write_clip_tokenizer

__all__ = ["FAMILIES", "build_tiny_components", "save_model_folder", "write_tiny_model"]

FAMILIES = tuple(families.FAMILIES)  # every family has a tiny model (FLUX.1: models/tiny_flux.py)

# The default size: every encoder 32 wide with 4 heads; the UNet's two levels are 32 and 64 channels wide.
_SMALL_ENCODER = dict(hidden=32, heads=4, intermediate=64, projection_dim=32)
_SMALL_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


@dataclass(frozen=True)
class _TextEncoderSpec:
    hidden: int
    heads: int
    intermediate: int
    act: str
    projection_dim: int
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's second encoder)
    layers: int = 2


def _text_encoder_specs(
    family: Family, real_widths: bool, encoder_widths: tuple[int, ...] | None = None
) -> tuple[_TextEncoderSpec, ...]:
    """The reference encoders with 2 layers (real_widths), or also 32 (or `encoder_widths`) wide: activations and
    projections kept."""
    specs = []
    for i, (slot, arch) in enumerate(zip(family.text_encoders, family.reference.encoders)):
        widths = dict(hidden=arch.hidden, heads=arch.heads, intermediate=arch.intermediate,
                      projection_dim=arch.projection_dim) if real_widths else _SMALL_ENCODER
        if encoder_widths:
            w = encoder_widths[i]
            widths = dict(hidden=w, heads=4, intermediate=2 * w, projection_dim=w)
        specs.append(_TextEncoderSpec(**widths, act=arch.activation, with_projection=slot.pooled))
    return tuple(specs)


def _unet_config(
    family: Family, real_widths: bool, text_specs: tuple[_TextEncoderSpec, ...], real_layout: bool = False
) -> dict[str, Any]:
    arch = family.reference
    cross_attention_dim = sum(s.hidden for s in text_specs)  # SDXL concatenates both encoders' hidden states
    config: dict[str, Any] = dict(
        sample_size=8,  # pipelines default to sample_size * 8 = 64 px
        in_channels=4,
        out_channels=4,
        attention_head_dim=8,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=arch.linear_projection,
    )
    if not real_widths and not real_layout:
        config.update(_SMALL_UNET)
    else:
        # the reference block layout, 32 channels wide but the last two levels 64 (SD: 32/32/64/64, SDXL: 32/64/64)
        levels = len(arch.block_out_channels)
        config.update(
            block_out_channels=(32,) * (levels - 2) + (64, 64),
            layers_per_block=2,
            down_block_types=arch.down_blocks,
            up_block_types=arch.up_blocks,
        )
        if arch.transformer_layers:
            config["transformer_layers_per_block"] = tuple(min(n, 2) for n in arch.transformer_layers)  # SDXL: 1/2/10
    if arch.addition_time_embed_dim:
        time_dim = arch.addition_time_embed_dim if real_widths else 8
        pooled_dim = text_specs[-1].projection_dim
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # 6 micro-conditioning numbers (original size, crop top-left, target size), each time-embedded
            projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        )
    return config


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for one module build without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_components(
    family: str, *, real_widths: bool = False, real_layout: bool = False, seed: int = 0, variant: str | None = None,
    encoder_widths: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Random-weight pipeline components for `family` ("sd1", "sd2" or "sdxl"), deterministic for `seed`.

    sd1/sd2: unet, vae, text_encoder, tokenizer, scheduler, safety_checker=None, feature_extractor=None,
    image_encoder=None -> `StableDiffusionPipeline(**components, requires_safety_checker=False)`.
    sdxl: unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, image_encoder=None,
    feature_extractor=None -> `StableDiffusionXLPipeline(**components)`.
    Each module is built under its own seed (seed, seed+1, ...) in a forked RNG: the caller's torch RNG is untouched.
    real_layout: the real UNet block layout (layers_per_block=2) with the default small widths (module docstring).
    encoder_widths: the small text encoders' hidden sizes (default 32 each). diffusers' from_single_file tells
    SDXL's two encoders apart by width (single_file_utils.py create_diffusers_clip_model_from_ldm), so a model
    that goes through a single file needs them to differ, as the real ones do (768, 1280).
    flux: transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler, image_encoder=None,
    feature_extractor=None -> `FluxPipeline(**components)`; `variant`: "dev" (default) or "schnell".
    """
    fam = families.get(family)
    if isinstance(fam.reference, TransformerArchitecture):
        if real_widths or real_layout:
            # one real-width FLUX.1 block pair and a 2-layer T5-XXL are already ~4 GB: use models.reference on meta
            raise ConjureError(f"{fam.title} has no real_widths/real_layout tiny model; use "
                               "conjure.models.reference.build_reference_components on the meta device")
        from conjure.models.tiny_flux import build_tiny_flux_components

        return build_tiny_flux_components(fam, fam.reference, variant=variant, seed=seed)
    arch = fam.reference
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizers = [clip_tokenizer(pad) for pad in fam.pad_tokens]
    text_specs = _text_encoder_specs(fam, real_widths, encoder_widths)

    with seeded(seed):
        unet = UNet2DConditionModel(**_unet_config(fam, real_widths, text_specs, real_layout))
    with seeded(seed + 1):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=64,
            scaling_factor=arch.vae_scale,  # the real VAE's factor
        )
    text_encoders = []
    for i, (spec, tokenizer) in enumerate(zip(text_specs, tokenizers)):
        config = CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            max_position_embeddings=MODEL_MAX_LENGTH,
            hidden_act=spec.act,
            projection_dim=spec.projection_dim,
            # From the tokenizer: a wrong eos id makes pooling pick the wrong position (SDXL's pooled embedding).
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model_cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
        with seeded(seed + 2 + i):
            text_encoders.append(model_cls(config).eval())

    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        prediction_type=arch.prediction_type,
    )
    components: dict[str, Any] = {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }
    for slot, encoder, tokenizer in zip(fam.text_encoders, text_encoders, tokenizers):
        components[slot.encoder] = encoder
        components[slot.tokenizer] = tokenizer
    if fam.safety_checker:
        components["safety_checker"] = None
    return components


def write_tiny_model(
    family: str, out_dir: Path, *, real_widths: bool = False, real_layout: bool = False, seed: int = 0,
    variant: str | None = None, encoder_widths: tuple[int, ...] | None = None,
) -> Path:
    """Write a random-weight diffusers model folder for `family` into `out_dir` and return `out_dir`.

    Loads back with `StableDiffusionPipeline.from_pretrained(out_dir)` (sd1, sd2) or
    `StableDiffusionXLPipeline.from_pretrained(out_dir)` (sdxl), or one part at a time, e.g.
    `UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet")`. Files of the same names already in
    `out_dir` are overwritten. Sizes and times: see the module docstring.
    """
    families.get(family)  # an unknown family fails before anything is written
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConjureError(f"cannot write a model to {out_dir}: it is a file, not a folder")
    components = build_tiny_components(family, real_widths=real_widths, real_layout=real_layout, seed=seed,
                                       variant=variant, encoder_widths=encoder_widths)
    return save_model_folder(family, components, out_dir)


def save_model_folder(family: str, components: dict[str, Any], out_dir: Path) -> Path:
    """Save pipeline components as a standard diffusers model folder (also used for full-size models)."""
    import inspect

    import diffusers

    fam = families.get(family)
    pipeline_class = getattr(diffusers, fam.pipeline_class)
    # no output filter: SD pipelines would warn about the missing safety checker, SDXL's adds a watermarker
    quiet = {k: False for k in ("requires_safety_checker", "add_watermarker")
             if k in inspect.signature(pipeline_class).parameters}
    pipe = pipeline_class(**components, **quiet)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # save_pretrained writes only tokenizer.json + tokenizer_config.json in transformers 5; rewrite the CLIP
    # tokenizer folders with vocab.json/merges.txt/special_tokens_map.json too, like real SD folders (and
    # transformers 4). (A T5 tokenizer keeps its tokenizer.json: it has no SentencePiece model to write.)
    for slot in fam.text_encoders:
        if slot.kind != "clip":
            continue
        write_clip_tokenizer(out_dir / slot.tokenizer, slot.pad_token)
        _prefix_text_model_keys(out_dir / slot.encoder / "model.safetensors")
    return out_dir


def _prefix_text_model_keys(path: Path) -> None:
    """Give a saved CLIP text encoder the `text_model.` key prefix that real SD folders have.

    transformers 5 saves `CLIPTextModel` without it (`embeddings.token_embedding.weight`) but
    `CLIPTextModelWithProjection` with it; transformers 5 loads both spellings, transformers 4 and tools that
    read the file directly (e.g. diffusers-to-original-SD converters) only the prefixed one.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    keep = ("text_model.", "text_projection.")
    if all(k.startswith(keep) for k in state):
        return
    renamed = {(k if k.startswith(keep) else f"text_model.{k}"): v for k, v in state.items()}
    save_file(renamed, path, metadata={"format": "pt"})
