"""Kohya names of every adaptable module of the real SD 1.5 / 2.1 / SDXL models: unique, readable back, and (SDXL)
the same modules diffusers' own LDM converters find."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils import convert_unet_state_dict_to_peft

from conjure.errors import ConjureError
from conjure.export.kohya import layout_from_metadata, layout_metadata
from conjure.export.kohya_names import (
    SDXL_LAYOUT,
    UnetLayout,
    canonical_module_path,
    kohya_name,
    module_path_from_kohya,
    resolve_module_path,
    unet_layout,
)
from conjure.models.reference import build_reference_components
from conjure.models.tiny import build_tiny_components

ENCODERS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_reference_components(family, device="meta")
        return cache[family]

    return get


def adaptable(model):
    return [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def all_names(components, family):
    """kohya name -> (component, module path) for every Linear/Conv2d of every component."""
    out = {}
    for component in ENCODERS:
        if component not in components:
            continue
        model = components[component]
        config = model.config if component == "unet" else None
        for path in adaptable(model):
            name = kohya_name(component, path, family, config)
            assert name not in out, f"{name} names both {out[name]} and {(component, path)}"
            out[name] = (component, path)
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_module_of_the_full_size_model_has_a_unique_name_that_reads_back(reference, family):
    components = reference(family)
    names = all_names(components, family)
    counts = {c: sum(1 for comp, _ in names.values() if comp == c) for c in ENCODERS}
    expected = {c: len(adaptable(components[c])) for c in ENCODERS if c in components}
    assert {c: n for c, n in counts.items() if n} == expected
    assert counts["unet"] > 250 and counts["text_encoder"] >= 72  # conv_in ... conv_out; 12+ layers x 6
    for name, (component, path) in names.items():
        config = components["unet"].config if component == "unet" else None
        # as the model spells it (checked against its modules), and as the installed transformers spells it
        assert module_path_from_kohya(name, family, config, model=components[component]) == (component, path)
        assert module_path_from_kohya(name, family, config) == (component, path)
        assert module_path_from_kohya(name + ".lora_down.weight", family, config) == (component, path)


def test_example_names_are_the_ones_apps_expect(reference):
    sd1, sdxl = reference("sd1"), reference("sdxl")
    names_sd1 = all_names(sd1, "sd1")
    names_xl = all_names(sdxl, "sdxl")
    for name in [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_time_embedding_linear_1",
        "lora_te_text_model_encoder_layers_11_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_0_mlp_fc2",
    ]:
        assert name in names_sd1
    for name, path in {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
        "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "lora_unet_input_blocks_1_0_out_layers_3": "down_blocks.0.resnets.0.conv2",
        "lora_unet_input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
        "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "lora_unet_middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k": "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
        "lora_unet_output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
        "lora_unet_input_blocks_0_0": "conv_in",
        "lora_unet_out_2": "conv_out",
        "lora_unet_time_embed_0": "time_embedding.linear_1",
        "lora_unet_time_embed_2": "time_embedding.linear_2",
        "lora_unet_label_emb_0_0": "add_embedding.linear_1",
        "lora_unet_label_emb_0_2": "add_embedding.linear_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc1": "text_model.encoder.layers.31.mlp.fc1",
        "lora_te2_text_projection": "text_projection",
    }.items():
        assert names_xl[name][1] == path, name
    assert not any("down_blocks" in n or "add_embedding" in n for n in names_xl)


def _dotted_ldm(body):
    """LDM underscore name -> the dotted state-dict path (the multi-word names of the LDM UNet kept)."""
    words = ["input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
             "skip_connection", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out",
             "time_embed", "label_emb"]
    for w in words:
        body = body.replace(w, w.replace("_", "\0"))
    return body.replace("_", ".").replace("\0", "_")


@pytest.mark.parametrize("source", ["reference", "tiny-default"])
def test_sdxl_unet_names_agree_with_diffusers_single_file_ldm_converter(reference, source):
    """diffusers' LDM -> diffusers UNet checkpoint conversion puts each LDM tensor where our names say (the real
    layout, and the default tiny one: 1 layer per block, an upsampler on a level without attention)."""
    unet = reference("sdxl")["unet"] if source == "reference" else build_tiny_components("sdxl")["unet"]
    checkpoint, expected = {}, {}
    for i, path in enumerate(adaptable(unet)):
        ldm = _dotted_ldm(kohya_name("unet", path, "sdxl", unet.config).removeprefix("lora_unet_"))
        for j, suffix in enumerate(("weight", "bias")):
            checkpoint[f"model.diffusion_model.{ldm}.{suffix}"] = torch.tensor(float(2 * i + j))
            expected[f"{path}.{suffix}"] = float(2 * i + j)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert {k: v.item() for k, v in converted.items()} == expected


@pytest.mark.parametrize("source", ["reference", "tiny-real-layout"])
def test_sdxl_unet_names_agree_with_diffusers_kohya_lora_loader(reference, source):
    """diffusers' kohya LoRA reader (SGM block remapping + key conversion) finds each module our names mean, for
    the real layout and the tiny one with the real block layout. (Not for layouts unlike SDXL's: diffusers 0.42
    maps `output_blocks_K_1_conv`, the upsampler of an up level without attention, to `attentions.1.conv`; real
    SDXL has no such level, and the single-file converter above reads it right.)"""
    unet = reference("sdxl")["unet"] if source == "reference" else build_tiny_components("sdxl", real_layout=True)["unet"]
    paths = adaptable(unet)
    state = {}
    for path in paths:
        name = kohya_name("unet", path, "sdxl", unet.config)
        assert module_path_from_kohya(name, "sdxl", unet.config) == ("unet", path)
        state[f"{name}.lora_down.weight"] = torch.zeros(1, 1)
        state[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    unet_keys = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    peft_keys = convert_unet_state_dict_to_peft(unet_keys)
    found = {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")}
    assert found == set(paths)
    assert len(alphas) == len(paths)


def test_tiny_real_layout_has_two_layers_per_block_and_the_real_block_types():
    for family, levels in (("sd1", 4), ("sdxl", 3)):
        config = build_tiny_components(family, real_layout=True)["unet"].config
        assert config.layers_per_block == 2 and len(config.down_block_types) == levels
    assert build_tiny_components("sd1")["unet"].config.layers_per_block == 1  # the default is unchanged


def test_text_encoder_paths_follow_the_model_given():
    components = build_tiny_components("sdxl")
    te1, te2 = components["text_encoder"], components["text_encoder_2"]
    name1 = "lora_te1_text_model_encoder_layers_1_self_attn_out_proj"
    assert module_path_from_kohya(name1, "sdxl", model=te1) == ("text_encoder", "encoder.layers.1.self_attn.out_proj")
    assert module_path_from_kohya(name1.replace("te1", "te2"), "sdxl", model=te2) == (
        "text_encoder_2", "text_model.encoder.layers.1.self_attn.out_proj",
    )
    # both spellings name the same module
    for path in ("encoder.layers.1.mlp.fc1", "text_model.encoder.layers.1.mlp.fc1"):
        assert kohya_name("text_encoder", path, "sdxl") == "lora_te1_text_model_encoder_layers_1_mlp_fc1"
        assert resolve_module_path(path, te1) == "encoder.layers.1.mlp.fc1"
        assert resolve_module_path(path, te2) == "text_model.encoder.layers.1.mlp.fc1"
    assert canonical_module_path("text_encoder_2", "text_projection") == "text_projection"
    # names without text_model_ (some tools) read too
    assert module_path_from_kohya("lora_te_encoder_layers_0_mlp_fc1", "sd1", model=te1)[1] == "encoder.layers.0.mlp.fc1"


@pytest.mark.parametrize(
    "name, family",
    [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q", "sd1"),
        ("lora_unet_input_blocks_3_1_proj_in", "sdxl"),  # index 3 is level 0's downsampler slot
        ("lora_unet_output_blocks_1_1_conv", "sdxl"),  # an upsampler sits at the last layer of a level only
        ("lora_unet_middle_block_3_in_layers_2", "sdxl"),
        ("lora_unet_foo", "sd1"),
        ("lora_vae_encoder_conv_in", "sd1"),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "sd1"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc3", "sdxl"),
        ("down_blocks_0_resnets_0_conv1", "sd1"),
    ],
)
def test_names_that_cannot_be_mapped_raise(name, family):
    with pytest.raises(ConjureError):
        module_path_from_kohya(name, family)


def test_paths_that_have_no_name_raise():
    with pytest.raises(ConjureError, match="no kohya name"):
        kohya_name("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", "sd1")
    with pytest.raises(ConjureError, match="no kohya name"):
        kohya_name("unet", "down_blocks.0.resnets.2.conv1", "sdxl")  # layer 2 of 2: not in the SDXL layout
    with pytest.raises(ConjureError, match="no component"):
        kohya_name("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", "sd1")
    with pytest.raises(ConjureError, match="unknown model family"):
        kohya_name("unet", "conv_in", "sd3")
    with pytest.raises(ConjureError, match="layers per block"):
        unet_layout({"layers_per_block": [1, 2, 2]})
    with pytest.raises(ConjureError):
        module_path_from_kohya("lora_unet_conv_in", "sd1", model=torch.nn.Linear(1, 1))  # not in that model


def test_layout_from_configs_and_metadata():
    assert unet_layout(None) == SDXL_LAYOUT == UnetLayout(2, (True, True, False))
    config = build_tiny_components("sdxl")["unet"].config  # default tiny: 1 layer, (UpBlock2D, CrossAttnUpBlock2D)
    layout = unet_layout(config)
    assert layout == UnetLayout(1, (False, True))
    assert layout_from_metadata(layout_metadata(config)) == layout
    assert layout_from_metadata({}) is None
    # upsampler part index follows the level's attention
    assert kohya_name("unet", "up_blocks.0.upsamplers.0.conv", "sdxl", config) == "lora_unet_output_blocks_1_1_conv"
    assert kohya_name("unet", "up_blocks.0.upsamplers.0.conv", "sdxl") == "lora_unet_output_blocks_2_2_conv"
