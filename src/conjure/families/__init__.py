"""Model families: the facts about SD 1.x, SD 2.x and SDXL that methods and the loop need, in one place.

Each family is one small `Family` record (text encoders and their widths, which of their hidden states the
UNet reads, the embedding file's tensor names, modelspec names, default resolution). Methods and the training loop ask the family; they never
branch on a family name. `detect()` reads the family from a loaded model's own configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conjure.errors import ConjureError


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: pipeline attribute names and the real model's width."""

    encoder: str  # pipeline attribute, e.g. "text_encoder_2"
    tokenizer: str  # pipeline attribute, e.g. "tokenizer_2"
    width: int  # hidden size of the real family's encoder (tiny test models are narrower)
    embedding_key: str  # tensor name of this encoder's rows in an embedding file (FORMATS.md)
    pad_token: str  # the real tokenizer's padding: "<|endoftext|>" for CLIP-L, "!" for the OpenCLIP encoders
    # The hidden state the UNet reads, counted from the end, and whether the final layer norm is applied to it:
    # SD 1.x reads the last one (normed: `last_hidden_state`); so does SD 2.x, whose diffusers encoder already
    # ends at OpenCLIP's penultimate layer; SDXL reads both encoders' penultimate one as it is (sgm's
    # `layer: penultimate`, diffusers' `hidden_states[-2]`).
    hidden_layer: int = 1
    final_norm: bool = True
    pooled: bool = False  # the UNet also reads this encoder's pooled projection, from its last layer (SDXL's 2nd)

    def read_layer(self, clip_skip: int = 1) -> int:
        """The hidden state read with `clip_skip` (1: none), counted from the end (`hidden_states[-n]`)."""
        return self.hidden_layer + clip_skip - 1

    def unread_layers(self, clip_skip: int = 1) -> int:
        """How many of the encoder's last layers never reach the UNet: nothing they compute is read, so an adapter
        there gets no gradient (kohya-ss/sd-scripts#997, fixed in PR #1000 by leaving SDXL CLIP-L's last layer
        out; under DDP such a parameter stops the run at its second step)."""
        return 0 if self.pooled else self.read_layer(clip_skip) - 1


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl"
    title: str
    text_encoders: tuple[TextEncoderSlot, ...]
    default_resolution: int
    ss_base_model_version: str  # kohya metadata value
    # kohya's `ss_v2`, written "True"/"False" (train_network.py): A1111's Lora extension (network.py
    # detect_version) takes a file for SD 2.x only when it reads "True", whatever ss_base_model_version says.
    ss_v2: bool
    # modelspec.architecture prefixes ("/lora" or "/textual-inversion" is appended) of an epsilon and of a
    # v-prediction model: the spec names SD 2.x's two apart (kohya library/sai_model_spec.py ARCH_SD_V2_*).
    modelspec_prefix: str
    modelspec_prefix_v: str
    pipeline_class: str  # diffusers pipeline class name
    # One architecture, two targets (SD 2.x: 768-v and 2.x-base): a single file does not say which. ComfyUI's
    # SD20.model_type reads v-prediction from the spread of this UNet tensor (LDM name); each target's resolution.
    prediction_probe: str | None = None
    prediction_probe_threshold: float = 0.0
    resolution_by_prediction: tuple[tuple[str, int], ...] = ()
    # advanced.clip_skip applies (kohya's --clip_skip, A1111's "Clip skip": SD 1.x/2.x). SDXL is conditioned on fixed
    # layers; kohya ignores clip skip there ("clip_skip will be unexpected", sdxl_train_util.py).
    clip_skip: bool = True

    def modelspec_architecture(self, kind: str, prediction_type: str) -> str:
        """`prediction_type`: diffusers' name of what the trained model predicts, "epsilon" or "v_prediction"."""
        prefix = {"epsilon": self.modelspec_prefix, "v_prediction": self.modelspec_prefix_v}[prediction_type]
        return f"{prefix}/{kind}"

    @property
    def pad_tokens(self) -> tuple[str, ...]:
        return tuple(slot.pad_token for slot in self.text_encoders)


SD1 = Family(
    name="sd1",
    title="Stable Diffusion 1.x",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", 768, "emb_params", "<|endoftext|>"),),
    default_resolution=512,
    ss_base_model_version="sd_v1",
    ss_v2=False,
    modelspec_prefix="stable-diffusion-v1",
    modelspec_prefix_v="stable-diffusion-v1",
    pipeline_class="StableDiffusionPipeline",
)
SD2 = Family(
    name="sd2",
    title="Stable Diffusion 2.x",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", 1024, "emb_params", "!"),),
    default_resolution=768,
    ss_base_model_version="sd_v2",
    ss_v2=True,
    modelspec_prefix="stable-diffusion-v2-512",
    modelspec_prefix_v="stable-diffusion-v2-768-v",
    pipeline_class="StableDiffusionPipeline",
    prediction_probe="output_blocks.11.1.transformer_blocks.0.norm1.bias",
    prediction_probe_threshold=0.09,
    resolution_by_prediction=(("epsilon", 512), ("v_prediction", 768)),
)
SDXL = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", 768, "clip_l", "<|endoftext|>", hidden_layer=2, final_norm=False),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", 1280, "clip_g", "!", hidden_layer=2, final_norm=False,
                        pooled=True),
    ),
    default_resolution=1024,
    ss_base_model_version="sdxl_base_v1-0",
    ss_v2=False,
    modelspec_prefix="stable-diffusion-xl-v1-base",
    modelspec_prefix_v="stable-diffusion-xl-v1-base",
    pipeline_class="StableDiffusionXLPipeline",
    clip_skip=False,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL)}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConjureError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def detect(unet_config: Any, has_text_encoder_2: bool) -> Family:
    """Tell the family from the UNet's config (a diffusers FrozenDict or a plain dict).

    SDXL conditions on size/crop through `addition_embed_type="text_time"` and has a second text encoder;
    SD 2.x uses linear projections in its transformers (and 1024-wide cross-attention); SD 1.x neither.
    Width alone is not enough: tiny test models share one width across families.
    """
    cfg = dict(unet_config)
    if cfg.get("addition_embed_type") == "text_time" or has_text_encoder_2:
        return SDXL
    if cfg.get("use_linear_projection") or cfg.get("cross_attention_dim") == 1024:
        return SD2
    return SD1
