"""A whole FLUX.1 model from ComfyUI's all-in-one checkpoint (Comfy-Org's flux1-dev-fp8 / flux1-schnell-fp8), offline
and with no `basic.base_model_config`.

Such a file holds the transformer under `model.diffusion_model.` (BFL's names), the VAE under `vae.` (BFL's
autoencoder, which has the LDM names), CLIP-L under `text_encoders.clip_l.transformer.` and T5-XXL under
`text_encoders.t5xxl.transformer.` (both in the transformers models' own names): ComfyUI's comfy/supported_models.py
class Flux (vae_key_prefix ["vae."], text_encoder_key_prefix ["text_encoders."], clip_target reading T5 at
"text_encoders.t5xxl.transformer.") and comfy/text_encoders/flux.py FluxClipModel (`clip_l`, `t5xxl`, each an
SDClipModel holding the transformers model as `.transformer`), read in the copies the code search holds (the
repository's snapshot was too large to fetch, so no single commit); the prefixes are the family record's
(`Family.checkpoint_vae_prefix`, `TextEncoderSlot.checkpoint_prefix`). Each part is built on the meta device from
the configs conjure ships (`assets/configs/flux`: its README says where each comes from) and filled from its own
tensors, read in the dtype it lives in, through diffusers' converters (loaders/single_file_utils.py,
diffusers 0.42.1: AutoencoderKL.from_single_file, create_diffusers_clip_model_from_ldm and
create_diffusers_t5_model_from_checkpoint, which read these very prefixes for SD 3's all-in-one files). The
transformer loads as a transformer file does (transformer_loading.read_single_transformer: deferred while captions
are encoded ahead, streamed under float8). The variant comes from the file's keys (a guidance embedder is dev);
its transformer and scheduler configs are the variant's, every other config is shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conjure import families
from conjure.families import Family
from conjure.models.single_file import CONFIGS, CheckpointTensors, filled

FLUX_CONFIGS = CONFIGS / "flux"  # the shared configs and tokenizer; <variant>/: transformer and scheduler


def is_all_in_one(fam: Family, keys: set[str]) -> bool:
    """Whether a FLUX.1 file also holds its VAE and both text encoders (ComfyUI's all-in-one checkpoint)."""
    prefixes = (fam.checkpoint_vae_prefix, *(slot.checkpoint_prefix for slot in fam.text_encoders))
    return all(any(k.startswith(prefix) for k in keys) for prefix in prefixes)


def variant_configs(fam: Family, guidance: bool) -> Path:
    """The folder of the shipped transformer and scheduler configs of the variant with (dev) or without a guidance
    input."""
    return FLUX_CONFIGS / families.variant_with_guidance(fam, guidance).name


def tokenizer(fam: Family, kind: str, pad_token: str) -> Any:
    """A shipped tokenizer: CLIP-L's is conjure's (`models/tokenizer.py`, open_clip's BPE vocabulary, as the SD
    families'), T5's the T5TokenizerFast files of FLUX.1's tokenizer_2/."""
    from transformers import T5TokenizerFast

    from conjure.models.tokenizer import clip_tokenizer

    if kind == "clip":
        return clip_tokenizer(pad_token)
    slot = next(s for s in fam.text_encoders if s.kind == kind)
    return T5TokenizerFast.from_pretrained(str(FLUX_CONFIGS / slot.tokenizer))


def load_parts(path: Path, fam: Family, variant_folder: Path, dtype: Any, transformer: Any) -> dict[str, Any]:
    """The file's VAE (float32) and text encoders (`dtype`), the shipped tokenizers and the variant's scheduler,
    beside `transformer` (transformer_loading.load_parts' counterpart)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )
    from transformers import CLIPTextModel, T5EncoderModel

    tensors = CheckpointTensors(path)
    config = str(FLUX_CONFIGS)

    def own(prefix: str, part_dtype: Any) -> dict[str, Any]:
        return tensors.read(sorted(k for k in tensors.keys if k.startswith(prefix)), part_dtype)

    builders = {"clip": (create_diffusers_clip_model_from_ldm, CLIPTextModel),
                "t5": (create_diffusers_t5_model_from_checkpoint, T5EncoderModel)}
    parts: dict[str, Any] = {
        fam.denoiser: transformer,
        "vae": filled(AutoencoderKL.from_single_file(own(fam.checkpoint_vae_prefix, torch.float32), config=config,
                                                     subfolder="vae", torch_dtype=torch.float32), "VAE", path),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(str(variant_folder), subfolder="scheduler"),
    }
    for slot in fam.text_encoders:
        build, cls = builders[slot.kind]
        encoder = build(cls, own(slot.checkpoint_prefix, dtype), subfolder=slot.encoder, config=config,
                        torch_dtype=dtype)
        encoder.tie_weights()  # T5's encoder.embed_tokens is its `shared` embedding, which the file holds
        parts[slot.encoder] = filled(encoder.eval(), slot.encoder, path)
        parts[slot.tokenizer] = tokenizer(fam, slot.kind, slot.pad_token)
    return parts
