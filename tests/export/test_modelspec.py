"""modelspec.* and conjure.* header keys in one place (as kohya's library/sai_model_spec.py builds them): the
values per family and prediction type, every value a string."""

from __future__ import annotations

import datetime as dt

import pytest

from conjure import __version__, families
from conjure.export.modelspec import conjure_keys, modelspec

EXPECTED = {  # (family, prediction type) -> (architecture prefix, modelspec.prediction_type, implementation)
    ("sd1", "epsilon"): ("stable-diffusion-v1", "epsilon", "diffusers"),
    ("sd2", "epsilon"): ("stable-diffusion-v2-512", "epsilon", "diffusers"),
    ("sd2", "v_prediction"): ("stable-diffusion-v2-768-v", "v", "diffusers"),
    ("sdxl", "epsilon"): ("stable-diffusion-xl-v1-base", "epsilon", "https://github.com/Stability-AI/generative-models"),
}


@pytest.mark.parametrize("kind", ["lora", "textual-inversion"])
@pytest.mark.parametrize("family, prediction_type", list(EXPECTED))
def test_modelspec_values_per_family_and_prediction_type(family, prediction_type, kind):
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    keys = modelspec(families.get(family), kind, title="zq", resolution=768, prediction_type=prediction_type)
    architecture, prediction, implementation = EXPECTED[(family, prediction_type)]
    date = keys.pop("modelspec.date")
    assert keys == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/{kind}",
        "modelspec.prediction_type": prediction,
        "modelspec.implementation": implementation,
        "modelspec.title": "zq",
        "modelspec.resolution": "768x768",
    }
    assert before <= dt.datetime.fromisoformat(date) <= dt.datetime.now(dt.timezone.utc)
    assert dt.datetime.fromisoformat(date).utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_a_flux_lora_is_named_by_its_variant_without_a_prediction_type(variant):
    """kohya's sai_model_spec.py: flux-1-dev / flux-1-schnell, the FLUX implementation, and no
    modelspec.prediction_type (a flow model has none of the spec's epsilon/v values)."""
    keys = modelspec(families.FLUX, "lora", title="zq", resolution=1024, prediction_type="flow_matching",
                     variant=variant)
    assert keys["modelspec.architecture"] == f"flux-1-{variant}/lora"
    assert keys["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in keys


def test_conjure_keys_are_strings_and_leave_out_none():
    keys = conjure_keys(family="sd2", steps=12, trigger_words=None, clip_skip=2.0)
    assert keys == {"conjure.version": __version__, "conjure.family": "sd2", "conjure.steps": "12",
                    "conjure.clip_skip": "2.0"}
