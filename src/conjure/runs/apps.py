"""Install a checkpoint's files into an app's own folders (`conjure export --to-app`, the web app's "Use this
step"): each file goes where the app looks for its kind, and the user is told what to type in the app.

What each app reads, and from where (read from each app's source, late 2026):
- ComfyUI (comfyanonymous/ComfyUI folder_paths.py at 00db33f6: `models/loras`, `models/embeddings`): an embedding
  is typed `embedding:NAME` in a prompt (comfy/sd1_clip.py at b55c2247, SDTokenizer.embedding_identifier); a LoRA
  is applied by a LoraLoader ("Load LoRA") node, by file name (nodes.py LoraLoader.lora_name).
- AUTOMATIC1111 v1.10 and Forge (lllyasviel/stable-diffusion-webui-forge at dfdcbab6): LoRAs in `models/Lora`
  (extensions-builtin/Lora/preload.py, Forge's sd_forge_lora/preload.py: `--lora-dir`), embeddings in `embeddings`
  (modules/cmd_args.py `--embeddings-dir`); a LoRA is typed `<lora:NAME:1>` with NAME the file's stem
  (ui_extra_networks_lora.py, networks.py process_network_files), an embedding by its file's stem
  (modules/textual_inversion/textual_inversion.py load_from_file). A1111 also reads an embedding bundled in a LoRA
  (`bundle_emb.*`, extensions-builtin/Lora/networks.py load_network); Forge at dfdcbab6 does not (sd_forge_lora
  keeps an empty `bundle_embeddings` and never fills it). ComfyUI's LoRA loader and InvokeAI skip those keys, so
  a bundle file is left out there: the checkpoint's LoRA and embedding files hold the same.
- InvokeAI 6.13.8 (invoke-ai/InvokeAI tag v6.13.8, eb721633): no folder is watched. The `autoimport` folder was
  removed in 4.0 (commit 73c32668, "feat(mm): remove autoimport"; docs/.../troubleshooting/faq.mdx calls it "now
  unused"), and `models/` is managed by InvokeAI ("Do not add, delete or move files in this directory",
  model_install_default.py _write_invoke_managed_models_dir_readme). So conjure copies into a folder of its own
  under InvokeAI's root, which the Model Manager's "Scan Folder" installs (GET /api/v2/models/scan_folder), or
  installs through the HTTP API (runs/invokeai.py). A model is named after its file's stem (backend/model_manager/
  model_on_disk.py); an embedding is typed `<NAME>` in a prompt (app/util/ti_utils.py
  extract_ti_triggers_from_prompt), a LoRA is picked in the Generation settings' "Concepts" (frontend/web/src/
  features/lora/components/LoRASelect.tsx, placeholder "Add LoRA").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from conjure import families
from conjure.errors import ConjureError

LORA = "lora"
EMBEDDING = "embedding"
BUNDLE = "bundle"  # a LoRA with its embedding inside (pivotal tuning's `bundle: true`), which AUTOMATIC1111 reads
MODEL = "main"  # a whole model (the fine-tune's single file); InvokeAI's ModelType for it is "main"


@dataclass(frozen=True)
class App:
    name: str  # the --to-app value
    title: str
    # Paths under the app's folder, any one of which marks an install of the app (refusing other folders keeps
    # a typo from scattering files)
    markers: tuple[str, ...]
    folders: dict[str, str] = field(hash=False)  # file kind -> folder under the app's, where the app reads it
    # file kind -> how to use it in the app: {name} is the file's stem, {file} its name
    usage: dict[str, str] = field(hash=False)
    then: str = ""  # a step the app needs before it sees the files ({folder}: where they were copied)


# Why a file of a kind the app has no folder for is left out
LEFT_OUT = {BUNDLE: "{app} does not read an embedding bundled in a LoRA (the LoRA and embedding files hold the same)"}


COMFYUI = App(
    "comfyui", "ComfyUI", ("comfy", "models/checkpoints"),
    folders={LORA: "models/loras", EMBEDDING: "models/embeddings", MODEL: "models/checkpoints"},
    usage={EMBEDDING: "type embedding:{name} in a prompt (CLIP Text Encode)",
           LORA: "add a Load LoRA node (LoraLoader) and pick {file}", MODEL: "pick {file} in a Load Checkpoint node"},
)
A1111 = App(
    "a1111", "AUTOMATIC1111/Forge", ("webui.py", "models/Stable-diffusion"),
    folders={LORA: "models/Lora", EMBEDDING: "embeddings", BUNDLE: "models/Lora", MODEL: "models/Stable-diffusion"},
    usage={EMBEDDING: "type {name} in the prompt", LORA: "type <lora:{name}:1> in the prompt",
           MODEL: "pick {name} in the Stable Diffusion checkpoint list (refresh it)",
           BUNDLE: "type <lora:{name}:1> in the prompt (AUTOMATIC1111 loads the embedding bundled in it too; "
           "Forge does not: there, type the embedding file's name)"},
)
INVOKEAI = App(
    "invokeai", "InvokeAI", ("invokeai.yaml",),
    folders={LORA: "conjure", EMBEDDING: "conjure", MODEL: "conjure"},
    usage={EMBEDDING: "type <{name}> in the prompt", LORA: "pick {name} under Concepts (Add LoRA) in the Generation "
           "settings", MODEL: "pick {name} as the main model"},
    then="InvokeAI watches no folder: in its Model Manager, Add Models > Scan Folder, scan {folder} and press "
    "Install All (`conjure export --invokeai-url` installs without this step)",
)
APPS = {app.name: app for app in (INVOKEAI, COMFYUI, A1111)}


@dataclass(frozen=True)
class AppFile:
    """A checkpoint's file as conjure put it in an app's folder (or left it out), and what it is."""

    path: Path  # where it went, or the checkpoint's file when left out
    kind: str  # LORA, EMBEDDING, BUNDLE or MODEL
    what: str  # e.g. "Stable Diffusion XL LoRA"
    left_out: bool = False


def app_named(name: str, field: str = "--to-app") -> App:
    try:
        return APPS[name]
    except KeyError:
        raise ConjureError(f"{field}: one of {', '.join(APPS)}, not {name!r}") from None


def file_kind(path: Path) -> tuple[str, str]:
    """(LORA, BUNDLE, EMBEDDING or MODEL, what the file is for people, e.g. "Stable Diffusion 1.x DoRA"), as
    `conjure inspect` reads the file."""
    from conjure.export.lora import detect_family
    from conjure.inspection.reader import inspect_file

    found = inspect_file(path)
    kind = MODEL if found.model else EMBEDDING if found.is_embedding else BUNDLE if found.bundled() else LORA
    family, certain = found.family, found.family_certain
    if not certain and not found.model:  # an embedding's family is read from its widths; conjure's metadata names it too
        family, certain = detect_family(found.shapes, found.metadata)
    return kind, f"{families.get(family).title if certain and family else 'unknown family'} {found.kind}"


def check_app_dir(app: App, app_dir: Path) -> Path:
    if not app_dir.is_dir():
        raise ConjureError(f"--app-dir {app_dir}: no such folder (give {app.title}'s own folder)")
    if not any((app_dir / marker).exists() for marker in app.markers):
        raise ConjureError(
            f"{app_dir} does not look like a {app.title} folder (it has no {' or '.join(app.markers)}); give the "
            f"app's own folder, or copy to a plain folder with --to DIR"
        )
    return app_dir


def install_step(
    run_dir: Path, step: str | int, app: App, app_dir: Path, *, name: str | None = None, force: bool = False
) -> list[AppFile]:
    """Copy the checkpoint's files into `app`'s folders under `app_dir` (every file or none; existing files are
    replaced only with `force`), leaving out the kinds the app does not read."""
    from conjure.runs.export import checkpoint_files, copy_files  # here: `conjure --help` lists the apps without torch

    check_app_dir(app, Path(app_dir))
    found = [(src, dest, *file_kind(src)) for src, dest in checkpoint_files(run_dir, step, name)]
    taken = [(src, dest, kind, what) for src, dest, kind, what in found if kind in app.folders]
    copied = copy_files([(src, Path(app_dir) / app.folders[kind] / dest) for src, dest, kind, _ in taken], force=force)
    return [AppFile(path, kind, what) for path, (_, _, kind, what) in zip(copied, taken)] + [
        AppFile(src, kind, what, left_out=True) for src, _, kind, what in found if kind not in app.folders]


def usage_lines(app: App, files: list[AppFile]) -> list[str]:
    """What to do in the app with each installed file, one line each, why a file was left out, and the app's extra
    step, if any."""
    installed = [f for f in files if not f.left_out]
    lines = [f"in {app.title}: {app.usage[f.kind].format(name=f.path.stem, file=f.path.name)}" for f in installed]
    lines += [f"left out {f.path.name}: {LEFT_OUT[f.kind].format(app=app.title)}" for f in files if f.left_out]
    if app.then and installed:
        folders = dict.fromkeys(str(f.path.parent) for f in installed)
        lines.append(app.then.format(folder=" and ".join(folders)))
    return lines


def install_lines(
    run_dir: Path, step: str | int, *, app: str | None, app_dir: str | None, invokeai_url: str | None,
    name: str | None, force: bool,
) -> list[str]:
    """`conjure export --to-app APP --app-dir DIR` or `--invokeai-url URL`: install, and say what was installed and
    how to use it."""
    if app_dir and not app:
        raise ConjureError("--app-dir goes with --to-app APP (for a plain folder: --to DIR)")
    if invokeai_url:
        from conjure.runs import invokeai

        url = invokeai.check_url(invokeai_url)
        return invokeai.report_lines(url, *invokeai.install_via_api(run_dir, step, url, name=name, force=force))
    chosen = app_named(str(app))
    if not app_dir:
        raise ConjureError(f"--to-app {chosen.name} needs --app-dir DIR, the app's own folder")
    files = install_step(run_dir, step, chosen, Path(app_dir).expanduser(), name=name, force=force)
    return [f"installed {f.path} ({f.what})" for f in files if not f.left_out] + usage_lines(chosen, files)
