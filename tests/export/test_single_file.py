"""Single-file checkpoints (export/single_file.py): diffusers' from_single_file of the written file reproduces the
model's outputs (tiny models with the real block layout), and on the full-size models (meta device) every key
has the real name and shape: diffusers' own LDM readers turn the file back into exactly the diffusers state dicts."""

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open

from conjure import families
from conjure.errors import ConjureError
from conjure.export.single_file import V_PRED_MARKER, checkpoint_state_dict, save_single_file
from conjure.models.reference import build_reference_components
from conjure.models.tiny import build_tiny_components, save_model_folder

# SDXL's two tiny encoders must differ in width: diffusers tells them apart by it (models/tiny.py)
WIDTHS = {"sdxl": (32, 48)}


def outputs(pipe, family):
    """UNet, VAE and text-encoder outputs on fixed inputs."""
    fam = families.get(family)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49408, (1, 77), generator=gen)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    out, states = [], []
    with torch.no_grad():
        for slot in fam.text_encoders:
            result = getattr(pipe, slot.encoder)(ids, output_hidden_states=True)
            states.append(result.hidden_states[-2])
            out += [result.hidden_states[-2], result[0]]
        cond = torch.cat(states, dim=-1)
        extra = {}
        if pipe.unet.config.addition_embed_type == "text_time":
            extra["added_cond_kwargs"] = {"text_embeds": out[-1], "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        out.append(pipe.unet(latents, 10, encoder_hidden_states=cond, **extra).sample)
        out.append(pipe.vae.decode(latents).sample)
        out.append(pipe.vae.encode(torch.rand(1, 3, 64, 64, generator=gen)).latent_dist.mean)
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_from_single_file_reproduces_the_model(tmp_path, family):
    """SD 2.x's file also holds the OpenCLIP layer and projection diffusers drops: they must not disturb its reading
    (kohya's fixed 1024-wide projection would: diffusers splits in_proj at the projection's width)."""
    fam = families.get(family)
    components = build_tiny_components(family, real_layout=True, encoder_widths=WIDTHS.get(family))
    folder = save_model_folder(family, components, tmp_path / "model")
    path = save_single_file(folder, tmp_path / "model.safetensors", family, dtype="fp32")
    pipeline_class = getattr(diffusers, fam.pipeline_class)
    extra = {"safety_checker": None} if fam.safety_checker else {}
    loaded = pipeline_class.from_single_file(str(path), config=str(folder), **extra)
    original = pipeline_class(**{k: v for k, v in components.items() if k in loaded.components})
    for mine, theirs in zip(outputs(original, family), outputs(loaded, family), strict=True):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)


def test_dtype_metadata_and_v_prediction_marker(tmp_path):
    components = build_tiny_components("sd2")
    path = save_single_file(components, tmp_path / "m.safetensors", "sd2", dtype="fp16", metadata={"a": "b"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert V_PRED_MARKER in f.keys()
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.resolution"] == "768x768" and meta["a"] == "b"
    epsilon = save_single_file(build_tiny_components("sd1"), tmp_path / "e.safetensors", "sd1", dtype="bf16")
    with safe_open(str(epsilon), "pt") as f:
        assert V_PRED_MARKER not in f.keys()
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1"
        assert f.get_tensor("first_stage_model.decoder.mid.attn_1.q.weight").dim() == 4


def test_refuses_flux_and_incomplete_models(tmp_path):
    with pytest.raises(ConjureError, match="no single-file checkpoint layout"):
        save_single_file({}, tmp_path / "x.safetensors", "flux")
    parts = build_tiny_components("sd1")
    with pytest.raises(ConjureError, match="needs the text_encoder"):
        save_single_file({"unet": parts["unet"], "vae": parts["vae"]}, tmp_path / "x.safetensors", "sd1")
    assert not (tmp_path / "x.safetensors").exists()


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


# real key names and shapes of the published checkpoints (v1-5-pruned, v2-1_768-ema-pruned, sd_xl_base_1.0)
REAL_KEYS = {
    "sd1": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    },
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_keys_read_back_through_diffusers(family):
    fam = families.get(family)
    parts = build_reference_components(family, device="meta")
    states = {name: parts[name].state_dict() for name in ("unet", "vae", *(s.encoder for s in fam.text_encoders))}
    file = checkpoint_state_dict(family, states, parts["unet"].config)
    assert {k: shapes(file)[k] for k in REAL_KEYS[family]} == REAL_KEYS[family]
    assert shapes(convert_ldm_unet_checkpoint(file, parts["unet"].config)) == shapes(states["unet"])
    assert shapes(convert_ldm_vae_checkpoint(file, parts["vae"].config)) == shapes(states["vae"])
    for slot in fam.text_encoders:
        if slot.checkpoint_layout == "open_clip":
            back = convert_open_clip_checkpoint(parts[slot.encoder], file, prefix=slot.checkpoint_prefix)
        else:
            back = convert_ldm_clip_checkpoint({k: v for k, v in file.items() if k.startswith(slot.checkpoint_prefix)})
        ours = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                for k, v in states[slot.encoder].items()}
        assert shapes(back) == shapes(ours)


# OpenCLIP's text tower as the published files hold it (open_clip CLIP without `visual`, which ldm's
# FrozenOpenCLIPEmbedder deletes): SD 2.x's ViT-H has 24 residual blocks, SDXL's ViT-bigG 32
OPEN_CLIP_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                   "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                   "mlp.c_proj.weight", "mlp.c_proj.bias")
OPEN_CLIP_TOP = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                 "text_projection", "logit_scale")


@pytest.mark.parametrize(("family", "blocks"), [("sd2", 24), ("sdxl", 32)])
def test_open_clip_tower_has_the_real_key_set(family, blocks):
    fam = families.get(family)
    slot = next(s for s in fam.text_encoders if s.checkpoint_layout == "open_clip")
    parts = build_reference_components(family, device="meta")
    states = {name: parts[name].state_dict() for name in ("unet", "vae", *(s.encoder for s in fam.text_encoders))}
    file = checkpoint_state_dict(family, states, parts["unet"].config)
    tower = {k[len(slot.checkpoint_prefix):] for k in file if k.startswith(slot.checkpoint_prefix)}
    expected = {*OPEN_CLIP_TOP, *(f"transformer.resblocks.{i}.{n}" for i in range(blocks) for n in OPEN_CLIP_BLOCK)}
    assert tower == expected


def test_sd2_added_layer_is_an_identity_block_and_the_projection_the_identity():
    """The 24th layer changes nothing (x + 0 + 0): reading the last layer gives the penultimate state SD 2.x reads."""
    parts = build_tiny_components("sd2")
    states = {name: parts[name].state_dict() for name in ("unet", "vae", "text_encoder")}
    file = checkpoint_state_dict("sd2", states, parts["unet"].config)
    layers = parts["text_encoder"].config.num_hidden_layers
    added = {k.split(f"resblocks.{layers}.")[1]: v for k, v in file.items() if f"resblocks.{layers}." in k}
    assert sorted(added) == sorted(OPEN_CLIP_BLOCK)
    for name, tensor in added.items():
        fill = 1.0 if name in ("ln_1.weight", "ln_2.weight") else 0.0
        assert torch.equal(tensor, torch.full_like(tensor, fill)), name
    width = parts["text_encoder"].config.hidden_size
    assert torch.equal(file["cond_stage_model.model.text_projection"], torch.eye(width))
    assert not any(f"resblocks.{layers + 1}." in k for k in file)
