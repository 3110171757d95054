"""Pre-train the toy base models on the toy world, on a CPU (scripts/train_toy_models.py runs this).

1. A small VAE (8x downscale, 4 latent channels) on all colours and shapes, held-out concepts included, so
   that it can reconstruct what later methods teach. Plain MSE washes colours out; a foreground-weighted
   MSE + L1 with a tiny KL term, then a decoder-only fine-tune, keeps them. Its `scaling_factor` is set to
   1/std of the latents, as SD's 0.18215 was.
2. For each variant (sd1: epsilon; sd2: v-prediction, linear projections, "!" padding; sdxl: two text
   encoders, pooled embedding, size/crop ids) a UNet and its text encoder(s), trained jointly from scratch
   on the world *without* the held-out concepts: min-SNR-weighted loss, AdamW with warmup + cosine, EMA.

Everything is seeded; one thread is pinned so the run is reproducible on the same machine.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from conjure import families
from conjure.toy import world

VARIANTS = tuple(families.unet_families())  # one toy model per UNet family, named after it


def render_batch(scenes: list[world.Scene]) -> torch.Tensor:
    """Scenes -> [N, 3, 64, 64] in [-1, 1]."""
    arrays = np.stack([np.asarray(world.render(s), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def foreground_weights(pixels: torch.Tensor, scenes: list[world.Scene], boost: float = 8.0) -> torch.Tensor:
    """1 on the background, 1 + boost on the shape: the shape is a small share of the pixels but all the
    meaning, and an unweighted loss lets the VAE paint it in the background's colour."""
    bg = torch.tensor([world.BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32) / 127.5 - 1
    differs = (pixels - bg[:, :, None, None]).abs().amax(1, keepdim=True) > 0.08
    return 1 + boost * differs.float()


def build_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=world.SIZE,
    )


def _scenes(rng: random.Random, n: int, *, with_new_concepts: bool) -> list[world.Scene]:
    kwargs = {"colours": tuple(world.COLOURS), "shapes": world.SHAPES} if with_new_concepts else {}
    return [world.sample_scene(rng, **kwargs) for _ in range(n)]


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def psnr(vae: Any, pixels: torch.Tensor) -> float:
    with torch.no_grad():
        recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (pixels + 1) / 2).item()
    return 10 * math.log10(1 / max(mse, 1e-10))


