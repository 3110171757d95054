"""Take a chosen step's files out of a run folder (the "pick the best step" action)."""

from __future__ import annotations

import shutil
from pathlib import Path

from conjure.errors import ConjureError
from conjure.train.checkpoints import STATE_FILE, list_checkpoints


def export_step(run_dir: Path, step: str | int, to: Path, *, name: str | None = None, force: bool = False) -> list[Path]:
    found = dict(list_checkpoints(run_dir))
    if not found:
        raise ConjureError(f"no checkpoints in {run_dir} (is it a conjure run folder?)")
    if str(step) == "latest":
        chosen = max(found)
    else:
        try:
            chosen = int(step)
        except ValueError:
            raise ConjureError(f"--step must be a number or 'latest', not {step!r}") from None
        if chosen not in found:
            raise ConjureError(f"no checkpoint at step {chosen} in {run_dir}; available: {', '.join(map(str, sorted(found)))}")
    files = sorted(p for p in found[chosen].iterdir() if p.is_file() and p.name != STATE_FILE)
    if name and len(files) > 1:
        raise ConjureError(
            f"--name works for a checkpoint with one file; this one has {len(files)} "
            f"({', '.join(p.name for p in files)}), which keep their names (an embedding's name is what prompts type)"
        )
    to.mkdir(parents=True, exist_ok=True)
    out = []
    for src in files:
        dest = to / (f"{name}{src.suffix}" if name else src.name)
        if dest.exists() and not force:
            raise ConjureError(f"{dest} exists; overwrite it (--force) or give another name (--name)")
        shutil.copy2(src, dest)
        out.append(dest)
    return out
