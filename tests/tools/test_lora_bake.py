"""`conjure lora bake`: a baked model computes what the base computes with the LoRA applied at run time (diffusers'
load_lora_weights for kohya LoRA and PEFT DoRA files, conjure's applier for kohya DoRA, which diffusers drops), on
tiny SD1 and SDXL models with the real block layout; files are applied in turn at their weights; refusals."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from conjure.adapters import LoraModule
from conjure.export.convert import apply_lora
from conjure.export.kohya import save_kohya
from conjure.export.peft import save_peft
from conjure.models.loading import load_base_model
from conjure.tools.bake import bake
from conjure.tools.lora_inputs import LoraInput

ENCODERS = ("text_encoder", "text_encoder_2")


def lora_for(components, *, seed, dora=None, every=3):
    """Every `every`-th Linear/Conv2d of the UNet and text encoders (attention, convs, text MLPs...), UNet ranks 2-4,
    text-encoder ranks 3 (diffusers 0.42 gives SDXL's text_projection the most common text-encoder rank)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for component in ("unet",) + ENCODERS:
        if component not in components:
            continue
        layers = [(p, m) for p, m in components[component].named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        for i, (path, module) in enumerate(layers[seed % every::every]):
            w, rank = module.weight, 2 + i % 3 if component == "unet" else 3
            kernel = (1, 1) if w.dim() == 4 else ()
            m = LoraModule(down=0.1 * torch.randn(rank, *w.shape[1:], generator=g),
                           up=0.1 * torch.randn(w.shape[0], rank, *kernel, generator=g), alpha=3.0)
            if dora == "scale":
                m.dora_scale = (torch.rand(w.shape[1], generator=g) + 0.5).reshape(1, w.shape[1], *kernel)
            elif dora == "magnitude":
                m.magnitude = torch.rand(w.shape[0], generator=g) + 0.5
            weights[(component, path)] = m
    return weights


def assert_same(got, expected, base):
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=2e-5 * max(value.abs().max().item(), 1.0), rtol=1e-5,
                                   msg=key)
        assert (value - base[key]).abs().max() > 1e-3, f"the LoRA must change {key}"


def fresh(folder):
    return load_base_model(str(folder)).components


@pytest.mark.parametrize("family,kind", [("sd1", "lora"), ("sd1", "peft-dora"), ("sdxl", "lora"),
                                         ("sdxl", "peft-dora")])
def test_baked_model_equals_the_lora_loaded_at_run_time_in_diffusers(tiny_models, outputs, tmp_path, family, kind):
    folder = tiny_models(family, real_layout=True)
    pipe = (StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline).from_pretrained(str(folder))
    base_out = outputs(pipe.components, family)
    weights = lora_for(pipe.components, seed=0, dora="magnitude" if kind == "peft-dora" else None)
    lora = tmp_path / "lora.safetensors"
    if kind == "peft-dora":
        save_peft(lora, weights, {}, family)
    else:
        save_kohya(lora, weights, {}, family, pipe.unet.config)
    pipe.load_lora_weights(str(lora))

    done = bake(str(folder), [LoraInput(lora)], tmp_path / "baked", "fp32")
    assert done.modules == {str(lora): len(weights)}
    assert_same(outputs(fresh(tmp_path / "baked"), family), outputs(pipe.components, family), base_out)


def test_files_apply_in_turn_at_their_weights_and_keep_the_models_sampler(tiny_models, outputs, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_models("sd1", real_layout=True), folder)
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        (folder / name).write_text((folder / name).read_text().replace("DDPMScheduler", "EulerDiscreteScheduler"))
    components = fresh(folder)
    base_out = outputs(components, "sd1")
    first, second = lora_for(components, seed=0), lora_for(components, seed=1, dora="scale", every=2)
    save_kohya(tmp_path / "a.safetensors", first, {}, "sd1")
    save_kohya(tmp_path / "b.safetensors", second, {}, "sd1")
    bake(str(folder), [LoraInput(tmp_path / "a.safetensors", 0.7), LoraInput(tmp_path / "b.safetensors", -0.5)],
         tmp_path / "baked", "fp32")
    apply_lora(components, first, 0.7)
    apply_lora(components, second, -0.5)
    assert_same(outputs(fresh(tmp_path / "baked"), "sd1"), outputs(components, "sd1"), base_out)
    index = json.loads((tmp_path / "baked" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]  # training loads DDPM; the file keeps its own


def test_single_file_checkpoint_loads_in_diffusers_with_the_lora_baked_in(tiny_models, outputs, tmp_path):
    folder = tiny_models("sd1", real_layout=True)
    components = fresh(folder)
    base_out = outputs(components, "sd1")
    weights = lora_for(components, seed=2, dora="scale")
    save_kohya(tmp_path / "a.safetensors", weights, {}, "sd1")
    bake(str(folder), [LoraInput(tmp_path / "a.safetensors", 0.8)], tmp_path / "baked.safetensors", "fp32")
    pipe = StableDiffusionPipeline.from_single_file(str(tmp_path / "baked.safetensors"), config=str(folder),
                                                    safety_checker=None)
    apply_lora(components, weights, 0.8)
    assert_same(outputs(pipe.components, "sd1"), outputs(components, "sd1"), base_out)
    with safe_open(str(tmp_path / "baked.safetensors"), "pt") as f:
        assert f.metadata()["conjure.baked_loras"] == "a.safetensors:0.8"


def test_refusals_name_the_file_and_the_modules(tiny_models, tmp_path, run_cli, assert_one_line_error):
    sd1 = tiny_models("sd1", real_layout=True)
    components = fresh(sd1)
    weights = lora_for(components, seed=0)
    save_kohya(tmp_path / "sd1.safetensors", weights, {}, "sd1")
    code, _, err = run_cli("lora", "bake", tiny_models("sdxl", real_layout=True), tmp_path / "sd1.safetensors",
                           "--to", tmp_path / "out")
    assert_one_line_error(code, err, "sd1.safetensors is a LoRA for sd1, but the base model is sdxl")
    # the tiny default layout has one layer per block: the real layout's second layers are not in it
    code, _, err = run_cli("lora", "bake", tiny_models("sd1"), tmp_path / "sd1.safetensors", "--to", tmp_path / "out")
    message = assert_one_line_error(code, err, "modules are not in the base model: unet.", "more")
    assert "attentions.1" in message or "resnets.1" in message
    assert not (tmp_path / "out").exists()
