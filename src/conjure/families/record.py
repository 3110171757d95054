"""The record types of a model family: its text-encoder slots, its full-size architecture and the family itself."""

from __future__ import annotations

from dataclasses import dataclass


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
    # The UNet also reads this encoder's pooled projection, from its last layer (SDXL's 2nd); such an encoder is a
    # CLIPTextModelWithProjection, every other one a CLIPTextModel.
    pooled: bool = False
    # kohya's name prefix for this encoder's modules (sd-scripts networks/lora.py LORA_PREFIX_TEXT_ENCODER*):
    # "lora_te_" for a family's only encoder, "lora_te1_" / "lora_te2_" for SDXL's two.
    kohya_prefix: str = "lora_te_"

    def read_layer(self, clip_skip: int = 1) -> int:
        """The hidden state read with `clip_skip` (1: none), counted from the end (`hidden_states[-n]`)."""
        return self.hidden_layer + clip_skip - 1

    def unread_layers(self, clip_skip: int = 1) -> int:
        """How many of the encoder's last layers never reach the UNet: nothing they compute is read, so an adapter
        there gets no gradient (kohya-ss/sd-scripts#997, fixed in PR #1000 by leaving SDXL CLIP-L's last layer
        out; under DDP such a parameter stops the run at its second step)."""
        return 0 if self.pooled else self.read_layer(clip_skip) - 1


@dataclass(frozen=True)
class EncoderArchitecture:
    """A full-size CLIP text encoder (the published config.json of each model's text_encoder*/)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    activation: str  # OpenAI CLIP-L: quick_gelu; OpenCLIP ViT-H and ViT-bigG: gelu
    projection_dim: int


@dataclass(frozen=True)
class ReferenceArchitecture:
    """The full-size model of a family, from its published configs (stable-diffusion-v1-5, stable-diffusion-2-1,
    stable-diffusion-xl-base-1.0). `models/reference.py` builds it; `models/tiny.py` and `toy/pretrain.py` build
    it scaled down (same block kinds, encoder activations, VAE scale, prediction type; small widths)."""

    resolution: int  # native size in pixels: the VAE's sample_size, 8x the UNet's
    down_blocks: tuple[str, ...]
    up_blocks: tuple[str, ...]
    block_out_channels: tuple[int, ...]
    attention_head_dim: int | tuple[int, ...]  # diffusers' legacy name: the number of heads (per level)
    encoders: tuple[EncoderArchitecture, ...]  # in slot order; the UNet cross-attends to their widths side by side
    vae_scale: float  # the VAE's scaling_factor
    prediction_type: str  # the scheduler's: "epsilon" or "v_prediction"
    transformer_layers: tuple[int, ...] | None = None  # transformer blocks per attention, per level (SDXL)
    linear_projection: bool = False  # proj_in/proj_out are Linear, not 1x1 Conv2d (OpenCLIP-conditioned UNets)
    upcast_attention: bool = False
    # SDXL's micro-conditioning: size/crop ids and the pooled embedding enter through `text_time` add-embeddings
    # of this width per number (None: no add-embedding).
    addition_time_embed_dim: int | None = None
    addition_embed_heads: int | None = None
    vae_force_upcast: bool = False  # SDXL's VAE overflows in fp16

    @property
    def cross_attention_dim(self) -> int:
        return sum(e.hidden for e in self.encoders)


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl"
    title: str
    text_encoders: tuple[TextEncoderSlot, ...]
    reference: ReferenceArchitecture
    ss_base_model_version: str  # kohya metadata value
    # kohya's `ss_v2`, written "True"/"False" (train_network.py): A1111's Lora extension (network.py
    # detect_version) takes a file for SD 2.x only when it reads "True", whatever ss_base_model_version says.
    ss_v2: bool
    # modelspec.architecture prefixes ("/lora" or "/textual-inversion" is appended) of an epsilon and of a
    # v-prediction model: the spec names SD 2.x's two apart (kohya library/sai_model_spec.py ARCH_SD_V2_*).
    modelspec_prefix: str
    modelspec_prefix_v: str
    # modelspec.implementation (sai_model_spec.py: IMPL_STABILITY_AI for SDXL, IMPL_DIFFUSERS otherwise)
    modelspec_implementation: str
    # What marks a file of this family in other tools' metadata: the start of its `ss_base_model_version` and of
    # its `modelspec.architecture` (any variant: SD 2.x's -512 and -768-v, later SDXL versions).
    ss_version_prefix: str
    modelspec_family: str
    pipeline_class: str  # diffusers pipeline class name
    # kohya's UNet module names: "diffusers" paths (SD 1.x/2.x) or the original "ldm" ones (SDXL: sd-scripts'
    # sdxl_model_util converts the UNet to SGM's layout before naming its modules).
    unet_naming: str = "diffusers"
    # The pipeline class takes a safety checker (diffusers' SD pipelines; SDXL's has an invisible watermarker
    # instead), passed as None since conjure never loads it.
    safety_checker: bool = True
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

    def slot(self, encoder: str) -> TextEncoderSlot | None:
        """The slot of pipeline attribute `encoder` ("text_encoder_2"), or None when the family has no such encoder."""
        return next((s for s in self.text_encoders if s.encoder == encoder), None)

    def kohya_prefixes(self) -> dict[str, str]:
        """component -> kohya module-name prefix."""
        return {"unet": "lora_unet_", **{s.encoder: s.kohya_prefix for s in self.text_encoders}}
