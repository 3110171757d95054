"""families.detect() read directly from UNet configs (the tiny models', the full-size references', hand-written
ones), and each Family record agrees with itself: the slots, the reference architecture and the kohya names."""

from __future__ import annotations

import pytest
from diffusers.configuration_utils import FrozenDict

from conjure import families
from conjure.errors import ConjureError
from conjure.models.reference import unet_config
from conjure.models.tiny import build_tiny_components


@pytest.mark.parametrize("name", list(families.unet_families()))
@pytest.mark.parametrize("size", [{}, {"real_layout": True}])
def test_tiny_models_are_detected_as_their_family(name, size):
    parts = build_tiny_components(name, **size)
    assert families.detect(parts["unet"].config, has_text_encoder_2="text_encoder_2" in parts) is families.get(name)


@pytest.mark.parametrize("name", list(families.unet_families()))
def test_full_size_configs_are_detected_as_their_family(name):
    family = families.get(name)
    config = FrozenDict(unet_config(family.reference))
    assert families.detect(config, has_text_encoder_2=len(family.text_encoders) == 2) is family


def test_what_each_family_is_told_by():
    # SDXL: the text_time add-embedding, or a second text encoder alone
    assert families.detect({"addition_embed_type": "text_time"}, has_text_encoder_2=False) is families.SDXL
    assert families.detect({}, has_text_encoder_2=True) is families.SDXL
    # SD 2.x: linear projections, or OpenCLIP-H's 1024-wide cross-attention alone (an sgm-layout 2.x file)
    assert families.detect({"use_linear_projection": True}, has_text_encoder_2=False) is families.SD2
    assert families.detect({"cross_attention_dim": 1024}, has_text_encoder_2=False) is families.SD2
    # SD 1.x: neither; width alone does not tell (tiny models of every family are 32 wide)
    assert families.detect({"cross_attention_dim": 768}, has_text_encoder_2=False) is families.SD1
    assert families.detect({"cross_attention_dim": 32}, has_text_encoder_2=False) is families.SD1
    assert families.detect({"use_linear_projection": False, "addition_embed_type": None}, False) is families.SD1


def test_get_takes_a_name_or_a_family_and_names_the_known_ones():
    assert families.get("sd2") is families.SD2 and families.get(families.SDXL) is families.SDXL
    for bad in ("sd3", None):
        with pytest.raises(ConjureError, match=r"unknown model family .*known: sd1, sd2, sdxl, flux"):
            families.get(bad)


@pytest.mark.parametrize("family", list(families.unet_families().values()), ids=list(families.unet_families()))
def test_each_record_agrees_with_itself(family):
    arch = family.reference
    assert [s.width for s in family.text_encoders] == [e.hidden for e in arch.encoders]
    assert arch.cross_attention_dim == sum(s.width for s in family.text_encoders)
    assert len(arch.down_blocks) == len(arch.up_blocks) == len(arch.block_out_channels)
    # the pooled encoder (a CLIPTextModelWithProjection) is the last; its projection feeds the add-embedding
    assert [s.pooled for s in family.text_encoders].count(True) == (1 if arch.addition_time_embed_dim else 0)
    prefixes = family.kohya_prefixes()
    assert len(set(prefixes.values())) == len(prefixes) == 1 + len(family.text_encoders)
    if family.resolution_by_prediction:
        assert dict(family.resolution_by_prediction)[arch.prediction_type] == arch.resolution
    assert family.ss_base_model_version.startswith(family.ss_version_prefix)
    assert family.modelspec_prefix.startswith(family.modelspec_family)
    assert family.modelspec_prefix_v.startswith(family.modelspec_family)
    assert family.slot("text_encoder") is family.text_encoders[0] and family.slot("vae") is None


def test_metadata_prefixes_tell_the_families_apart():
    names = list(families.FAMILIES.values())
    for field in ("ss_version_prefix", "modelspec_family"):
        values = [getattr(f, field) for f in names]
        assert not any(a != b and a.startswith(b) for a in values for b in values), field


def test_the_flux_record_agrees_with_itself_and_flux_1_dev():
    family = families.FLUX
    arch = family.reference
    assert isinstance(arch, families.TransformerArchitecture)
    assert [s.width for s in family.text_encoders] == [768, arch.joint_attention_dim]
    assert arch.pooled_projection_dim == family.text_encoders[0].width  # FLUX reads CLIP-L pooled only
    assert [s.output for s in family.text_encoders] == ["pooled", "hidden"]
    assert [s.kind for s in family.text_encoders] == ["clip", "t5"]
    assert sum(arch.axes_dims_rope) == arch.attention_head_dim
    assert arch.in_channels == 64  # FLUX.1-dev transformer/config.json
    assert family.kohya_prefixes() == {"transformer": "lora_unet_", "text_encoder": "lora_te1_",
                                       "text_encoder_2": "lora_te2_"}
    assert (family.denoiser, family.objective, family.conditioning) == ("transformer", "flow", "flux")
    assert family.modelspec_architecture("lora", "flow_matching", "dev") == "flux-1-dev/lora"
    assert family.modelspec_architecture("lora", "flow_matching", "schnell") == "flux-1-schnell/lora"
    assert family.lora_preset("auto") == family.lora_preset("attention_mlp")


@pytest.mark.parametrize("guidance, variant", [(True, "dev"), (False, "schnell")])
def test_the_flux_variant_is_read_from_the_transformer_config(guidance, variant):
    config = FrozenDict({"guidance_embeds": guidance, "num_layers": 19})
    found = families.detect_variant(families.FLUX, config)
    assert found.name == variant and found.text_tokens == {"dev": 512, "schnell": 256}[variant]


@pytest.mark.parametrize("family", list(families.FAMILIES.values()), ids=list(families.FAMILIES))
def test_each_family_has_its_default_lora_preset_conditioning_and_objective(family):
    from conjure.train.objectives import CONDITIONINGS, OBJECTIVES

    assert family.default_lora_preset in dict(family.lora_presets)
    assert family.conditioning in CONDITIONINGS and family.objective in OBJECTIVES
