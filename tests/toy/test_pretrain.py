"""The toy pre-training builds what the shipped toy models are (their configs and model_index.json, byte for byte
where it writes them), now that it derives each variant from the family record; and a one-step run saves them."""

from __future__ import annotations

import json

import pytest

from conjure.toy import pretrain
from conjure.toy.models import toy_model

IGNORED = {
    "architectures", "_class_name", "_diffusers_version", "_name_or_path", "transformers_version",
    "_use_default_values", "dtype", "torch_dtype", "_commit_hash",
}


def _config(part) -> dict:
    config = part.config.to_dict() if hasattr(part.config, "to_dict") else dict(part.config)
    return {k: v for k, v in json.loads(json.dumps(config, default=list)).items() if k not in IGNORED}


def _shipped(path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in IGNORED}


@pytest.mark.parametrize("variant", pretrain.VARIANTS)
def test_variants_are_built_as_the_shipped_toy_models_are(variant):
    folder = toy_model(variant)
    parts = pretrain.build_variant(variant)
    for name in ("unet", "scheduler", "text_encoder", "text_encoder_2"):
        if name in parts:
            saved = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
            shipped, built = _shipped(saved), _config(parts[name])
            assert {k: built.get(k, "(missing)") for k in shipped} == shipped, name
    assert ("text_encoder_2" in parts) == (folder / "text_encoder_2").is_dir()
    index = pretrain._model_index(variant)
    index["_diffusers_version"] = json.loads((folder / "model_index.json").read_text())["_diffusers_version"]
    assert json.dumps(index, indent=2) + "\n" == (folder / "model_index.json").read_text()


def test_a_one_step_run_saves_the_averaged_parts(tmp_path):
    vae = pretrain.build_vae()
    parts = pretrain.train_variant("sdxl", vae, 1, out=tmp_path, images=2, batch=2, log_every=1)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert (tmp_path / name / "config.json").is_file(), name
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    assert parts["text_encoder_2"].config.projection_dim == 32
