"""Tiny random-weight SD1/SD2/SDXL/FLUX models: folder layout, loading back, generation, determinism, real widths."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from conjure.errors import ConjureError
from conjure.families import unet_families
from conjure.models.tiny import FAMILIES, build_tiny_components, write_tiny_model

PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
             "flux": FluxPipeline}
UNET_FAMILIES = tuple(unet_families())
PROMPT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with the real CLIP vocabulary


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """One default-size model folder per family, written once for the session (~0.5 s each)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: write_tiny_model(family, root / family) for family in FAMILIES}


def _generate(pipe, seed=0):
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_as_pipeline_and_generates(tiny_model_dirs, family):
    path = tiny_model_dirs[family]
    assert (path / "model_index.json").is_file()
    pipe = PIPELINES[family].from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert np.array_equal(images, _generate(pipe)), "fixed generator must give the same image"
    assert pipe.tokenizer("a photo of a cat").input_ids == PROMPT_IDS


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_parts_load_individually(tiny_model_dirs, family):
    path = tiny_model_dirs[family]
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")

    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 64
    assert scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == ("!" if family == "sd2" else "<|endoftext|>")
    assert text_encoder.config.eos_token_id == tokenizer.eos_token_id == 49407
    assert text_encoder.config.pad_token_id == tokenizer.pad_token_id
    assert unet.config.cross_attention_dim == (64 if family == "sdxl" else 32)
    # Weights on disk use the `text_model.` prefix of real SD folders (transformers 5 alone would drop it).
    with safe_open(path / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    if family == "sdxl":
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
        assert (tokenizer_2.pad_token, tokenizer_2.pad_token_id) == ("!", 0)
        assert text_encoder_2.config.pad_token_id == 0 and text_encoder_2.config.eos_token_id == 49407
        assert unet.config.addition_embed_type == "text_time"


def test_flux_parts_load_individually(tiny_model_dirs):
    path = tiny_model_dirs["flux"]
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    t5_tokenizer = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2")

    assert transformer.config.guidance_embeds  # dev-like by default
    assert transformer.config.in_channels == 4 * vae.config.latent_channels  # 2x2 packing
    assert transformer.config.joint_attention_dim == t5.config.d_model
    assert transformer.config.pooled_projection_dim == text_encoder.config.hidden_size
    assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim
    # FLUX.1's VAE traits: its scale and shift, no quant convolutions
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    assert not vae.config.use_quant_conv and not vae.config.use_post_quant_conv
    assert scheduler.config.use_dynamic_shifting and scheduler.config.max_shift == 1.15
    assert tokenizer.pad_token == "<|endoftext|>"
    # T5's special ids, and a caption ends with </s>
    assert (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id, t5_tokenizer.unk_token_id) == (0, 1, 2)
    ids = t5_tokenizer("a red star").input_ids  # the toy FLUX's T5 tokenizer: every toy word one token
    assert ids[-1] == 1 and len(ids) == 4 and 2 not in ids
    assert t5.config.vocab_size == len(t5_tokenizer) and t5.config.feed_forward_proj == "gated-gelu"


def test_flux_schnell_has_no_guidance_input():
    components = build_tiny_components("flux", variant="schnell")
    assert not components["transformer"].config.guidance_embeds
    assert not components["scheduler"].config.use_dynamic_shifting  # schnell samples unshifted
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    assert _generate(pipe).shape == (1, 64, 64, 3)


PARTS = {
    "sd1": {"unet", "text_encoder", "tokenizer", "safety_checker"},
    "sd2": {"unet", "text_encoder", "tokenizer", "safety_checker"},
    "sdxl": {"unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"},
    "flux": {"transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_components_build_a_pipeline_in_memory(family):
    components = build_tiny_components(family)
    assert set(components) == PARTS[family] | {"vae", "scheduler", "image_encoder", "feature_extractor"}
    pipe = PIPELINES[family](**components, **({"requires_safety_checker": False} if "safety_checker" in components
                                              else {}))
    pipe.set_progress_bar_config(disable=True)
    assert _generate(pipe).shape == (1, 64, 64, 3)


def test_same_seed_same_weights_and_caller_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for family, parts in (("sdxl", ("unet", "vae", "text_encoder", "text_encoder_2")),
                          ("flux", ("transformer", "vae", "text_encoder", "text_encoder_2"))):
        _assert_seeded(family, parts, before)


def _assert_seeded(family, parts, before):
    a = build_tiny_components(family, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_tiny_components(family, seed=0)
    c = build_tiny_components(family, seed=1)
    for name in parts:
        sa, sb, sc = a[name].state_dict(), b[name].state_dict(), c[name].state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_written_weights_match_built_weights(tmp_path):
    path = write_tiny_model("sd1", tmp_path / "m", seed=3)
    built = build_tiny_components("sd1", seed=3)
    for name, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        loaded = cls.from_pretrained(path, subfolder=name).state_dict()
        original = built[name].state_dict()
        assert loaded.keys() == original.keys()
        assert all(torch.equal(loaded[k], original[k]) for k in original), name


def test_unknown_family_is_a_user_error(tmp_path):
    with pytest.raises(ConjureError, match="unknown model family 'sd3'"):
        build_tiny_components("sd3")
    with pytest.raises(ConjureError, match="sd1, sd2, sdxl"):
        write_tiny_model("sd3", tmp_path / "x")
    assert not (tmp_path / "x").exists()


REAL_WIDTHS = {  # family -> (text-encoder hidden sizes, UNet cross_attention_dim)
    "sd1": ((768,), 768),
    "sd2": ((1024,), 1024),
    "sdxl": ((768, 1280), 2048),
}


def test_flux_has_no_real_widths_tiny_model():
    with pytest.raises(ConjureError, match="build_reference_components on the meta device"):
        build_tiny_components("flux", real_widths=True)


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_real_widths_components(family):
    components = build_tiny_components(family, real_widths=True)  # 1.5-3.5 s
    hidden, cross = REAL_WIDTHS[family]
    encoders = [components["text_encoder"]] + ([components["text_encoder_2"]] if family == "sdxl" else [])
    assert tuple(e.config.hidden_size for e in encoders) == hidden
    assert all(e.get_input_embeddings().weight.shape == (49408, e.config.hidden_size) for e in encoders)
    unet = components["unet"]
    assert unet.config.cross_attention_dim == cross
    assert unet.config.layers_per_block == 2
    if family == "sdxl":
        assert encoders[1].config.projection_dim == 1280
        assert unet.config.addition_time_embed_dim == 256
        assert unet.config.projection_class_embeddings_input_dim == 6 * 256 + 1280
        assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        pipe = StableDiffusionXLPipeline(**components)
    else:
        assert len(unet.config.down_block_types) == 4  # the real SD1/SD2 block layout
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_real_widths_write_and_load(tmp_path, family):
    # 4-9 s and 0.2-0.7 GB on disk each.
    path = write_tiny_model(family, tmp_path / family, real_widths=True)
    pipe = PIPELINES[family].from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    hidden, cross = REAL_WIDTHS[family]
    assert pipe.text_encoder.config.hidden_size == hidden[0]
    assert pipe.unet.config.cross_attention_dim == cross
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