def train_vae(steps: int, decoder_steps: int, *, batch: int = 32, seed: int = 0, log_every: int = 100) -> Any:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = build_vae()
    held = _scenes(random.Random(seed + 999), 64, with_new_concepts=True)
    held_pixels = render_batch(held)
    phases = [("all", steps, vae.parameters(), 1e-3), ("decoder", decoder_steps, vae.decoder.parameters(), 3e-4)]
    started = time.perf_counter()
    for phase, total, params, lr in phases:
        params = list(params)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for step in range(total):
            for group in opt.param_groups:
                group["lr"] = lr * _cosine(step, total, warmup=min(100, total // 10 + 1))
            scenes = _scenes(rng, batch, with_new_concepts=True)
            pixels = render_batch(scenes)
            weights = foreground_weights(pixels, scenes)
            if phase == "all":
                posterior = vae.encode(pixels).latent_dist
                latents = posterior.sample()
                kl = posterior.kl().mean()
            else:
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample()
                kl = torch.zeros(())
            recon = vae.decode(latents).sample
            err = recon - pixels
            loss = (weights * err.pow(2)).mean() + 0.5 * (weights * err.abs()).mean() + 1e-6 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % log_every == 0 or step == total - 1:
                print(f"vae {phase} {step}/{total} loss {loss.item():.4f} psnr {psnr(vae, held_pixels):.2f} dB "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
    rescale_latents(vae, seed=seed)
    print(f"vae scaling_factor {vae.config.scaling_factor}, held-out psnr {psnr(vae, held_pixels):.2f} dB", flush=True)
    return vae


SD_SCALING_FACTOR = 0.18215


def rescale_latents(vae: Any, *, seed: int = 0, target_std: float = 1 / SD_SCALING_FACTOR) -> None:
    """Make the latents' std `target_std` without changing any reconstruction, and set `scaling_factor`
    to SD 1.x's 0.18215. A VAE whose factor is near 1 would let a trainer that forgets to scale latents
    pass its learning tests; with SD's factor, unscaled latents are 5.5x too large and training fails.

    quant_conv's mean rows are multiplied by k (its log-variance bias gets + 2 ln k) and post_quant_conv's
    input columns divided by k, so decode(k * z) == old decode(z)."""
    with torch.no_grad():
        pixels = render_batch(_scenes(random.Random(seed + 998), 256, with_new_concepts=True))
        std = float(vae.encode(pixels).latent_dist.mean.std())
        k = target_std / std
        c = vae.config.latent_channels
        vae.quant_conv.weight[:c] *= k
        vae.quant_conv.bias[:c] *= k
        vae.quant_conv.bias[c:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=SD_SCALING_FACTOR)


def build_variant(variant: str, seed: int = 0) -> dict[str, Any]:
    """Untrained UNet, text encoder(s), tokenizer(s) and scheduler of a toy variant."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conjure.toy.tokenizer import toy_tokenizer

    torch.manual_seed(seed)
    family = families.get(variant)
    arch = family.reference
    # 64 channels of cross-attention, split evenly among the encoders; every encoder takes the activation of the
    # family's last one (the toy models were trained so: SDXL's toy CLIP-L stand-in uses gelu)
    width = 64 // len(family.text_encoders)
    parts: dict[str, Any] = {}
    for slot in family.text_encoders:
        tokenizer = toy_tokenizer(slot.pad_token)  # each toy variant pads like the real family it stands for
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
            hidden_act=arch.encoders[-1].activation, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        parts[slot.tokenizer] = tokenizer
        parts[slot.encoder] = (CLIPTextModelWithProjection if slot.pooled else CLIPTextModel)(config)
    extra = {}
    if arch.addition_time_embed_dim:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + width)
    parts["unet"] = UNet2DConditionModel(
        sample_size=world.SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=8,
        cross_attention_dim=width * len(family.text_encoders),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=arch.linear_projection, **extra,
    )
    parts["scheduler"] = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
        prediction_type=arch.prediction_type,
    )
    return parts


def encode_dataset(vae: Any, scenes: list[world.Scene], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every scene (latents are sampled from them at each step)."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            posterior = vae.encode(render_batch(scenes[i : i + batch])).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), for epsilon or v targets."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def train_variant(
    variant: str, vae: Any, steps: int, *, seed: int = 0, out: Path, images: int = 8000, batch: int = 48,
    lr: float = 1e-3, ema_decay: float = 0.999, log_every: int = 100,
) -> dict[str, Any]:
    """Train a variant's UNet and text encoder(s) jointly; saves the EMA weights under `out`."""
    from conjure.train.conditioning import encode_captions
    from conjure.train.loss import diffusion_target

    parts = build_variant(variant, seed)
    rng = random.Random(seed + 1)
    scenes = _scenes(rng, images, with_new_concepts=False)
    started = time.perf_counter()
    vae.requires_grad_(False)
    means, stds = encode_dataset(vae, scenes)
    scale = vae.config.scaling_factor
    print(f"{variant}: encoded {images} scenes in {time.perf_counter() - started:.0f} s", flush=True)
    encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if "text_encoder_2" in parts else [])
    tokenizers = [parts["tokenizer"]] + ([parts["tokenizer_2"]] if "tokenizer_2" in parts else [])
    modules = [parts["unet"], *encoders]
    params = [p for m in modules for p in m.parameters()]
    ema = [copy.deepcopy(m).requires_grad_(False) for m in modules]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    scheduler = parts["scheduler"]
    g = torch.Generator().manual_seed(seed + 2)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine(step, steps, warmup=100)
        idx = torch.randint(0, images, (batch,), generator=g)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scale
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        captions = [world.caption(scenes[i], rng) for i in idx.tolist()]
        cond = encode_captions(list(zip(tokenizers, encoders)), captions, torch.device("cpu"),
                               resolution=world.SIZE, zero_empty=True)
        pred = parts["unet"](noisy, t, **cond).sample
        target = diffusion_target(scheduler, latents, noise, t)
        per_item = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_item * min_snr_weights(scheduler, t)).mean()
        update(opt, loss, params, modules, ema, step=step, ema_decay=ema_decay)
        if step % log_every == 0 or step == steps - 1:
            print(f"{variant} {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - started:.0f} s", flush=True)
    return _save_trained(parts, ema, Path(out))


def update(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter], modules: list[Any],
           ema: list[Any], *, step: int, ema_decay: float) -> None:
    """One pre-training update: backward, clip to norm 1, step, then move each EMA copy towards its live module
    (the decay warms up as (1 + step) / (10 + step), capped at `ema_decay`)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        decay = min(ema_decay, (1 + step) / (10 + step))
        for live, avg in zip(modules, ema):
            for p_avg, p in zip(avg.parameters(), live.parameters()):
                p_avg.lerp_(p, 1 - decay)


def _save_trained(parts: dict[str, Any], ema: list[Any], out: Path) -> dict[str, Any]:
    """Keep the EMA copies (UNet, then the text encoders in order) in `parts` and save them under `out`."""
    parts["unet"], parts["text_encoder"] = ema[0], ema[1]
    if len(ema) > 2:
        parts["text_encoder_2"] = ema[2]
    out.mkdir(parents=True, exist_ok=True)
    parts["unet"].save_pretrained(out / "unet")
    parts["scheduler"].save_pretrained(out / "scheduler")
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].save_pretrained(out / name)
    return parts


def assemble(build: Path, to: Path) -> None:
    """Write each trained variant as a complete diffusers folder (fp16 weights, the shared VAE copied in)."""
    import shutil

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from conjure.toy.tokenizer import write_toy_tokenizer

    vae = AutoencoderKL.from_pretrained(build / "vae")
    for variant in VARIANTS:
        src = build / variant
        if not (src / "unet").is_dir():
            print(f"skipping {variant}: not trained", flush=True)
            continue
        dest = to / variant
        shutil.rmtree(dest, ignore_errors=True)
        parts = {
            "vae": vae,
            "unet": UNet2DConditionModel.from_pretrained(src / "unet"),
            "scheduler": DDPMScheduler.from_pretrained(src / "scheduler"),
            "text_encoder": CLIPTextModel.from_pretrained(src / "text_encoder"),
        }
        for slot in families.get(variant).text_encoders[1:]:
            parts[slot.encoder] = (CLIPTextModelWithProjection if slot.pooled else CLIPTextModel).from_pretrained(
                src / slot.encoder)
        for name, part in parts.items():
            if name != "scheduler":
                part.to(torch.float16).save_pretrained(dest / name)
            else:
                part.save_pretrained(dest / name)
        for slot in families.get(variant).text_encoders:
            write_toy_tokenizer(dest / slot.tokenizer, slot.pad_token)
        index = _model_index(variant)
        (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        print(f"wrote {dest}", flush=True)


def _model_index(variant: str) -> dict[str, Any]:
    import diffusers

    index: dict[str, Any] = {
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    family = families.get(variant)
    index["_class_name"] = family.pipeline_class
    for slot in family.text_encoders[1:]:
        model = "CLIPTextModelWithProjection" if slot.pooled else "CLIPTextModel"
        index.update({slot.encoder: ["transformers", model], slot.tokenizer: ["transformers", "CLIPTokenizer"]})
    if not family.safety_checker:
        # diffusers' SDXL pipeline config: an empty prompt is encoded as zeros (conditioning.encode_text's zero_empty)
        index["force_zeros_for_empty_prompt"] = True
    else:
        index["safety_checker"] = [None, None]
    index.update(feature_extractor=[None, None], image_encoder=[None, None])
    if family.safety_checker:
        index["requires_safety_checker"] = False
    return index
