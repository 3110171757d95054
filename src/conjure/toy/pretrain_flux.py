"""Pre-train the toy FLUX.1 on the toy world, on a CPU (scripts/train_toy_models.py `flux` runs this).

The parts, built in code (nothing from the hub):
- VAE: the shared toy SD VAE (conjure/toy/pretrain.py) with a latent shift, as FLUX.1's VAE has one
  (shift_factor 0.1159 beside scaling_factor 0.3611): `shift_vae` adds a constant per channel to quant_conv's
  mean bias so that every channel's mean becomes `SHIFT_FACTOR`, and registers `shift_factor`, so the latents the
  transformer sees, (z - shift) * scale, are centred; a trainer that forgets the shift feeds latents whose mean
  is ~3.6 std off (measured by `latent_stats`), and its LoRA learns the wrong thing.
- Text: the toy CLIP tokenizer and a small CLIPTextModel (only its pooled output is read, as FLUX reads CLIP-L);
  the toy T5 tokenizer (every toy word one token, 16 tokens) and a small T5EncoderModel (gated-gelu, as T5 v1.1).
- Transformer: FluxTransformer2DModel with FLUX.1's block structure at toy width: 2 double-stream and 4
  single-stream blocks, 4 heads of 32 (RoPE axes 8/12/12), 4 latent channels x 2x2 packing = 16 inputs,
  `guidance_embeds` as FLUX.1-dev.
- Scheduler: FlowMatchEulerDiscreteScheduler with FLUX.1-dev's config (dynamic shifting between 256 and 4096
  tokens, shift 0.5 -> 1.15).

Training (joint, from scratch, like the SD toys; seeded, one thread): flow matching through conjure's own
`FlowObjective` and `FluxConditioning` (logit-normal sigmas, target e - x0), so training, the library's trainer
and FluxPipeline all read the model the same way; AdamW with warmup + cosine, EMA weights saved. Captions are
dropped 10% of the time (world.caption) so the model also knows the empty prompt.

Guidance, as a distilled FLUX.1-dev reads it: FLUX.1-dev was distilled so that its guidance input g gives what
classifier-free guidance at scale g would. The toy learns the same by self-distillation: after `distill_from` of
the steps, a quarter of each batch is trained at a random g in [1, 5] towards v_u + g (v_c - v_u), where v_c /
v_u are the model's own (no-grad) conditional / unconditional predictions at g = 1; the rest is plain flow
matching at g = 1 (what conjure's trainer feeds by default). FluxPipeline's `guidance_scale` then works on the toy.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from conjure.toy import world
from conjure.toy.pretrain import _cosine, _scenes, encode_dataset, render_batch, update
from conjure.toy.tokenizer import T5_MODEL_MAX_LENGTH as T5_TOKENS

SHIFT_FACTOR = 20.0  # raw latent units; x scaling_factor 0.18215 = 3.6 std of the scaled latents
WIDTH = 64  # both text encoders' width = the transformer's joint_attention_dim and pooled_projection_dim
DISTILL_SHARE = 0.25
GUIDANCE_RANGE = (1.0, 5.0)

# FLUX.1-dev's scheduler/scheduler_config.json
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}  # fmt: skip


def latent_stats(vae: Any, *, seed: int = 998, n: int = 256, shifted: bool = True) -> tuple[torch.Tensor, float]:
    """Per-channel mean and overall std of the posterior means of `n` world scenes, as the transformer sees them
    ((z - shift) * scale), or without the shift (`shifted=False`: what a trainer that forgets it feeds)."""
    with torch.no_grad():
        z = vae.encode(render_batch(_scenes(random.Random(seed), n, with_new_concepts=True))).latent_dist.mean
    shift = (vae.config.shift_factor or 0.0) if shifted else 0.0
    latents = (z - shift) * vae.config.scaling_factor
    return latents.mean(dim=(0, 2, 3)), float(latents.std())


def shift_vae(vae: Any, shift: float = SHIFT_FACTOR, *, n: int = 256) -> Any:
    """Make every latent channel's mean over `n` world scenes `shift` (quant_conv's mean rows' bias) and register
    `shift_factor`; reconstructions do not change (post_quant_conv's bias takes the shift back out)."""
    means, _ = latent_stats(vae, n=n, shifted=False)
    raw = means / vae.config.scaling_factor
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[:c] += shift - raw
        # decode(z + d) == old decode(z): post_quant_conv is linear in z, so subtract its response to d
        vae.post_quant_conv.bias -= vae.post_quant_conv.weight[:, :, 0, 0] @ (shift - raw)
    vae.register_to_config(shift_factor=shift)
    return vae


def build_flux(seed: int = 0) -> dict[str, Any]:
    """Untrained transformer, text encoders, tokenizers and scheduler of the toy FLUX."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from conjure.toy.tokenizer import toy_t5_tokenizer, toy_tokenizer

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = toy_tokenizer(), toy_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=WIDTH, d_kv=WIDTH // 4, d_ff=2 * WIDTH, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=t5_tokenizer.pad_token_id,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )
    return {
        "transformer": transformer, "text_encoder": clip, "tokenizer": clip_tokenizer, "text_encoder_2": t5,
        "tokenizer_2": t5_tokenizer, "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    }


def _predict(conditioning: Any, parts: dict[str, Any], text: dict[str, torch.Tensor]) -> Any:
    """The toy transformer's call through conjure's FLUX conditioning, on already encoded text."""
    return conditioning.predictor(parts["transformer"], [], [], torch.device("cpu"), {}, text=text)


def _distill_loss(
    parts: dict[str, Any], text: dict[str, torch.Tensor], latents: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """Self-distilled guidance (module doc): the student at a random g against CFG of its own g = 1 outputs."""
    from conjure.train.flow import noisy_latents, sample_sigmas
    from conjure.train.flux import FluxConditioning

    low, high = GUIDANCE_RANGE
    guidance = low + (high - low) * float(torch.rand((), generator=g))
    noise = torch.randn(latents.shape, generator=g)
    sigmas = sample_sigmas(g, latents.shape[0], "logit_normal")
    noisy = noisy_latents(latents, noise, sigmas)
    teacher = FluxConditioning(t5_tokens=T5_TOKENS, guidance=1.0)
    pairs = [(parts["tokenizer"], parts["text_encoder"]), (parts["tokenizer_2"], parts["text_encoder_2"])]
    with torch.no_grad():
        detached = {k: v.detach() for k, v in text.items()}
        empty = teacher.encode(pairs, [""] * latents.shape[0], torch.device("cpu"))
        cond = _predict(teacher, parts, detached)(noisy, sigmas)
        uncond = _predict(teacher, parts, empty)(noisy, sigmas)
        target = uncond + guidance * (cond - uncond)
    student = FluxConditioning(t5_tokens=T5_TOKENS, guidance=guidance)
    return F.mse_loss(_predict(student, parts, text)(noisy, sigmas), target)


def train_flux(
    vae: Any, steps: int, *, seed: int = 0, out: Path, images: int = 8000, batch: int = 64, lr: float = 1e-3,
    ema_decay: float = 0.999, distill_from: float = 0.3, log_every: int = 100,
) -> dict[str, Any]:
    """Train the toy FLUX's transformer and text encoders jointly on `vae`'s latents; saves EMA weights and the
    VAE under `out`."""
    from conjure.train.flow import FlowObjective
    from conjure.train.flux import FluxConditioning
    from conjure.train.loss import sample_latents

    parts = build_flux(seed)
    rng = random.Random(seed + 1)
    scenes = _scenes(rng, images, with_new_concepts=False)
    started = time.perf_counter()
    vae.requires_grad_(False)
    means, stds = encode_dataset(vae, scenes)
    print(f"flux: encoded {images} scenes in {time.perf_counter() - started:.0f} s", flush=True)
    pairs = [(parts["tokenizer"], parts["text_encoder"]), (parts["tokenizer_2"], parts["text_encoder_2"])]
    modules = [parts["transformer"], parts["text_encoder"], parts["text_encoder_2"]]
    params = [p for m in modules for p in m.parameters()]
    ema = [copy.deepcopy(m).requires_grad_(False) for m in modules]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    conditioning = FluxConditioning(t5_tokens=T5_TOKENS, guidance=1.0)
    objective = FlowObjective(sampling="logit_normal")
    g = torch.Generator().manual_seed(seed + 2)
    distilled = max(1, round(batch * DISTILL_SHARE))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine(step, steps, warmup=200)
        idx = torch.randint(0, images, (batch,), generator=g)
        latents = sample_latents(vae, means[idx], stds[idx], g)
        captions = [world.caption(scenes[i], rng) for i in idx.tolist()]
        text = conditioning.encode(pairs, captions, torch.device("cpu"))
        plain = batch - distilled if step >= distill_from * steps else batch
        head = {k: v[:plain] for k, v in text.items()}
        loss = objective.loss(_predict(conditioning, parts, head), latents[:plain], g)
        if plain < batch:
            tail = {k: v[plain:] for k, v in text.items()}
            loss = (plain * loss + distilled * _distill_loss(parts, tail, latents[plain:], g)) / batch
        update(opt, loss, params, modules, ema, step=step, ema_decay=ema_decay)
        if step % log_every == 0 or step == steps - 1:
            print(f"flux {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - started:.0f} s", flush=True)
    parts["transformer"], parts["text_encoder"], parts["text_encoder_2"] = ema
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "text_encoder", "text_encoder_2", "scheduler"):
        parts[name].save_pretrained(out / name)
    vae.save_pretrained(out / "vae")
    return parts


MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def assemble_flux(build: Path, to: Path) -> None:
    """Write the trained toy FLUX (`build`/flux) as a FluxPipeline folder `to`/flux, fp16 weights."""
    import shutil

    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from conjure.toy.tokenizer import write_toy_t5_tokenizer, write_toy_tokenizer

    src, dest = Path(build) / "flux", Path(to) / "flux"
    shutil.rmtree(dest, ignore_errors=True)
    for name, cls in (("transformer", FluxTransformer2DModel), ("vae", AutoencoderKL),
                      ("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel)):  # fmt: skip
        cls.from_pretrained(src / name).to(torch.float16).save_pretrained(dest / name)
    FlowMatchEulerDiscreteScheduler.from_pretrained(src / "scheduler").save_pretrained(dest / "scheduler")
    write_toy_tokenizer(dest / "tokenizer")
    write_toy_t5_tokenizer(dest / "tokenizer_2")
    index = {"_diffusers_version": diffusers.__version__, **MODEL_INDEX}
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {dest}", flush=True)


def shifted_shared_vae(vae_dir: Path) -> Any:
    """The shared toy VAE from `vae_dir` (float32), shifted (`shift_vae`)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    shift_vae(vae)
    mean, std = latent_stats(vae)
    off, _ = latent_stats(vae, shifted=False)
    print(f"vae shift_factor {SHIFT_FACTOR}: latent mean {mean.mean():.3f} std {std:.3f}; "
          f"without the shift mean {off.mean():.2f} = {off.mean() / std:.1f} std off", flush=True)
    return vae
