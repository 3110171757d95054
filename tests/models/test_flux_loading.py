"""Loading FLUX.1: a diffusers folder, a hub id, a single-file transformer with basic.base_model_config;
dev vs schnell from the model's own configs (or the file's keys); the facts; refusals naming the field."""

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from conjure.config.sections import AdvancedConfig
from conjure.errors import ConjureError
from conjure.models.loading import Fact, load_base_model
from conjure.models.tiny import write_tiny_model
from conjure.train.setup import describe

SD_ONLY = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    """variant -> a tiny FLUX.1 diffusers folder (~0.3 s each)."""
    root = tmp_path_factory.mktemp("tiny-flux")
    return {v: write_tiny_model("flux", root / v, variant=v) for v in ("dev", "schnell")}


def _transformer_file(folder, path, *, prefix=""):
    """The folder's transformer as one .safetensors file with diffusers' key names (`prefix` before each)."""
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    save_file({prefix + k: v.contiguous() for k, v in transformer.state_dict().items()}, str(path))
    return transformer


def test_diffusers_folder_loads_every_part_in_float32(flux_dirs):
    model = load_base_model(str(flux_dirs["dev"]))
    assert model.family.name == "flux"
    expected = {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL,
                "scheduler": FlowMatchEulerDiscreteScheduler, "text_encoder": CLIPTextModel,
                "tokenizer": CLIPTokenizer, "text_encoder_2": T5EncoderModel, "tokenizer_2": T5TokenizerFast}
    assert {name: type(part) for name, part in model.components.items()} == expected
    assert model.denoiser is model.components["transformer"]
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in model.components[name].parameters()} == {torch.float32}, name
    # the flow scheduler as the model ships it (the DDPM path would have replaced it)
    assert model.noise_scheduler.config.use_dynamic_shifting
    assert model.facts == {
        "variant": Fact("dev", "the transformer config (guidance_embeds)"),
        "prediction_type": Fact("flow_matching", "the family (FLUX.1)"),
        "resolution": Fact(64, "the model's VAE config (sample_size)"),  # the tiny VAE's; FLUX.1's says 1024
        "vae": Fact(str(flux_dirs["dev"]), "the base model"),
    }


def _dtypes(model):
    return {name: {p.dtype for p in model.components[name].parameters()}
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}


def test_big_parts_load_in_the_runs_frozen_dtype(flux_dirs, tmp_path):
    """place_model would cast them to it anyway: loading in it halves the RAM FLUX.1-dev takes (68 -> 34 GB)."""
    expected = {"transformer": {torch.bfloat16}, "vae": {torch.float32}, "text_encoder": {torch.bfloat16},
                "text_encoder_2": {torch.bfloat16}}
    assert _dtypes(load_base_model(str(flux_dirs["dev"]), frozen_dtype=torch.bfloat16)) == expected
    path = tmp_path / "t.safetensors"
    _transformer_file(flux_dirs["dev"], path)
    model = load_base_model(str(path), base_model_config=str(flux_dirs["dev"]), frozen_dtype=torch.bfloat16)
    assert _dtypes(model) == expected


def test_schnell_is_told_from_the_transformer_config(flux_dirs):
    model = load_base_model(str(flux_dirs["schnell"]), family="flux")
    assert model.facts["variant"] == Fact("schnell", "the transformer config (guidance_embeds)")
    assert not model.denoiser.config.guidance_embeds


def test_start_line_says_flow_matching(flux_dirs):
    model = load_base_model(str(flux_dirs["dev"]))
    line = describe({**model.facts, "mixed_precision": Fact("no", "no CUDA GPU")})
    assert line.startswith("training objective: flow matching (from the family (FLUX.1)), variant dev (from the "
                           "transformer config (guidance_embeds)), 64 px")


