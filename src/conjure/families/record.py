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
    # "clip": a CLIP text model read in 77-token windows (CLIPTokenizer); "t5": a T5 encoder (T5TokenizerFast)
    # read as one sequence of the family variant's length (FLUX.1's T5-XXL).
    kind: str = "clip"
    # What the denoiser reads of this encoder: "hidden" (hidden states, per `hidden_layer`, and the projected
    # pooled embedding where `pooled`) or "pooled" (only a CLIPTextModel's `pooler_output`: FLUX.1's CLIP-L,
    # FluxPipeline._get_clip_prompt_embeds).
    output: str = "hidden"
    # Where this encoder's tensors sit in a single-file checkpoint (the original LDM / SGM layout that A1111/Forge,
    # ComfyUI and InvokeAI load as a main model; diffusers' single_file_utils.py LDM_CLIP_PREFIX_TO_REMOVE and
    # create_diffusers_clip_model_from_ldm), and how they are named there: "hf" (transformers' CLIP names under
    # `text_model.`) or "open_clip" (OpenCLIP's `transformer.resblocks.N` with q/k/v fused into `in_proj_*` and a
    # transposed `text_projection`). "": the family has no such checkpoint (FLUX.1's files hold the transformer).
    checkpoint_prefix: str = ""
    checkpoint_layout: str = "hf"
    # Layers at the end of the original tower that the diffusers encoder leaves out: SD 2.x's is OpenCLIP-H cut
    # at the penultimate layer SD 2.x reads (diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE drops resblocks.23), and
    # without the projection. Every published SD 2.x file has the 24th layer and ComfyUI's SD2 CLIP expects it
    # (comfy/text_encoders/sd2_clip_config.json: 24 layers), so the writer puts it back (export/single_file.py).
    checkpoint_dropped_layers: int = 0

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
class T5Architecture:
    """A full-size T5 encoder (FLUX.1's text_encoder_2/config.json: T5-XXL v1.1)."""

    d_model: int
    d_ff: int
    layers: int
    heads: int
    d_kv: int
    vocab_size: int
    feed_forward_proj: str = "gated-gelu"


@dataclass(frozen=True)
class TransformerArchitecture:
    """A full-size flow-matching transformer family's model (FLUX.1-dev's published configs: transformer/,
    vae/, text_encoder*/). `models/reference.py` builds it on the meta device; tiny and toy models scale it down."""

    resolution: int  # native size in pixels
    num_layers: int  # double-stream (MM-DiT) blocks
    num_single_layers: int  # single-stream blocks
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int  # the text states' width (T5-XXL's d_model)
    pooled_projection_dim: int  # the pooled text embedding's width (CLIP-L's)
    axes_dims_rope: tuple[int, ...]  # RoPE dimensions per position-id axis (they sum to attention_head_dim)
    latent_channels: int  # the VAE's; the transformer reads 2x2 patches of them (in_channels = 4 x this)
    vae_scale: float  # the VAE's scaling_factor
    vae_shift: float  # the VAE's shift_factor: latents are (z - shift) * scale
    encoders: tuple[EncoderArchitecture | T5Architecture, ...]  # in slot order
    patch: int = 2  # latents are packed in patch x patch squares

    @property
    def in_channels(self) -> int:
        return self.latent_channels * self.patch * self.patch


