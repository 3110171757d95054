"""Checkpoint folders: `checkpoints/step-NNNNNN/` holds the files apps load and `training_state.pt`
(everything needed to resume exactly). A folder is written under a temporary name and renamed when
complete, so a crash or a full disk never leaves a half checkpoint that resume would pick up."""

from __future__ import annotations

import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conjure.errors import ConjureError
from conjure.files import atomic_folder

STATE_FILE = "training_state.pt"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def write_checkpoint(
    run_dir: Path, step: int, state: dict[str, Any], write_files: Callable[[Path], list[Path]]
) -> Path:
    """Write app files (via `write_files(folder)`) and the resume state, then publish the folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    for leftover in root.glob(".tmp-*"):  # of a run killed while saving (this process holds the run's lock)
        shutil.rmtree(leftover, ignore_errors=True)
    from safetensors import SafetensorError

    def write(tmp: Path) -> None:
        write_files(tmp)
        import torch  # here, not at the top: the web app lists checkpoints without loading torch

        # Through a Python file: given a path, torch reports a failed write (a full disk) as RuntimeError
        # ("unexpected pos ...", "iostream error") instead of OSError.
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)

    try:
        atomic_folder(final, write)
    except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as its own error
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConjureError(f"could not write checkpoint {final}: {reason}; {kept_checkpoint(run_dir)}") from None
    return final


def kept_checkpoint(run_dir: Path) -> str:
    """What a run that fails leaves to resume from, for its error line."""
    found = list_checkpoints(run_dir)
    return f"the last complete checkpoint is {found[-1][1]}" if found else "no checkpoint was written"


def prune_checkpoints(run_dir: Path, keep_last: int | None) -> list[Path]:
    if keep_last is None:
        return []
    removed = []
    for _, folder in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


STATE_KEYS = ("step", "method", "optimizer", "lr_scheduler", "generator")


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The resume state of `checkpoint`. A run folder may come from someone else, so the state is read with
    torch's weights-only unpickler (tensors, numbers, strings and containers; no code runs) and must hold
    every part a resume needs."""
    path = Path(checkpoint) / STATE_FILE
    try:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ConjureError(f"cannot read training state {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file is the file's fault
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
            why = "it holds objects other than tensors and numbers, which are not loaded (they could run code)"
        else:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConjureError(f"cannot read training state {path}: {why}") from None
    if not isinstance(state, dict):
        raise ConjureError(f"cannot read training state {path}: not a conjure training state")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ConjureError(f"cannot read training state {path}: not a complete conjure training state "
                           f"(missing {', '.join(missing)})")
    return state


def resolve_checkpoint(target: Path) -> Path:
    """A run folder -> its newest checkpoint; a checkpoint folder -> itself."""
    target = Path(target)
    if (target / STATE_FILE).is_file():
        return target
    found = list_checkpoints(target)
    if not found:
        raise ConjureError(f"nothing to resume in {target}: no complete checkpoint under {target / 'checkpoints'}")
    return found[-1][1]
