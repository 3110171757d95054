"""The metadata apps read from every file kind conjure trains, per family (correctness review, defects 5 and 7):
`ss_v2` (A1111 files a LoRA for SD 2.x only when it reads "True"), the model spec's architecture names
(SD 2.x: `stable-diffusion-v2-512` / `-768-v`) and `modelspec.prediction_type` for LoRA, DoRA, PEFT, embedding,
pivotal and bundle files, and LyCORIS's `wd_on_output` in DoRA files."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from conjure.config import parse_config
from conjure.config.pivotal import PivotalTextualInversionSection
from conjure.methods import method_spec
from conjure.models.loading import load_base_model
from conjure.train.loop import train

ARCHITECTURE = {
    ("sd1", "epsilon"): "stable-diffusion-v1", ("sd1", "v_prediction"): "stable-diffusion-v1",
    ("sd2", "epsilon"): "stable-diffusion-v2-512", ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
    ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base", ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base",
}
KINDS = {  # file kind -> (config type stem, lora section)
    "lora": ("lora", {"rank": 2, "trigger_word": "zwx"}),
    "dora": ("lora", {"rank": 2, "trigger_word": "zwx", "dora": True}),
    "peft": ("lora", {"rank": 2, "trigger_word": "zwx", "save_format": "peft"}),
    "ti": ("textual_inversion", None),
    "pivotal": ("lora_and_textual_inversion", {"rank": 2}),
}


def raw_config(family: str, kind: str, model) -> dict:
    stem, lora = KINDS[kind]
    raw = {
        "type": f"{'sdxl' if family == 'sdxl' else 'sd'}_{stem}",
        "basic": {"base_model": str(model), "output_dir": "unused"},
        "data": {"source": "unused"},
    }
    if lora is not None:
        raw["lora"] = lora
    if stem != "lora":
        raw["textual_inversion"] = {"placeholder_token": "<zq-thing>", "initializer": "dog"}
    if kind == "pivotal":
        raw["textual_inversion"]["bundle"] = True
    return raw


def headers(folder) -> dict[str, dict[str, str]]:
    out = {}
    for path in sorted(folder.iterdir()):
        with safe_open(str(path), "pt") as f:
            out[path.name] = f.metadata()
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family, prediction_type", [
    ("sd1", "epsilon"), ("sd2", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon"), ("sdxl", "v_prediction"),
])
def test_every_file_says_its_architecture_and_prediction_type(tiny_models, tmp_path, family, prediction_type, kind):
    model_dir = tiny_models(family)
    config = parse_config(raw_config(family, kind, model_dir))
    method = method_spec(config.type).build(config, load_base_model(str(model_dir)))
    method.save(tmp_path, step=3, resolution=64, base_model="m", run_name="run", prediction_type=prediction_type)
    files = headers(tmp_path)
    expected_files = {"lora": ["run.safetensors"], "dora": ["run.safetensors"], "peft": ["run.safetensors"],
                      "ti": ["zq-thing.safetensors"],
                      "pivotal": ["run.bundle.safetensors", "run.safetensors", "zq-thing.safetensors"]}[kind]
    assert sorted(files) == expected_files
    for name, meta in files.items():
        suffix = "textual-inversion" if name == "zq-thing.safetensors" else "lora"
        assert meta["modelspec.architecture"] == f"{ARCHITECTURE[family, prediction_type]}/{suffix}", name
        assert meta["modelspec.prediction_type"] == {"epsilon": "epsilon", "v_prediction": "v"}[prediction_type]
        if suffix == "lora":
            assert meta["ss_v2"] == str(family == "sd2"), name
            assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
        else:
            assert not [k for k in meta if k.startswith("ss_")], name  # embeddings carry no kohya network keys
    if kind == "dora":
        args = json.loads(files["run.safetensors"]["ss_network_args"])
        assert args == {"algo": "lora", "dora_wd": True, "wd_on_output": False}  # LyCORIS's key (lycoris/kohya.py)


@pytest.mark.parametrize("override, expected", [(None, "v"), ("epsilon", "epsilon")])
def test_a_run_writes_the_prediction_type_it_trained(ti_config, override, expected):
    """The tiny SD 2.x model's scheduler predicts v; advanced.prediction_type overrides it for the loss and so for
    the files."""
    raw = ti_config("sd2", basic={"max_train_steps": 1, "save_every_n_steps": 1, "validate_every_n_steps": None},
                    validation={"at_start": False})
    if override:
        raw["advanced"] = {"prediction_type": override}
    result = train(parse_config(raw))
    with safe_open(str(result.checkpoints[-1] / "zq-thing.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == expected
    assert meta["modelspec.architecture"] == {
        "v": "stable-diffusion-v2-768-v", "epsilon": "stable-diffusion-v2-512"}[expected] + "/textual-inversion"


def test_bundle_help_says_which_apps_read_the_bundle():
    """ComfyUI's LoRA loader skips bundle_emb keys and InvokeAI drops them (review note on the bundle help)."""
    text = PivotalTextualInversionSection.model_fields["bundle"].description
    assert "A1111" in text and "ComfyUI's LoRA loader skips" in text and "InvokeAI" in text
