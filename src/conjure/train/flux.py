"""FLUX.1's text side and transformer call: the `Conditioning` of the "flux" family kind.

Text, as FluxPipeline encodes a prompt (`_get_clip_prompt_embeds`, `_get_t5_prompt_embeds`): CLIP-L's
`pooler_output` of the caption padded to CLIP's 77 tokens becomes `pooled_projections`; T5's last hidden state
of the caption padded to the T5 length (FLUX.1-dev 512, schnell 256, capped by the tokenizer's
`model_max_length`) becomes `encoder_hidden_states`. No attention mask reaches T5 or the transformer, as in
FluxPipeline (kohya's `--apply_t5_attn_mask` is off by default too): the padding tokens are part of what the
model was trained to read, so caption and prompt must be padded to the same length.

The transformer call, as FluxPipeline's denoising loop makes it: 2x2-packed latents with (0, row, column) RoPE
ids, zero text ids, `timestep` = sigma in [0, 1] (the transformer's embedder multiplies by 1000), and, only for a
guidance-distilled transformer (`guidance_embeds`, FLUX.1-dev), the guidance value per sample.
"""

from __future__ import annotations

from typing import Any

import torch

from conjure.train.flow import Predict, image_ids, pack_latents, text_ids, unpack_latents

FLUX_T5_TOKENS = 512  # FluxPipeline's max_sequence_length: what a model of unknown variant is read with


class FluxConditioning:
    """Text encoding and the transformer's call for FLUX.1 (module doc).

    `t5_tokens`: how many T5 tokens a caption is padded/truncated to; `guidance`: the value fed to a
    guidance-distilled transformer while training (`advanced.guidance`; ignored by one without
    `guidance_embeds`)."""

    def __init__(self, *, t5_tokens: int, guidance: float = 1.0) -> None:
        self.t5_tokens, self.guidance = t5_tokens, guidance

    def encode(self, pairs: list[tuple[Any, Any]], captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": [B, t5_tokens, T5 width], "pooled_projections": [B, CLIP width]}."""
        (clip_tokenizer, clip), (t5_tokenizer, t5) = pairs
        clip_ids = clip_tokenizer(
            captions, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output
        t5_ids = t5_tokenizer(
            captions, padding="max_length", max_length=self.t5_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        hidden = t5(t5_ids.to(t5.device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": hidden.to(device), "pooled_projections": pooled.to(device)}

    def predictor(
        self, denoiser: Any, pairs: list[tuple[Any, Any]], captions: list[str], device: torch.device,
        batch: dict[str, Any], text: dict[str, torch.Tensor] | None = None,
    ) -> Predict:
        """The transformer's prediction for [B, C, H, W] noisy latents at sigmas [B], unpacked to [B, C, H, W];
        `text`: `encode`'s result for `captions` when at hand (a cache), else they are encoded here."""
        if text is None:
            text = self.encode(pairs, captions, device)
        hidden, pooled = text["encoder_hidden_states"], text["pooled_projections"]
        from accelerate.utils import extract_model_from_parallel

        # the transformer's own config: under several processes `denoiser` is its DDP wrapper
        guided = extract_model_from_parallel(denoiser).config.guidance_embeds

        def predict(noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            b, _, h, w = noisy.shape
            guidance = None
            if guided:  # FluxPipeline: a float32 tensor of the value per sample
                guidance = torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32)
            out = denoiser(
                hidden_states=pack_latents(noisy), timestep=sigmas.to(noisy.device, noisy.dtype),
                guidance=guidance, pooled_projections=pooled.to(noisy.dtype),
                encoder_hidden_states=hidden.to(noisy.dtype),
                txt_ids=text_ids(hidden.shape[1], noisy.device, noisy.dtype),
                img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False,
            )[0]
            return unpack_latents(out, h, w)

        return predict

    def prompt_embeds(
        self, pairs: list[tuple[Any, Any]], prompt: str, negative: str, device: torch.device
    ) -> dict[str, Any]:
        """FluxPipeline's `prompt_embeds` / `pooled_prompt_embeds` for `prompt`, encoded as captions are.
        `negative` is not used: FluxPipeline reads a negative prompt only with true CFG (`true_cfg_scale` > 1)."""
        text = self.encode(pairs, [prompt], device)
        return {"prompt_embeds": text["encoder_hidden_states"], "pooled_prompt_embeds": text["pooled_projections"]}


    def long_captions(self, pairs: list[tuple[Any, Any]], captions: list[str]) -> tuple[int, str]:
        """Captions longer than the T5 length (CLIP-L's 77 tokens cut the pooled embedding's input too, but T5
        reads the caption itself); T5's tokenizer adds only the end token."""
        if not captions:
            return 0, ""
        ids = pairs[1][0](captions).input_ids
        return sum(len(i) > self.t5_tokens for i in ids), f"T5 reads {self.t5_tokens} tokens"


def t5_tokens(model: Any) -> int:
    """The T5 length of a loaded FLUX model: its variant's (`Variant.text_tokens`; dev 512, schnell 256), capped
    by the T5 tokenizer's `model_max_length` (the toy's is 16)."""
    variant = model.facts.get("variant")
    tokens = next(
        (v.text_tokens for v in getattr(model.family, "variants", ()) if variant and v.name == variant.value),
        FLUX_T5_TOKENS,
    )
    tokenizer = model.components[model.family.text_encoders[1].tokenizer]
    return min(tokens, int(tokenizer.model_max_length))


def build_flux_conditioning(model: Any, guidance: float = 1.0) -> FluxConditioning:
    """The FLUX conditioning of a loaded model with `advanced.guidance`."""
    return FluxConditioning(t5_tokens=t5_tokens(model), guidance=float(guidance))
