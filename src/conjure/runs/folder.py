"""Run folders: where a new run goes, which run and checkpoint a resume continues, what a resume may change,
the lock that keeps two processes from training one run, and the names of the validation images (written by
conjure.train.validation, listed by the web app's gallery)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from conjure.config.loading import load_yaml
from conjure.config.migrate import LEGACY_TYPES
from conjure.errors import ConjureError
from conjure.runs.checkpoints import STATE_FILE, list_checkpoints, resolve_checkpoint

VALIDATION_DIR = "validation"
"""`validation/step-NNNNNN/` (runs.checkpoints.step_dir_name) holds one validation's images and grid."""
VALIDATION_GRID = "grid.png"
VALIDATION_IMAGE = re.compile(r"^(\d+)-seed(-?\d+)\.png$")
"""A validation image: the prompt's index and the seed (validation_image_name)."""


def validation_image_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:02d}-seed{seed}.png"


def default_run_name(config_type: str) -> str:
    return f"{config_type}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A probe of its own: runs starting at the same instant in one output_dir must not remove each other's.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConjureError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None


def create_run_dir(output_dir: str, run_name: str) -> Path:
    """A fresh folder: an existing non-empty one is never reused (a suffix is added)."""
    base = Path(output_dir).expanduser() / run_name
    n = 1
    while True:
        candidate = base if n == 1 else base.with_name(f"{base.name}_{n}")
        n += 1
        if candidate.exists() and any(candidate.iterdir()):
            continue
        _check_writable(candidate)
        try:
            # Creating checkpoints/ claims the folder (mkdir is atomic): of two runs starting at once with the
            # same name, one gets it and the other moves on to the next suffix.
            (candidate / "checkpoints").mkdir()
        except FileExistsError:
            continue
        for sub in ("validation", "logs"):
            (candidate / sub).mkdir(exist_ok=True)
        return candidate


def find_resume_checkpoint(resume: str, *, output_dir: str, run_name: str | None, config_type: str) -> Path:
    """'latest' -> newest checkpoint of this config's run (by run_name, else the newest run of this type
    in output_dir); a run folder -> its newest checkpoint; a checkpoint folder -> itself."""
    if resume != "latest":
        target = Path(resume).expanduser()
        if not target.is_dir():
            raise ConjureError(f"basic.resume: {resume!r} is not a run or checkpoint folder")
        return resolve_checkpoint(target)
    root = Path(output_dir).expanduser()
    if run_name:
        return resolve_checkpoint(root / run_name)
    runs = []
    for run in root.glob("*/config.yaml") if root.is_dir() else []:
        try:
            raw_type = (load_yaml(run.read_text()) or {}).get("type")
            # A run of a version 1 config (sd_lora, ...) continues under its version 2 type.
            same_type = isinstance(raw_type, str) and LEGACY_TYPES.get(raw_type, (raw_type,))[0] == config_type
        except (OSError, yaml.YAMLError):
            continue
        found = list_checkpoints(run.parent)
        if same_type and found:
            runs.append((os.path.getmtime(found[-1][1]), run.parent))
    if not runs:
        raise ConjureError(f"basic.resume: latest: no {config_type} run with a checkpoint in {root}")
    return resolve_checkpoint(max(runs)[1])


def run_config_path(resume: str) -> Path:
    """The config a `--resume` without a config file continues with: the run's own `config.yaml`, also when
    `resume` names one of its checkpoint folders."""
    if resume == "latest":
        raise ConjureError("--resume latest needs the config file that names the run: conjure train CONFIG --resume "
                           "latest (or give the run folder: conjure train --resume RUN_DIR)")
    target = Path(resume).expanduser()
    if (target / STATE_FILE).is_file() and not (target / "config.yaml").is_file():
        target = target.parent.parent  # RUN/checkpoints/step-NNNNNN
    return target / "config.yaml"


LOCK_FILE = "train.lock"


