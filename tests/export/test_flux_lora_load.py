"""FLUX.1 LoRA files load through `FluxPipeline.load_lora_weights` and reproduce the adapted model: the same outputs
as conjure's reader (apply_lora, the ComfyUI formula) merging the split weights the run trained.

diffusers' kohya FLUX converter splits a single block's `linear1` into fixed widths [3072, 3072, 3072, 12288]
(loaders/lora_conversion_utils.py), and skips blocks a file does not have: so the kohya file of a tiny FLUX is checked
on its double blocks and CLIP-L, and the single-block fusion on the smallest transformer the converter takes, full
width (3072) with one single block and nothing else (~180M parameters, float32, 0.7 GB). The PEFT layout has no
such limit and is checked on the whole tiny FLUX.
"""

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel

from conjure.adapters import LoraModule
from conjure.export.convert import apply_lora
from conjure.export.kohya import save_kohya
from conjure.export.peft import save_peft
from conjure.families import FLUX
from conjure.methods.lora import denoiser_targets, text_encoder_targets

META = {"ss_output_name": "test"}


def tiny_flux(seed=0, **overrides):
    """STACK_NOTES' toy-scale FLUX (78k parameters), random weights."""
    config = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                  guidance_embeds=True)
    config.update(overrides)
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**config).eval()


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    return CLIPTextModel(config).eval()


def random_weights(models, keep=lambda path: True, *, rank=4, alpha=2.0, seed=0):
    """Every preset-`all` transformer module whose path `keep`s, and every CLIP module conjure trains."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for component, model in models.items():
        targets = (denoiser_targets(FLUX, model, "all") if component == "transformer"
                   else text_encoder_targets(model))
        for path in filter(keep, targets):
            linear = model.get_submodule(path)
            weights[(component, path)] = LoraModule(
                down=torch.randn(rank, linear.in_features, generator=g) * 0.05,
                up=torch.randn(linear.out_features, rank, generator=g) * 0.05, alpha=alpha,
            )
    return weights


@torch.no_grad()
def outputs(models):
    g = torch.Generator().manual_seed(1)
    transformer = models["transformer"]
    width = transformer.config.in_channels
    out = {"transformer": transformer(
        hidden_states=torch.randn(1, 16, width, generator=g),
        encoder_hidden_states=torch.randn(1, 5, transformer.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.6]), img_ids=torch.rand(16, 3, generator=g) * 4, txt_ids=torch.zeros(5, 3),
        guidance=torch.tensor([3.5]) if transformer.config.guidance_embeds else None,
    ).sample}
    if "text_encoder" in models:
        ids = torch.tensor([[0, 5, 9, 17, 1, 1]])
        out["text_encoder"] = models["text_encoder"](ids).last_hidden_state
    return out


def loads_like_conjures_reader(models, weights, path):
    """Outputs after FluxPipeline.load_lora_weights(path) == outputs after apply_lora(weights)."""
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=models.get("text_encoder"), tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=models["transformer"])
    base = outputs(models)
    pipe.load_lora_weights(str(path))
    loaded = outputs(models)
    pipe.unload_lora_weights()
    assert apply_lora(models, weights) == len(weights)
    merged = outputs(models)
    for name in base:
        assert not torch.allclose(loaded[name], base[name], atol=1e-4), f"{name}: the LoRA changed nothing"
        torch.testing.assert_close(loaded[name], merged[name], rtol=1e-4, atol=1e-5)


def test_kohya_file_loads_in_diffusers_double_blocks_and_clip(tmp_path):
    models = {"transformer": tiny_flux(num_layers=2), "text_encoder": tiny_clip()}
    weights = random_weights(models, lambda path: not path.startswith("single_transformer_blocks."))
    path = save_kohya(tmp_path / "lora.safetensors", weights, META, FLUX)
    loads_like_conjures_reader(models, weights, path)


@pytest.mark.parametrize("preset_paths", ["attention", "all"])
def test_peft_file_loads_in_diffusers(preset_paths, tmp_path):
    models = {"transformer": tiny_flux(num_single_layers=2), "text_encoder": tiny_clip()}
    weights = random_weights(models)
    if preset_paths == "attention":
        attention = set(denoiser_targets(FLUX, models["transformer"], "attention"))
        weights = {k: m for k, m in weights.items() if k[0] != "transformer" or k[1] in attention}
    path = save_peft(tmp_path / "lora.safetensors", weights, META, FLUX)
    loads_like_conjures_reader(models, weights, path)


@pytest.mark.parametrize("preset", ["attention", "attention_mlp"])
def test_kohya_single_block_fusion_loads_in_diffusers_at_full_width(preset, tmp_path):
    """linear1 (q|k|v|mlp) through diffusers' fixed split: full width, one single block, float32 (3-7 s)."""
    transformer = tiny_flux(num_layers=0, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                            axes_dims_rope=(16, 56, 56), guidance_embeds=False)
    models = {"transformer": transformer}
    targets = set(denoiser_targets(FLUX, transformer, preset))
    weights = random_weights(models, lambda path: path in targets, rank=2, alpha=3.0)
    path = save_kohya(tmp_path / "lora.safetensors", weights, META, FLUX)
    loads_like_conjures_reader(models, weights, path)
