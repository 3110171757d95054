"""`conjure merge` end to end on tiny models: a diffusers folder and a single file that load back and hold the
formula's values; mixed families and misfit options refused in one line."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from conjure.cli import main
from conjure.errors import ConjureError
from conjure.merging import formulas
from conjure.merging.merge import MergeRecipe, merge_models
from conjure.models.tiny import write_tiny_model

KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return [write_tiny_model("sd1", root / f"m{seed}", seed=seed) for seed in range(3)]


def unet_tensor(folder, key=KEY):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))[key]


def test_lerp_into_a_folder_that_loads(models, tmp_path, capsys):
    a, b, _ = models
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "--method", "lerp", "--weights", "3", "1", "--save-dtype", "fp32",
                 "--to", str(out)]) == 0
    assert "lerp; weights 0.75, 0.25" in capsys.readouterr().out
    torch.testing.assert_close(unet_tensor(out), 0.75 * unet_tensor(a) + 0.25 * unet_tensor(b))
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    text = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert all(k.startswith("text_model.") for k in text)
    assert pipe.unet.dtype == torch.float32


def test_ties_single_file_equals_the_folder_merge(models, tmp_path):
    a, b, base = models
    recipe = MergeRecipe("ties", density=0.5)
    folder = merge_models([str(a), str(b)], tmp_path / "f", recipe, base=str(base), save_dtype="fp32")
    single = merge_models([str(a), str(b)], tmp_path / "s.safetensors", recipe, base=str(base), save_dtype="fp32")
    assert folder.tensors == single.tensors
    loaded = UNet2DConditionModel.from_single_file(str(single.path), config=str(a), subfolder="unet")
    expected = UNet2DConditionModel.from_pretrained(str(folder.path), subfolder="unet")
    for (name, mine), theirs in zip(expected.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name
    merged, ta, tb, tc = (unet_tensor(p) for p in (folder.path, a, b, base))
    assert torch.equal(merged, formulas.ties(tc, [ta, tb], [1.0, 1.0], density=0.5))
    with safe_open(str(single.path), "pt") as f:
        meta = f.metadata()  # the models by name, not by folder (issue 24), and the file's own hash
    assert json.loads(meta["conjure.merge"])["models"] == [a.name, b.name] and meta["modelspec.hash_sha256"][:2] == "0x"
    assert not any(str(a.parent) in v or str(tmp_path) in v for v in meta.values())


def test_refusals(models, tiny_models, tmp_path):
    a, b, base = (str(m) for m in models)
    with pytest.raises(ConjureError, match="different families: .* is Stable Diffusion 1.x, .* is Stable Diffusion XL"):
        merge_models([a, str(tiny_models("sdxl"))], tmp_path / "x", MergeRecipe("lerp"))
    with pytest.raises(ConjureError, match="their unets differ"):  # 1 vs 2 layers per block
        merge_models([a, str(tiny_models("sd1", real_layout=True))], tmp_path / "x", MergeRecipe("lerp"))
    with pytest.raises(ConjureError, match="slerp merges exactly 2 models"):
        merge_models([a, b, base], tmp_path / "x", MergeRecipe("slerp"))
    with pytest.raises(ConjureError, match="ties needs base"):
        merge_models([a, b], tmp_path / "x", MergeRecipe("ties"))
    with pytest.raises(ConjureError, match="one of the models"):
        merge_models([a, b], models[0], MergeRecipe("lerp"), force=True)
    with pytest.raises(ConjureError, match="takes 1 weights"):
        merge_models([a, b], tmp_path / "x", MergeRecipe("add-difference", weights=(1, 1)), base=base)
    v_model = tmp_path / "v"
    shutil.copytree(models[1], v_model)
    scheduler = v_model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"epsilon"', '"v_prediction"'))
    with pytest.raises(ConjureError, match="predicts epsilon, .* v_prediction"):
        merge_models([a, str(v_model)], tmp_path / "x", MergeRecipe("lerp"))
    broken = tmp_path / "broken"
    shutil.copytree(models[1], broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConjureError, match="cannot read .*diffusion_pytorch_model.safetensors"):
        merge_models([a, str(broken)], tmp_path / "x", MergeRecipe("lerp"))
    assert not (tmp_path / "x").exists()


def test_a_folder_with_only_fp16_variant_files(models, tmp_path):
    """Fetched with variant="fp16", a folder holds `*.fp16.safetensors` only; the merge writes the plain names."""
    variant = tmp_path / "variant"
    shutil.copytree(models[1], variant)
    for weights in variant.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    done = merge_models([str(variant), str(models[0])], tmp_path / "out", MergeRecipe("lerp"))
    assert sorted(p.name for p in (done.path / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    torch.testing.assert_close(unet_tensor(done.path).float(), (0.5 * unet_tensor(models[1]) + 0.5 * unet_tensor(
        models[0])).half().float())
