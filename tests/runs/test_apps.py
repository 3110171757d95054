"""`conjure export --to-app`: each app's folder layout from a fake app folder, what to type in the app, no overwrite
without --force, and the refusal of a folder that is not the app's (conjure.runs.apps)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conjure.runs.apps import APPS, file_kind

# What marks each app's folder, as a fresh install has it
APP_LAYOUTS = {
    "comfyui": ("main.py", "comfy/sd1_clip.py", "models/checkpoints/put_checkpoints_here"),
    "a1111": ("webui.py", "models/Stable-diffusion/Put Stable Diffusion checkpoints here.txt"),
    "invokeai": ("invokeai.yaml", "models/README.txt"),
}
# app -> (embedding's folder, LoRA's folder, the lines printed after the "installed" ones)
EXPECTED = {
    "comfyui": ("models/embeddings", "models/loras", [
        "in ComfyUI: add a Load LoRA node (LoraLoader) and pick zq-lora.safetensors",
        "in ComfyUI: type embedding:zq-thing in a prompt (CLIP Text Encode)",
    ]),
    "a1111": ("embeddings", "models/Lora", [
        "in AUTOMATIC1111/Forge: type <lora:zq-lora:1> in the prompt",
        "in AUTOMATIC1111/Forge: type zq-thing in the prompt",
    ]),
    "invokeai": ("conjure", "conjure", [
        "in InvokeAI: pick zq-lora under Concepts (Add LoRA) in the Generation settings",
        "in InvokeAI: type <zq-thing> in the prompt",
        "InvokeAI watches no folder: in its Model Manager, Add Models > Scan Folder, scan {app}/conjure and press "
        "Install All (`conjure export --invokeai-url` installs without this step)",
    ]),
}


def fake_app(root: Path, app: str) -> Path:
    folder = root / app
    for name in APP_LAYOUTS[app]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    return folder


def step_of(path: Path) -> float:
    """The step a file of the `app_files_run` fixture was written at (its first tensor holds it)."""
    [held] = [t for k, t in load_file(path).items() if k == "emb_params" or k.endswith("lora_down.weight")]
    return held.flatten()[0].item()


@pytest.mark.parametrize("app", list(APP_LAYOUTS))
def test_each_file_goes_where_the_app_reads_its_kind(app, app_files_run, tmp_path, run_cli):
    folder = fake_app(tmp_path, app)
    code, out, err = run_cli("export", app_files_run, "--step", "2", "--to-app", app, "--app-dir", folder)
    assert code == 0, err
    embeddings, loras, usage = EXPECTED[app]
    lora, embedding = folder / loras / "zq-lora.safetensors", folder / embeddings / "zq-thing.safetensors"
    assert out.splitlines() == [f"installed {lora} (Stable Diffusion 1.x LoRA)",
                                f"installed {embedding} (Stable Diffusion 1.x embedding)",
                                *(line.replace("{app}", str(folder)) for line in usage)]
    assert step_of(lora) == step_of(embedding) == 2.0
    assert not [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("app", ["a1111", "comfyui", "invokeai"])
def test_a_bundle_goes_only_to_an_app_that_reads_it(app, bundle_run, tmp_path, run_cli):
    folder = fake_app(tmp_path, app)
    code, out, err = run_cli("export", bundle_run, "--step", "2", "--to-app", app, "--app-dir", folder)
    assert code == 0, err
    bundles = list(folder.rglob("*.bundle.safetensors"))
    if app == "a1111":
        assert bundles == [folder / "models/Lora/zq-lora.bundle.safetensors"]
        assert (f"installed {bundles[0]} (Stable Diffusion 1.x LoRA + embedding)" in out.splitlines())
        assert ("in AUTOMATIC1111/Forge: type <lora:zq-lora.bundle:1> in the prompt (AUTOMATIC1111 loads the "
                "embedding bundled in it too; Forge does not: there, type the embedding file's name)") in out
    else:
        assert bundles == []
        assert (f"left out zq-lora.bundle.safetensors: {APPS[app].title} does not read an embedding bundled in a "
                "LoRA (the LoRA and embedding files hold the same)") in out.splitlines()
    assert len(list(folder.rglob("zq-*.safetensors"))) == (3 if app == "a1111" else 2)


def test_no_overwrite_without_force(app_files_run, tmp_path, run_cli, assert_one_line_error):
    folder = fake_app(tmp_path, "comfyui")
    assert run_cli("export", app_files_run, "--step", "2", "--to-app", "comfyui", "--app-dir", folder)[0] == 0
    code, out, err = run_cli("export", app_files_run, "--step", "4", "--to-app", "comfyui", "--app-dir", folder)
    message = assert_one_line_error(code, err, "zq-lora.safetensors exists; overwrite it (--force)")
    assert "--name" not in message  # which renames a one-file checkpoint only
    assert step_of(folder / "models/loras/zq-lora.safetensors") == 2.0
    assert step_of(folder / "models/embeddings/zq-thing.safetensors") == 2.0  # neither file was replaced
    code, out, err = run_cli("export", app_files_run, "--step", "latest", "--to-app", "comfyui", "--app-dir", folder,
                             "--force")
    assert code == 0, err
    assert step_of(folder / "models/loras/zq-lora.safetensors") == step_of(
        folder / "models/embeddings/zq-thing.safetensors") == 4.0


@pytest.mark.parametrize("app, given", [("comfyui", "empty"), ("a1111", "comfyui"), ("invokeai", "a1111"),
                                        ("comfyui", "a1111"), ("a1111", "empty"), ("invokeai", "empty")])
def test_a_folder_that_is_not_the_app_is_refused(app, given, app_files_run, tmp_path, run_cli, assert_one_line_error):
    folder = tmp_path / "empty" if given == "empty" else fake_app(tmp_path, given)
    folder.mkdir(exist_ok=True)
    before = sorted(folder.rglob("*"))
    code, _, err = run_cli("export", app_files_run, "--step", "2", "--to-app", app, "--app-dir", folder)
    assert_one_line_error(code, err, f"{folder} does not look like a {APPS[app].title} folder", "--to DIR")
    assert sorted(folder.rglob("*")) == before


@pytest.mark.parametrize("args, needle", [
    (["--to-app", "comfyui"], "--to-app comfyui needs --app-dir DIR"),
    (["--to", "{tmp}/out", "--app-dir", "{tmp}"], "--app-dir goes with --to-app"),
    (["--to-app", "comfyui", "--app-dir", "{tmp}/nosuch"], "nosuch: no such folder"),
])
def test_app_options_that_do_not_go_together(args, needle, app_files_run, tmp_path, run_cli, assert_one_line_error):
    code, _, err = run_cli("export", app_files_run, "--step", "2", *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert_one_line_error(code, err, needle)


def test_what_a_file_is(tmp_path):
    import torch

    key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    dora = {f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(768, 4),
            f"{key}.dora_scale": torch.ones(1, 768)}
    cases = {
        "sdxl-embedding": ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
                           {"modelspec.architecture": "stable-diffusion-xl-v1-base/textual-inversion"}),
        "dora": (dora, {"ss_base_model_version": "sdxl_base_v1-0"}),
        "bundle": ({**dora, "bundle_emb.zq.clip_l": torch.zeros(1, 768)}, {"ss_base_model_version": "sdxl_base_v1-0"}),
        "vae": ({"decoder.conv_in.weight": torch.zeros(2, 2)}, {}),
    }
    for name, (tensors, metadata) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors", metadata)
    assert file_kind(tmp_path / "sdxl-embedding.safetensors") == ("embedding", "Stable Diffusion XL embedding")
    assert file_kind(tmp_path / "dora.safetensors") == ("lora", "Stable Diffusion XL DoRA")
    assert file_kind(tmp_path / "bundle.safetensors") == ("bundle", "Stable Diffusion XL DoRA + embedding")
    with pytest.raises(Exception, match="holds no LoRA/LyCORIS modules and no embedding"):
        file_kind(tmp_path / "vae.safetensors")


def test_export_help_names_the_app_options(run_cli, capsys):
    with pytest.raises(SystemExit):
        run_cli("export", "--help")
    out = capsys.readouterr().out
    assert "--to-app {invokeai,comfyui,a1111}" in out and "--app-dir DIR" in out and "--invokeai-url URL" in out
