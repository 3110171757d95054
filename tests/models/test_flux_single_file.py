"""A FLUX.1 single file with no basic.base_model_config: ComfyUI's all-in-one checkpoint loads (and trains) offline
from the configs conjure ships (models/flux_single_file.py); a transformer-only file is refused in one line.

The all-in-one files are a tiny FLUX.1's parts under ComfyUI's prefixes, its transformer in diffusers' names under
`model.diffusion_model.` (diffusers' BFL converter assumes FLUX.1's full widths), and its configs stand in for the
shipped full-size ones, as the SD single-file tests inject theirs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conjure import families
from conjure.errors import ConjureError
from conjure.models.loading import load_base_model

FLUX = families.get("flux")


def comfy_state_dict(components):
    """The components as ComfyUI saves a FLUX.1 checkpoint (comfy/sd.py save_checkpoint): every part under its
    prefix, the text encoders in the transformers models' names (CLIP's under `text_model.`, T5's embedding once, as
    `shared.weight`)."""
    from tests.models.conftest import vae_to_ldm

    clip_slot, t5_slot = FLUX.text_encoders
    clip = {k if k.startswith("text_model.") else f"text_model.{k}": v
            for k, v in components[clip_slot.encoder].state_dict().items()}
    t5 = {k: v for k, v in components[t5_slot.encoder].state_dict().items() if k != "encoder.embed_tokens.weight"}
    state = {"model.diffusion_model." + k: v for k, v in components["transformer"].state_dict().items()}
    state |= {FLUX.checkpoint_vae_prefix + k.removeprefix("first_stage_model."): v
              for k, v in vae_to_ldm(components["vae"]).items()}
    state |= {clip_slot.checkpoint_prefix + k: v for k, v in clip.items()}
    state |= {t5_slot.checkpoint_prefix + k: v for k, v in t5.items()}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny_all_in_one(tmp_path_factory):
    """variant -> (all-in-one file, the tiny configs laid out as assets/configs/flux, the tiny model's folder)."""
    from conjure.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("flux-aio")
    configs, out = root / "configs", {}
    configs.mkdir()
    for variant in ("dev", "schnell"):
        folder = write_tiny_model("flux", root / variant, variant=variant)
        for part in ("model_index.json", "vae", "text_encoder", "text_encoder_2", "tokenizer_2"):
            copy = shutil.copytree if (folder / part).is_dir() else shutil.copy
            if not (configs / part).exists():
                copy(folder / part, configs / part)
        for part in ("transformer", "scheduler"):
            (configs / variant / part).mkdir(parents=True)
            shutil.copy(next((folder / part).glob("*config.json")), configs / variant / part)
        path = root / f"flux1-{variant}-fp8.safetensors"
        save_file(comfy_state_dict(load_base_model(str(folder)).components), str(path))
        out[variant] = (path, configs, folder)
    return out


@pytest.fixture
def shipped(monkeypatch):
    import conjure.models.flux_single_file as whole

    def use(configs):
        monkeypatch.setattr(whole, "FLUX_CONFIGS", configs)
    return use


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_an_all_in_one_file_loads_every_part_from_the_file(tiny_all_in_one, shipped, variant):
    path, configs, folder = tiny_all_in_one[variant]
    shipped(configs)
    model = load_base_model(str(path), frozen_dtype=torch.bfloat16)
    reference = load_base_model(str(folder), frozen_dtype=torch.bfloat16)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        got, expected = model.components[name].state_dict(), reference.components[name].state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), name
    t5 = model.components["text_encoder_2"]
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert model.facts["variant"].value == variant
    assert model.facts["variant"].source == ("file key 'model.diffusion_model.time_text_embed.guidance_embedder."
                                             "linear_1.bias'" if variant == "dev" else "no guidance embedder in the file")
    assert model.noise_scheduler.config.use_dynamic_shifting == (variant == "dev")
    ids = torch.tensor([[3, 9, 1]])
    assert torch.equal(t5(ids).last_hidden_state, reference.components["text_encoder_2"](ids).last_hidden_state)


def test_a_deferred_all_in_one_transformer_is_read_after_the_encoders(tiny_all_in_one, shipped):
    path, configs, folder = tiny_all_in_one["dev"]
    shipped(configs)
    model = load_base_model(str(path), frozen_dtype=torch.bfloat16, defer_denoiser=True)
    assert model.denoiser.device.type == "meta" and not model.components["text_encoder_2"].device.type == "meta"
    model.load_pending()
    expected = load_base_model(str(folder), frozen_dtype=torch.bfloat16).denoiser.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.denoiser.state_dict().items())


