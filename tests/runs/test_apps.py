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
        "ComfyUI: add a Load LoRA node (LoraLoader) and pick zq-lora.safetensors (Stable Diffusion 1.x lora, zq-lora.safetensors)",
        "ComfyUI: type embedding:zq-thing in a prompt (CLIP Text Encode) (Stable Diffusion 1.x embedding, zq-thing.safetensors)",
    ]),
    "a1111": ("embeddings", "models/Lora", [
        "AUTOMATIC1111/Forge: type <lora:zq-lora:1> in the prompt (Stable Diffusion 1.x lora, zq-lora.safetensors)",
        "AUTOMATIC1111/Forge: type zq-thing in the prompt (Stable Diffusion 1.x embedding, zq-thing.safetensors)",
    ]),
    "invokeai": ("conjure", "conjure", [
        "InvokeAI: add zq-lora in the LoRA list of the generation settings (Stable Diffusion 1.x lora, zq-lora.safetensors)",
        "InvokeAI: type <zq-thing> in the prompt (Stable Diffusion 1.x embedding, zq-thing.safetensors)",
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
    assert out.splitlines() == [f"installed {lora}", f"installed {embedding}",
                                *(line.replace("{app}", str(folder)) for line in usage)]
    assert step_of(lora) == step_of(embedding) == 2.0
    assert not [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


def test_no_overwrite_without_force(app_files_run, tmp_path, run_cli, assert_one_line_error):
    folder = fake_app(tmp_path, "comfyui")
    assert run_cli("export", app_files_run, "--step", "2", "--to-app", "comfyui", "--app-dir", folder)[0] == 0
    code, out, err = run_cli("export", app_files_run, "--step", "4", "--to-app", "comfyui", "--app-dir", folder)
    assert_one_line_error(code, err, "zq-lora.safetensors exists", "--force")
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


def test_a_file_that_is_neither_lora_nor_embedding_is_refused(tmp_path):
    import torch

    path = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(Exception, match="neither a LoRA nor an embedding"):
        file_kind(path)


def test_export_help_names_the_app_options(run_cli, capsys):
    with pytest.raises(SystemExit):
        run_cli("export", "--help")
    out = capsys.readouterr().out
    assert "--to-app {invokeai,comfyui,a1111}" in out and "--app-dir DIR" in out and "--invokeai-url URL" in out