def test_family_and_method_are_checked_before_weights_load(flux_dirs, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained", no_weights)
    with pytest.raises(ConjureError, match=r"basic.family is 'sdxl' but the model looks like flux \(FLUX.1\)"):
        load_base_model(str(flux_dirs["dev"]), family="sdxl")
    with pytest.raises(ConjureError, match=r"^textual_inversion trains sd1 and sd2 and sdxl models, but the base "
                                           r"model is flux \(FLUX.1\)$"):
        load_base_model(str(flux_dirs["dev"]), allowed_families=SD_ONLY, method="textual_inversion")
    with pytest.raises(ConjureError, match=r"^advanced.min_snr_gamma: is for SD 1.x, 2.x and SDXL \(the DDPM "
                                           r"objective\), and FLUX.1 trains with flow matching; set it to null$"):
        load_base_model(str(flux_dirs["dev"]), advanced=AdvancedConfig(min_snr_gamma=5.0))


@pytest.mark.parametrize("setting", [{"prediction_type": "epsilon"}, {"noise_offset": 0.1}, {"clip_skip": 2}])
def test_ddpm_settings_are_refused_on_flux(flux_dirs, setting):
    (name, _), = setting.items()
    with pytest.raises(ConjureError, match=rf"^advanced.{name}: (is for SD 1.x|FLUX.1 reads fixed text-encoder)"):
        load_base_model(str(flux_dirs["dev"]), advanced=AdvancedConfig(**setting))


@pytest.mark.parametrize("setting", [{"timestep_sampling": "shift"}, {"guidance": 3.5}, {"loss_weighting": "cosmap"},
                                     {"base_weights_dtype": "nf4"}])
def test_flow_settings_are_refused_on_an_sd_model(tiny_models, setting):
    (name, _), = setting.items()
    with pytest.raises(ConjureError, match=rf"^advanced.{name}: is for FLUX.1 \(flow matching\), and Stable "
                                           r"Diffusion 1.x trains with the DDPM objective; set it to"):
        load_base_model(str(tiny_models("sd1")), advanced=AdvancedConfig(**setting))


def test_guidance_is_refused_on_schnell_only(flux_dirs):
    with pytest.raises(ConjureError, match=r"^advanced.guidance: FLUX.1-schnell has no guidance input; set it to 1.0$"):
        load_base_model(str(flux_dirs["schnell"]), advanced=AdvancedConfig(guidance=3.5))
    assert load_base_model(str(flux_dirs["dev"]), advanced=AdvancedConfig(guidance=3.5)).facts["variant"].value == "dev"


def test_a_folder_that_is_neither_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ConjureError, match="not a diffusers model \\(no model_index.json with unet/ or transformer/\\)"):
        load_base_model(str(tmp_path))


def test_another_transformer_pipeline_is_refused(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline", "transformer": '
                                               '["diffusers", "SD3Transformer2DModel"]}')
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    with pytest.raises(ConjureError, match=r"is a StableDiffusion3Pipeline model; conjure trains .*FLUX.1 "
                                           r"\(FluxPipeline\)"):
        load_base_model(str(tmp_path))


def test_hub_id_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConjureError) as info:
        load_base_model("black-forest-labs/FLUX.1-dev")
    assert str(info.value) == ("cannot load base model 'black-forest-labs/FLUX.1-dev': not in the local cache, and "
                               "the Hub could not be reached (offline, or no network?)")


def test_single_file_transformer_with_base_model_config(flux_dirs, tmp_path):
    path = tmp_path / "flux1-dev-finetune.safetensors"
    transformer = _transformer_file(flux_dirs["dev"], path)
    model = load_base_model(str(path), base_model_config=str(flux_dirs["dev"]))
    assert model.family.name == "flux" and model.source == str(path)
    loaded, written = model.denoiser.state_dict(), transformer.state_dict()
    assert loaded.keys() == written.keys() and all(torch.equal(loaded[k], written[k]) for k in written)
    assert model.denoiser.dtype == torch.float32
    assert isinstance(model.components["text_encoder_2"], T5EncoderModel)
    assert model.facts["variant"] == Fact("dev", "file key 'time_text_embed.guidance_embedder.linear_1.bias'")
    assert model.facts["prediction_type"].value == "flow_matching"


