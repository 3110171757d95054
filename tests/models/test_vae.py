"""basic.vae: a VAE from a folder, a model folder, or one file (original or diffusers key names) replaces the base
model's for training and validation, and the run records it."""

import pytest
import yaml
import torch
from safetensors.torch import save_file

from conjure.config import parse_config
from conjure.errors import ConjureError
from conjure.models.loading import load_base_model
from conjure.models.tiny import build_tiny_components, write_tiny_model
from conjure.runs.events import read_events
from conjure.train.loop import train


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A tiny SD1 model with other weights: its VAE is the override."""
    return write_tiny_model("sd1", tmp_path_factory.mktemp("other-vae"), seed=7)


def same_weights(a, b):
    b = b.state_dict()
    return all(torch.equal(v, b[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("form", ["vae folder", "model folder", "original file", "diffusers file"])
def test_basic_vae_replaces_the_base_models_vae(tiny_models, other_model, tmp_path, ldm, form):
    wanted = build_tiny_components("sd1", seed=7)["vae"]
    source = {"vae folder": other_model / "vae", "model folder": other_model}.get(form, tmp_path / "vae.safetensors")
    if form == "original file":  # as sdxl_vae.safetensors / vae-ft-mse-840000: bare original names
        save_file({k.removeprefix("first_stage_model."): v for k, v in ldm.vae(wanted).items()}, str(source))
    elif form == "diffusers file":  # as sdxl-vae-fp16-fix's diffusion_pytorch_model.safetensors
        save_file(wanted.state_dict(), str(source))
    base = load_base_model(str(tiny_models("sd1")))
    model = load_base_model(str(tiny_models("sd1")), vae=str(source))
    assert same_weights(model.vae, wanted) and not same_weights(base.vae, wanted)
    assert (model.facts["vae"].value, model.facts["vae"].source) == (str(source), "basic.vae")
    assert model.vae.dtype == torch.float32


def test_a_vae_that_does_not_fit_is_one_clear_error(tiny_models, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ConjureError, match="basic.vae: cannot load"):
        load_base_model(str(tiny_models("sd1")), vae=str(bad))
    with pytest.raises(ConjureError, match="basic.vae: .* is not a file, a folder or a hub id"):
        load_base_model(str(tiny_models("sd1")), vae=str(tmp_path / "missing" / "x"))


def test_the_run_trains_and_validates_with_basic_vae_and_records_it(ti_config, other_model, monkeypatch):
    import conjure.train.validation as validation

    raw = ti_config(basic={"vae": str(other_model / "vae"), "max_train_steps": 1, "validate_every_n_steps": None},
                    validation={"at_start": False})
    wanted, used = build_tiny_components("sd1", seed=7)["vae"], {}
    build = validation.build_pipeline

    def keep(cls, components, *args):
        used["validation"] = components["vae"]
        return build(cls, components, *args)

    monkeypatch.setattr(validation, "build_pipeline", keep)
    result = train(parse_config(raw))
    start = read_events(result.run_dir / "events.jsonl").events[0]
    assert start["chosen"]["vae"] == {"value": str(other_model / "vae"), "from": "basic.vae"}
    assert same_weights(used["validation"].cpu(), wanted)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["basic"]["vae"] == str(other_model / "vae")
