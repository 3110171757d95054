"""Run folders: where a new run goes, and which run and checkpoint a resume continues."""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from pathlib import Path

import yaml

from conjure.errors import ConjureError
from conjure.train.checkpoints import list_checkpoints, resolve_checkpoint


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
            same_type = (yaml.safe_load(run.read_text()) or {}).get("type") == config_type
        except (OSError, yaml.YAMLError):
            continue
        found = list_checkpoints(run.parent)
        if same_type and found:
            runs.append((os.path.getmtime(found[-1][1]), run.parent))
    if not runs:
        raise ConjureError(f"basic.resume: latest: no {config_type} run with a checkpoint in {root}")
    return resolve_checkpoint(max(runs)[1])