@dataclass(frozen=True)
class Variant:
    """One model of a family that a model's own config tells apart (FLUX.1 dev and schnell)."""

    name: str  # "dev", "schnell"
    title: str
    modelspec_prefix: str  # modelspec.architecture before "/lora"
    guidance: bool  # the transformer takes a guidance value (config `guidance_embeds`: guidance-distilled dev)
    text_tokens: int  # T5 tokens the model was trained with (BFL/diffusers: dev 512, schnell 256)


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl"
    title: str
    text_encoders: tuple[TextEncoderSlot, ...]
    reference: ReferenceArchitecture | TransformerArchitecture
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
    # kohya's denoiser module names: "diffusers" paths (SD 1.x/2.x), the original "ldm" ones (SDXL: sd-scripts'
    # sdxl_model_util converts the UNet to SGM's layout before naming its modules) or Black Forest Labs' "bfl" ones
    # with q/k/v fused (FLUX.1: sd-scripts trains library/flux_models.py; export/kohya_flux.py).
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
    # The denoiser's pipeline attribute ("unet", "transformer"), the training objective ("ddpm": epsilon or
    # v-prediction on the DDPM forward process; "flow": rectified flow) and the conditioning (how captions become
    # the denoiser's inputs and how it is called: "clip" for the SD families, "flux"); the loop looks the last two
    # up in conjure.train.objectives and never branches on a family.
    # Image sides must be multiples of this many pixels: the VAE's 8x downscale, times the 2x2 patches a FLUX.1
    # transformer packs (FluxPipeline rounds its sizes to vae_scale_factor * 2 = 16)
    pixel_multiple: int = 8
    # The guidance scale a pipeline of the family is usually run with (validation.guidance_scale: null)
    guidance_scale: float = 7.5
    denoiser: str = "unet"
    objective: str = "ddpm"
    conditioning: str = "clip"
    # Models of the family that their configs tell apart (FLUX.1 dev, schnell); empty: one kind of model.
    variants: tuple[Variant, ...] = ()
    # LoRA target presets: name -> regular expressions over the denoiser's module paths (a Linear/Conv2d whose
    # path one of them `search`es is adapted), and the preset `lora.unet_targets: auto` means.
    lora_presets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    default_lora_preset: str = ""
    # The denoiser's and the VAE's prefixes in a single-file checkpoint (the same for SD 1.x, 2.x and SDXL: diffusers'
    # single_file_utils.py LDM_UNET_KEY, LDM_VAE_KEYS)
    checkpoint_unet_prefix: str = "model.diffusion_model."
    checkpoint_vae_prefix: str = "first_stage_model."

    def modelspec_architecture(self, kind: str, prediction_type: str, variant: str | None = None) -> str:
        """`prediction_type`: diffusers' name of what the trained model predicts, "epsilon" or "v_prediction"
        (a flow family's is "flow_matching", and its `variant` names the architecture)."""
        if self.variants:
            return f"{self.variant(variant).modelspec_prefix}/{kind}"
        prefix = {"epsilon": self.modelspec_prefix, "v_prediction": self.modelspec_prefix_v}[prediction_type]
        return f"{prefix}/{kind}" if kind else prefix  # a whole model has no suffix (sai_model_spec.py)

    def variant(self, name: str | None) -> Variant:
        """The variant named `name`; None: the first (FLUX.1: dev)."""
        for v in self.variants:
            if name is None or v.name == name:
                return v
        raise ValueError(f"{self.title} has no variant {name!r}")

    def lora_preset(self, name: str) -> tuple[str, ...]:
        """The patterns of preset `name` ("auto": the family's default); KeyError for one the family lacks."""
        presets = dict(self.lora_presets)
        return presets[self.default_lora_preset if name == "auto" else name]

    @property
    def pad_tokens(self) -> tuple[str, ...]:
        return tuple(slot.pad_token for slot in self.text_encoders)

    def slot(self, encoder: str) -> TextEncoderSlot | None:
        """The slot of pipeline attribute `encoder` ("text_encoder_2"), or None when the family has no such encoder."""
        return next((s for s in self.text_encoders if s.encoder == encoder), None)

    def kohya_prefixes(self) -> dict[str, str]:
        """component -> kohya module-name prefix."""
        # kohya names every denoiser "unet" (FLUX.1's transformer too: sd-scripts networks/lora_flux.py)
        return {self.denoiser: "lora_unet_", **{s.encoder: s.kohya_prefix for s in self.text_encoders}}