@contextlib.contextmanager
def lock_run(run_dir: Path) -> Iterator[None]:
    """Hold the run folder while training it: a second `conjure train --resume` of a running run is refused in
    one line. flock: the kernel drops the lock when its holder dies, so a killed run leaves no stale lock (its
    pid stays in the file until the next holder writes its own)."""
    handle = (Path(run_dir) / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise ConjureError(
            f"{run_dir} is being trained by another process{f' (pid {holder})' if holder.isdigit() else ''}; "
            "wait for it to end (or stop it), then resume"
        ) from None
    except OSError:  # a file system without locks (some network mounts): train unguarded rather than not at all
        pass
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


RESUME_MAY_CHANGE = (
    "basic.output_dir", "basic.run_name", "basic.resume",  # where the run folder is now: a moved run resumes
    "basic.max_train_steps", "basic.max_train_epochs", "basic.save_every_n_steps", "basic.validate_every_n_steps",
    "basic.keep_last_n_checkpoints", "validation.",
    "optimizer.learning_rate", "optimizer.scheduler", "optimizer.warmup_steps", "lora.unet_learning_rate",
    "lora.text_encoder_learning_rate", "textual_inversion.learning_rate", "textual_inversion.freeze_after",
    "lora.save_format", "lora.save_dtype", "lora.output_name", "textual_inversion.bundle",
    "data.cache_latents", "data.cache_text_encoder_outputs", "data.cache_dir", "data.keep_in_memory",
    "data.dataloader_num_workers", "advanced.gradient_checkpointing", "advanced.max_grad_norm",
    "advanced.max_consecutive_skipped_steps",
    "basic.memory_preset",  # a name: the config.yaml records the options it set, and those are compared one by one
    "advanced.min_snr_gamma", "advanced.noise_offset", "lora.dropout",
    "advanced.distributed",  # ddp and fsdp checkpoints hold the same full tensors (conjure.train.sharding)
)
"""Settings a resume may change (a prefix ending in '.' covers a section): each takes effect from the resumed
step on (learning rates included: the loop sets the optimizer's and the schedule's base rates). Every other
setting is refused, since the checkpoint's shapes, data order or optimizer state depend on it or since it
would be recorded without taking effect."""
RESUME_KEEPS = ("validation.holdout",)  # in a section a resume may change, but it chooses the training images


def with_absolute_paths(config: Any) -> Any:
    """A copy of `config` whose local paths (data sources, cache folder, a local base model or VAE) are absolute, so
    the run's `config.yaml` resumes from any working folder."""
    out = config.model_copy(deep=True)
    basic, data = out.basic, out.data

    def local(path: str | None, *, must_exist: bool = False) -> str | None:
        if path is None or path.startswith("hf:"):
            return path
        full = Path(path).expanduser()
        return str(full.absolute()) if full.exists() or not must_exist else path

    basic.base_model = local(basic.base_model, must_exist=True)  # else a hub id
    basic.base_model_config = local(basic.base_model_config, must_exist=True)
    basic.vae = local(basic.vae, must_exist=True)
    data.source, data.cache_dir = local(data.source), local(data.cache_dir)
    out.validation.loss_images = local(out.validation.loss_images)
    for source in data.sources:
        source.path = local(source.path)
    return out


def resume_changes(saved_config: Path, resolved: Any) -> dict[str, tuple[Any, Any]]:
    """Settings `resolved` changes from the run's saved config, as {dotted key: (before, after)}. Raises
    ConjureError naming each change a resume cannot make (see RESUME_MAY_CHANGE)."""
    from conjure.config import parse_config

    try:
        # The config loader's rules (no alias bombs, no duplicate keys): a run folder may come from someone else.
        raw = load_yaml(saved_config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}  # nothing to compare with; the training state's own checks still apply
    try:
        before = _flatten(with_absolute_paths(parse_config(raw)).model_dump(mode="json"))
    except (ConjureError, ValueError):
        before = _flatten(raw)  # a config of an older conjure: compare what it says
    after = _flatten(resolved.model_dump(mode="json"))
    changed = {k: (before[k], after[k]) for k in sorted(after) if k in before and before[k] != after[k]}
    refused = [k for k in changed if k in RESUME_KEEPS or not any(k == p or (p.endswith(".") and k.startswith(p))
                                                                  for p in RESUME_MAY_CHANGE)]
    if refused:
        raise ConjureError(
            f"cannot resume {saved_config.parent} with other settings for what its checkpoint depends on: "
            + "; ".join(f"{k} is {changed[k][0]!r} in the run, {changed[k][1]!r} in this config" for k in refused)
            + " (resume with the run's own config: conjure train --resume RUN_DIR, or start a new run)"
        )
    return changed


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