def test_single_file_transformer_needs_base_model_config(flux_dirs, tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    _transformer_file(flux_dirs["dev"], path)
    with pytest.raises(ConjureError, match=r"^flux1-dev.safetensors is a FLUX.1 transformer file, which holds the "
                                           r"transformer alone; set basic.base_model_config to"):
        load_base_model(str(path))


def test_single_file_variant_must_match_the_config(flux_dirs, tmp_path):
    path = tmp_path / "schnell.safetensors"
    _transformer_file(flux_dirs["schnell"], path)
    with pytest.raises(ConjureError, match=r"schnell.safetensors is a FLUX.1-schnell transformer \(no guidance "
                                           r"input\), but basic.base_model_config .* is a FLUX.1-dev model"):
        load_base_model(str(path), base_model_config=str(flux_dirs["dev"]))
    model = load_base_model(str(path), base_model_config=str(flux_dirs["schnell"]))
    assert model.facts["variant"] == Fact("schnell", "no guidance embedder in the file")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_named_files_are_told_apart_by_their_keys(flux_dirs, tmp_path, prefix):
    """BFL's names (flux1-dev.safetensors), bare or under ComfyUI's prefix: a guidance_in embedder is dev. (Only
    the keys: diffusers' converter assumes FLUX.1's full widths, so a tiny BFL file cannot be converted.)"""
    path = tmp_path / "bfl.safetensors"
    save_file({f"{prefix}double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(16),
               f"{prefix}guidance_in.in_layer.bias": torch.zeros(32)}, str(path))
    with pytest.raises(ConjureError, match=r"is a FLUX.1-dev transformer \(a guidance input\), but "
                                           r"basic.base_model_config .* is a FLUX.1-schnell model"):
        load_base_model(str(path), base_model_config=str(flux_dirs["schnell"]))
    with pytest.raises(ConjureError, match="set basic.base_model_config"):
        load_base_model(str(path))


def test_single_file_family_checks_come_first(flux_dirs, tmp_path):
    path = tmp_path / "t.safetensors"
    _transformer_file(flux_dirs["dev"], path)
    with pytest.raises(ConjureError, match="^pivotal trains sd1 and sd2 and sdxl models, but the base model is flux"):
        load_base_model(str(path), base_model_config=str(flux_dirs["dev"]), allowed_families=SD_ONLY,
                        method="pivotal")


@pytest.mark.parametrize("advanced, needle", [
    ({"noise_offset": 0.05}, "advanced.noise_offset: is for SD 1.x, 2.x and SDXL"),
    ({"base_weights_dtype": "nf4"}, "advanced.base_weights_dtype: nf4 stores the frozen transformer"),
])
def test_train_refuses_in_one_line(flux_dirs, lora_config, tmp_path, run_cli, assert_one_line_error, advanced, needle):
    """basic.family auto: the FLUX.1-only refusals come once the model's configs are read (or, for the machine,
    before), through the CLI as one line."""
    import yaml

    raw = lora_config(basic={"base_model": str(flux_dirs["dev"])}, advanced=advanced)
    path = tmp_path / "flux.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(*run_cli("train", path)[::2], needle)


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_a_run_loads_in_its_frozen_dtype(monkeypatch, lora_config, precision, dtype):
    """On this CPU `auto` is full precision; a bf16 run loads its big parts in bf16."""
    import conjure.models.loading
    from conjure.config import parse_config
    from conjure.methods import method_spec
    from conjure.train.setup import load_model

    seen = {}
    monkeypatch.setattr(conjure.models.loading, "load_base_model", lambda *a, **k: seen.update(k))
    config = parse_config(lora_config(advanced={"mixed_precision": precision}))
    load_model(config, method_spec(config.type))
    assert seen["frozen_dtype"] == dtype


def test_basic_vae_takes_a_bfl_ae_file(flux_dirs, tmp_path, ldm):
    """FLUX.1's VAE ships as BFL's ae.safetensors (LDM names without a prefix); it takes the base VAE's config,
    shift factor included."""
    from conjure.models.tiny import build_tiny_components

    other = build_tiny_components("flux", seed=5)["vae"]
    path = tmp_path / "ae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in ldm.vae(other).items()}, str(path))
    model = load_base_model(str(flux_dirs["dev"]), vae=str(path))
    assert model.facts["vae"] == Fact(str(path), "basic.vae")
    loaded, written = model.vae.state_dict(), other.state_dict()
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    assert (model.vae.config.shift_factor, model.vae.config.use_quant_conv) == (0.1159, False)


def test_a_lean_loaded_flux_run_trains_the_same_losses(flux_dirs, lora_config, tmp_path, monkeypatch):
    """A bf16 FLUX.1 run from a transformer file, loaded lean (the transformer built on meta and read after, tensor
    by tensor in bf16) and loaded as before (every part read at load in float32, then cast by place_model): the
    same losses, bit for bit."""
    import conjure.models.loading as loading
    from conjure.config import parse_config
    from conjure.runs.events import read_events
    from conjure.train.loop import train

    path = tmp_path / "flux1-dev.safetensors"
    _transformer_file(flux_dirs["dev"], path)

    def losses(name):
        raw = lora_config("flux", basic={"base_model": str(path), "base_model_config": str(flux_dirs["dev"]),
                                         "run_name": name, "max_train_steps": 3, "save_every_n_steps": 3,
                                         "validate_every_n_steps": None},
                          validation={"at_start": False}, advanced={"mixed_precision": "bf16"})
        raw["validation"].pop("guidance_scale", None)
        run_dir = train(parse_config(raw)).run_dir
        return [e["loss"] for e in read_events(run_dir / "events.jsonl").events if e["event"] == "step"]

    lean = losses("lean")
    load = loading.load_base_model
    monkeypatch.setattr(loading, "load_base_model",
                        lambda *a, **kw: load(*a, **{**kw, "frozen_dtype": None, "defer_denoiser": False}))
    assert len(lean) == 3 and lean == losses("before")
