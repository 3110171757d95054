"""Single-file checkpoints: family, prediction type, zero-terminal SNR and resolution come from the file (marker keys,
the loaded UNet's config, SD 2.x's weight statistic) or from basic.base_model_config, or conjure refuses to guess.

The files are tiny models under the real original key names (tests/models/conftest.py), loaded through conjure's
own single-file path."""

import pytest
import torch

from conjure.config import parse_config
from conjure.errors import ConjureError
from conjure.models.loading import load_base_model
from conjure.runs.events import read_events
from conjure.train.loop import train

PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def facts(model):
    return {name: fact.value for name, fact in model.facts.items() if name != "vae"}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_single_file_loads_as_the_model_it_was_made_from(write_single_file, single_file_model, family):
    """Also checks the test files' writer: diffusers' own converters give back every original weight."""
    path, folder = write_single_file(family)
    _, parts = single_file_model(family)
    model = load_base_model(str(path), base_model_config=str(folder))
    assert model.family.name == family
    for name in ("unet", "vae"):
        original = parts[name].state_dict()
        assert all(torch.equal(v, original[k]) for k, v in model.components[name].state_dict().items())
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    for slot in model.family.text_encoders:
        expected = parts[slot.encoder](ids).last_hidden_state
        assert torch.allclose(model.components[slot.encoder](ids).last_hidden_state, expected, atol=1e-6)
    # no markers, a config given: the config's scheduler and size
    assert facts(model) == {"prediction_type": "v_prediction" if family == "sd2" else "epsilon",
                            "zero_terminal_snr": False, "resolution": 64}
    assert model.facts["prediction_type"].source == "basic.base_model_config"


def test_sdxl_v_pred_and_ztsnr_markers_set_the_target_and_the_schedule(write_single_file):
    path, folder = write_single_file("sdxl", markers=("v_pred", "ztsnr"))
    model = load_base_model(str(path), base_model_config=str(folder))  # the config says epsilon: the file wins
    assert model.family.name == "sdxl"
    assert facts(model) == {"prediction_type": "v_prediction", "zero_terminal_snr": True, "resolution": 64}
    assert model.facts["prediction_type"].source == "file marker 'v_pred'"
    assert model.facts["zero_terminal_snr"].source == "file marker 'ztsnr'"
    scheduler = model.noise_scheduler  # what the loss and validation read
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert scheduler.alphas_cumprod[-1] == 0


def test_the_users_prediction_type_wins_over_a_marker(write_single_file):
    path, folder = write_single_file("sdxl", markers=("v_pred",))
    model = load_base_model(str(path), base_model_config=str(folder), prediction_type="epsilon")
    assert model.facts["prediction_type"].value == "epsilon"
    assert model.facts["prediction_type"].source == "advanced.prediction_type"
    assert model.noise_scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("layout", ["ckpt", "sgm"])
def test_an_sd2_ckpt_or_sgm_file_is_sd2(write_single_file, layout):
    """The family comes from the loaded UNet config, not from key prefixes (a .ckpt was always sd1, an sgm-layout
    SD 2.x file too)."""
    path, folder = write_single_file("sd2", suffix=".ckpt" if layout == "ckpt" else ".safetensors", sgm=layout == "sgm")
    model = load_base_model(str(path), base_model_config=str(folder))
    assert model.family.name == "sd2"


@pytest.fixture
def diffusers_default_config(monkeypatch, single_file_model, tmp_path):
    """Stand in for the config conjure ships for an SD 2.x file without basic.base_model_config
    (stabilityai/stable-diffusion-2-1's, which is v-prediction at 768 px): the tiny SD2 folder's."""
    import shutil

    import conjure.models.single_file as single_file

    folder, _ = single_file_model("sd2")
    shutil.copytree(folder, tmp_path / "configs" / "sd2")
    monkeypatch.setattr(single_file, "CONFIGS", tmp_path / "configs")


