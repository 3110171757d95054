"""Take a chosen step's files out of a run folder (the "pick the best step" action of the CLI and the web app).

An export writes every file to a temporary file in the destination folder first and renames them into place only
when all are complete: a full disk or a failed copy leaves the folder as it was (with `--force`, the old files
too), never a truncated file that apps would try to load.
"""

from __future__ import annotations

import errno
from pathlib import Path

from conjure.errors import ConjureError
from conjure.files import copy_to_temporary, publish
from conjure.runs.best import read_rows, suggest
from conjure.runs.checkpoints import STATE_FILE, list_checkpoints


def check_file_stem(name: str, field: str = "--name") -> str:
    """`name` as a file name stem that stays in its folder: no '/' or '\\', no leading '.' (hidden files, '..'),
    no NUL. The CLI and the web app refuse the same names."""
    if not name or "\x00" in name or "/" in name or "\\" in name or name.startswith("."):
        raise ConjureError(f"{field}: a file name stem without '/', '\\' or a leading '.', not {name!r}")
    return name


def _destination_folder(to: Path) -> Path:
    if to.exists() and not to.is_dir():
        raise ConjureError(f"cannot export to {to}: it is not a folder")
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConjureError(f"cannot write to {to}: {exc.strerror or exc}") from None
    return to


def _chosen_step(found: dict[int, Path], step: str | int, run_dir: Path) -> int:
    if str(step) == "latest":
        return max(found)
    if str(step) == "best":
        suggestion = suggest(read_rows(run_dir))
        if suggestion.step is None:
            raise ConjureError(f"--step best: {suggestion.reason}")
        return suggestion.step
    try:
        chosen = int(step)
    except ValueError:
        raise ConjureError(f"--step must be a number, 'latest' or 'best', not {step!r}") from None
    if chosen not in found:
        raise ConjureError(f"no checkpoint at step {chosen} in {run_dir}; available: {', '.join(map(str, sorted(found)))}")
    return chosen


def _check_destinations(plan: list[tuple[Path, Path]], force: bool) -> None:
    for _, dest in plan:
        if dest.is_dir():
            raise ConjureError(f"cannot export to {dest}: it is a folder")
        if dest.exists() and not force:
            other_name = " or give another name (--name)" if len(plan) == 1 else ""  # --name renames one file only
            raise ConjureError(f"{dest} exists; overwrite it (--force){other_name}")


def _copy_to_temporaries(plan: list[tuple[Path, Path]]) -> list[Path]:
    copies: list[Path] = []
    try:
        for src, dest in plan:
            copies.append(copy_to_temporary(src, dest.parent, dest.name))
    except OSError as exc:
        for tmp in copies:
            tmp.unlink(missing_ok=True)
        problem = f"disk full while writing {dest}" if exc.errno == errno.ENOSPC else (
            f"cannot write {dest}: {exc.strerror or exc}")
        raise ConjureError(f"{problem}; nothing was exported (existing files are unchanged)") from None
    return copies


def _publish_all(copies: list[Path], plan: list[tuple[Path, Path]]) -> None:
    done = 0
    try:
        for tmp, (_, dest) in zip(copies, plan):
            publish(tmp, dest)
            done += 1
    except OSError as exc:  # e.g. EPERM: another user's file in a sticky folder
        for tmp in copies[done:]:
            tmp.unlink(missing_ok=True)
        raise ConjureError(f"cannot write {plan[done][1]}: {exc.strerror or exc}") from None


def checkpoint_files(run_dir: Path, step: str | int, name: str | None = None) -> list[tuple[Path, str]]:
    """The app files of the run's checkpoint at `step` (a number, 'latest' or 'best'), each with the name it is exported
    under: its own, or `name` + its suffix for a one-file checkpoint."""
    found = dict(list_checkpoints(run_dir))
    if not found:
        raise ConjureError(f"no checkpoints in {run_dir} (is it a conjure run folder?)")
    chosen = _chosen_step(found, step, run_dir)
    if name is not None:
        check_file_stem(name)
    files = sorted(p for p in found[chosen].iterdir() if p.is_file() and p.name != STATE_FILE)
    if name and len(files) > 1:
        raise ConjureError(
            f"--name works for a checkpoint with one file; this one has {len(files)} "
            f"({', '.join(p.name for p in files)}), which keep their names (an embedding's name is what prompts type)"
        )
    return [(src, f"{name}{src.suffix}" if name else src.name) for src in files]


def copy_files(plan: list[tuple[Path, Path]], *, force: bool = False) -> list[Path]:
    """Copy each (source, destination) pair, making the destinations' folders: every copy or none (module
    docstring); an existing destination is replaced only with `force`."""
    for folder in dict.fromkeys(dest.parent for _, dest in plan):
        _destination_folder(folder)
    _check_destinations(plan, force)
    _publish_all(_copy_to_temporaries(plan), plan)
    return [dest for _, dest in plan]


def export_step(run_dir: Path, step: str | int, to: Path, *, name: str | None = None, force: bool = False) -> list[Path]:
    files = checkpoint_files(run_dir, step, name)
    return copy_files([(src, Path(to) / dest) for src, dest in files], force=force)