def test_a_transformer_only_file_without_config_is_one_line(tiny_all_in_one, tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    from safetensors import safe_open

    with safe_open(str(tiny_all_in_one["dev"][0]), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}, str(path))
    with pytest.raises(ConjureError) as info:
        load_base_model(str(path))
    assert str(info.value) == (
        "flux1-dev.safetensors is a FLUX.1 transformer file, which holds the transformer alone; set "
        "basic.base_model_config to the diffusers folder or hub id of the model it belongs to (e.g. "
        "black-forest-labs/FLUX.1-dev), for its VAE and text encoders (CLIP-L, T5-XXL), or train from an all-in-one "
        "checkpoint that holds them (ComfyUI's, e.g. flux1-dev-fp8.safetensors)")


def test_the_shipped_t5_tokenizer_loads_offline_and_tokenises_as_flux_does(tmp_path):
    """The T5 v1.1 tokenizer FLUX.1 ships (tokenizer_2/): pad 0, eos 1, 512 tokens (the pipeline reads 256 for
    schnell: Variant.text_tokens); "a photo of a cat" as T5's SentencePiece model splits it."""
    code = ("from conjure.models.flux_single_file import tokenizer; from conjure import families; "
            "t = tokenizer(families.get('flux'), 't5', '<pad>'); "
            "print(type(t).__name__, t.pad_token_id, t.eos_token_id, t.model_max_length, "
            "t('a photo of a cat', padding='max_length', max_length=10).input_ids)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split(" ", 4) == ["T5Tokenizer", "0", "1", "512", "[3, 9, 1202, 13, 3, 9, 1712, 1, 0, 0]\n"]
    assert not any(tmp_path.iterdir())
    assert {v.name: v.text_tokens for v in FLUX.variants} == {"dev": 512, "schnell": 256}


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_the_shipped_configs_build_flux_on_the_meta_device_as_published(variant):
    """The shipped configs (Forge's copies of the Hub repos' files) build the full-size FLUX.1 of the reference
    (`models/reference.py`, from the published configs) parameter for parameter, on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from conjure.models.flux_single_file import FLUX_CONFIGS, variant_configs
    from conjure.models.reference import build_reference_components

    reference = build_reference_components("flux", device="meta", variant=variant)
    folder = variant_configs(FLUX, variant == "dev")
    with init_empty_weights():
        built = {
            "transformer": FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder, subfolder="transformer")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(FLUX_CONFIGS, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(FLUX_CONFIGS / "text_encoder")),
            "text_encoder_2": T5EncoderModel(T5Config.from_pretrained(FLUX_CONFIGS / "text_encoder_2")),
        }
    for name, part in built.items():
        shapes = {k: tuple(v.shape) for k, v in part.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in reference[name].state_dict().items()}, name
    assert json.loads((FLUX_CONFIGS / "model_index.json").read_text())["_class_name"] == FLUX.pipeline_class


# A fresh process: HF_HUB_OFFLINE and HF_HOME are read when huggingface_hub is imported; the tiny configs stand in for
# the shipped full-size ones (as in test_lean_loading's OFFLINE_RUNS).
OFFLINE_RUNS = """
import json, sys
from pathlib import Path
import conjure.models.flux_single_file as whole
from conjure.config import parse_config
from conjure.runs.events import read_events
from conjure.train.loop import train
whole.FLUX_CONFIGS = Path(sys.argv[1])
for raw in json.loads(Path(sys.argv[2]).read_text()):
    result = train(parse_config(raw))
    start = read_events(result.run_dir / "events.jsonl").events[0]
    print(json.dumps([result.status, result.step, start["family"], start["chosen"]["variant"]["value"]]))
"""


def test_an_all_in_one_file_trains_a_lora_offline_with_an_empty_hub_cache(tiny_all_in_one, lora_config, tmp_path):
    """With no basic.base_model_config, the transformer float8-streamed after the captions were encoded ahead and the
    encoders freed (models/transformer_stream.py; the plain deferred read: the test above)."""
    from tests.models.conftest import train_offline

    pytest.importorskip("torchao")
    path, configs, _ = tiny_all_in_one["dev"]
    raw = lora_config("flux", basic={"base_model": str(path), "max_train_steps": 2, "save_every_n_steps": 2,
                                     "validate_every_n_steps": None},
                      validation={"at_start": False}, data={"cache_text_encoder_outputs": True},
                      advanced={"mixed_precision": "bf16", "cpu": True, "base_weights_dtype": "float8"})
    raw["validation"].pop("guidance_scale", None)
    printed, hf_home = train_offline(OFFLINE_RUNS, configs, [raw], tmp_path)
    assert printed == [["completed", 2, "flux", "dev"]]
    assert not any(hf_home.iterdir())  # nothing fetched or cached


def test_the_estimate_of_an_all_in_one_file_is_the_full_size_variant(tiny_all_in_one, lora_config, tmp_path):
    """`conjure estimate` counts what the file loads as (FLUX.1's published sizes, the file's variant) and refuses a
    transformer-only file with loading's line."""
    from conjure.config import parse_config
    from conjure.estimate.model import meta_model
    from conjure.methods import method_spec

    path = tiny_all_in_one["schnell"][0]
    meta = meta_model(parse_config(lora_config("flux", basic={"base_model": str(path)})), method_spec("lora"))
    assert meta.family is FLUX and not meta.denoiser.config.guidance_embeds
    assert sum(p.numel() for p in meta.denoiser.parameters()) > 11e9  # the full-size transformer, on meta
    only = tmp_path / "flux1-schnell.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(16)}, str(only))
    with pytest.raises(ConjureError, match=r"^flux1-schnell.safetensors is a FLUX.1 transformer file, which holds "
                                           r"the transformer alone; .* or train from an all-in-one checkpoint"):
        meta_model(parse_config(lora_config("flux", basic={"base_model": str(only)})), method_spec("lora"))


def test_a_scaled_float8_file_is_refused_in_one_line(tiny_all_in_one, shipped, tmp_path):
    """ComfyUI's scaled float8 weights read as plain ones would be wrong by their `scale_weight` factors."""
    from safetensors import safe_open

    path, configs, _ = tiny_all_in_one["dev"]
    shipped(configs)
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    scaled = tmp_path / "t5xxl-scaled.safetensors"
    save_file(state | {"text_encoders.t5xxl.transformer.scaled_fp8": torch.zeros(0)}, str(scaled))
    with pytest.raises(ConjureError, match=r"^t5xxl-scaled.safetensors is a ComfyUI scaled-float8 checkpoint "
                                           r"\('text_encoders.t5xxl.transformer.scaled_fp8': .* conjure does not read"):
        load_base_model(str(scaled))


def test_real_all_in_one_names_fill_the_models_the_shipped_configs_build():
    """On the meta device, at FLUX.1's full size: the VAE's LDM names (BFL's ae, as ComfyUI saves it under `vae.`),
    CLIP-L's and T5-XXL's transformers names under their ComfyUI prefixes, converted by the diffusers converters
    load_parts uses, name every parameter of the models the shipped configs build, in its shape."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_sd3_t5_checkpoint_to_diffusers,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from conjure.export.single_file import ldm_vae_state_dict
    from conjure.models.flux_single_file import FLUX_CONFIGS
    from conjure.models.reference import build_reference_components

    reference = build_reference_components("flux", device="meta")
    clip_slot, t5_slot = FLUX.text_encoders
    vae_config = AutoencoderKL.load_config(FLUX_CONFIGS, subfolder="vae")
    with init_empty_weights():
        built = {"vae": AutoencoderKL.from_config(vae_config),
                 clip_slot.encoder: CLIPTextModel(CLIPTextConfig.from_pretrained(FLUX_CONFIGS / clip_slot.encoder)),
                 t5_slot.encoder: T5EncoderModel(T5Config.from_pretrained(FLUX_CONFIGS / t5_slot.encoder))}
    ldm_vae = {FLUX.checkpoint_vae_prefix + k: v for k, v in ldm_vae_state_dict(reference["vae"].state_dict()).items()}
    clip = {f"{clip_slot.checkpoint_prefix}text_model.{k.removeprefix('text_model.')}": v
            for k, v in reference[clip_slot.encoder].state_dict().items()}
    t5 = {t5_slot.checkpoint_prefix + k: v for k, v in reference[t5_slot.encoder].state_dict().items()
          if k != "encoder.embed_tokens.weight"}  # tied to `shared`, which ComfyUI saves alone
    converted = {
        "vae": convert_ldm_vae_checkpoint(ldm_vae, vae_config),
        clip_slot.encoder: {k.removeprefix("text_model."): v
                            for k, v in convert_ldm_clip_checkpoint(clip, clip_slot.checkpoint_prefix).items()},
        t5_slot.encoder: convert_sd3_t5_checkpoint_to_diffusers(t5),
    }
    for name, model in built.items():
        getattr(model, "tie_weights", lambda: None)()  # as load_parts ties T5's encoder.embed_tokens to `shared`
        wanted = {k: tuple(p.shape) for k, p in model.named_parameters()}
        got = {k: tuple(v.shape) for k, v in converted[name].items() if k in wanted}
        assert got == wanted, name