@pytest.mark.parametrize(("spread", "expected"), [(0.2, ("v_prediction", 768)), (0.01, ("epsilon", 512))])
def test_sd2_without_config_uses_comfyuis_weight_statistic(write_single_file, diffusers_default_config, spread,
                                                           expected):
    """An SD 2.x-base file must not train with the v target at 768 px (diffusers' default config for every SD2 file)."""
    probe = torch.zeros(32)
    probe[::2], probe[1::2] = spread, -spread  # population std == spread
    path, _ = write_single_file("sd2", tensors={PROBE: probe})
    model = load_base_model(str(path))
    assert (model.facts["prediction_type"].value, model.facts["resolution"].value) == expected
    assert model.facts["prediction_type"].source.startswith("heuristic")
    assert model.noise_scheduler.config.prediction_type == expected[0]


def test_sd2_marker_or_user_setting_decide_without_the_statistic(write_single_file, diffusers_default_config):
    path, _ = write_single_file("sd2", tensors={PROBE: torch.zeros(32)}, markers=("v_pred",))
    assert facts(load_base_model(str(path)))["resolution"] == 768
    path, _ = write_single_file("sd2", tensors={PROBE: torch.full((32,), 0.5)}, name="other")
    model = load_base_model(str(path), prediction_type="epsilon")
    assert (model.facts["prediction_type"].value, model.facts["resolution"].value) == ("epsilon", 512)


def test_sd2_file_that_nothing_decides_is_refused(write_single_file, diffusers_default_config, monkeypatch):
    """No marker, no config, no weight to test (read as absent here: a loadable SD 2.x file always has it)."""
    import conjure.models.single_file as single_file

    read = single_file.file_keys
    monkeypatch.setattr(single_file, "file_keys", lambda path, probe_key: (read(path, probe_key)[0], None))
    path, folder = write_single_file("sd2")
    with pytest.raises(ConjureError, match="advanced.prediction_type, or basic.base_model_config"):
        load_base_model(str(path))
    # either way out works
    assert load_base_model(str(path), prediction_type="v_prediction").facts["resolution"].value == 768
    assert load_base_model(str(path), base_model_config=str(folder)).facts["resolution"].value == 64


@pytest.mark.parametrize("marker", ["edm_mean", "edm_vpred.sigma_max"])
def test_edm_checkpoints_are_refused(write_single_file, marker):
    markers = ("edm_mean", "edm_std") if marker == "edm_mean" else (marker,)
    path, folder = write_single_file("sdxl", markers=markers)
    with pytest.raises(ConjureError, match="EDM"):
        load_base_model(str(path), base_model_config=str(folder))


def test_a_family_mismatch_is_refused(write_single_file):
    path, folder = write_single_file("sd2")
    with pytest.raises(ConjureError, match="basic.family is 'sd1' but the model looks like sd2"):
        load_base_model(str(path), base_model_config=str(folder), family="sd1")


def test_the_start_event_and_console_say_what_was_chosen_and_why(write_single_file, image_folder, tmp_path, capsys):
    path, folder = write_single_file("sdxl", markers=("v_pred", "ztsnr"))
    raw = {
        "type": "textual_inversion",
        "basic": {"base_model": str(path), "base_model_config": str(folder), "output_dir": str(tmp_path / "runs"),
                  "run_name": "run", "max_train_steps": 1, "validate_every_n_steps": None},
        "data": {"source": str(image_folder), "batch_size": 1},
        "textual_inversion": {"placeholder_token": "<zq-thing>", "initializer": "dog"},
        "validation": {"seeds": [0], "num_inference_steps": 1, "at_start": False},
    }
    result = train(parse_config(raw))
    start = read_events(result.run_dir / "events.jsonl").events[0]
    assert start["family"] == "sdxl"
    assert start["chosen"]["prediction_type"] == {"value": "v_prediction", "from": "file marker 'v_pred'"}
    assert start["chosen"]["zero_terminal_snr"] == {"value": True, "from": "file marker 'ztsnr'"}
    assert start["chosen"]["resolution"] == {"value": 64, "from": "basic.base_model_config"}
    assert start["chosen"]["mixed_precision"]["value"] == "no"
    assert start["chosen"]["vae"] == {"value": str(path), "from": "the base model"}
    err = capsys.readouterr().err
    assert ("training target: v_prediction (from file marker 'v_pred'), zero-terminal-SNR noise schedule "
            "(from file marker 'ztsnr'), 64 px (from basic.base_model_config)") in err
