"""The UI's workspace: one folder that holds everything the web app writes, and the rule for which files the
app may serve.

Layout (created on first use):

    <workspace>/
      conjure.db        SQLite: the job queue (conjure.ui.jobs)
      datasets.json     the data-set folders the user opened (they become servable roots)
      configs/          configs saved from the training form (<name>.yaml)
      jobs/<id>/        per job: config.yaml as launched, log.txt (the run's stdout and stderr)
      runs/             run folders of UI-launched jobs (their basic.output_dir)
      cache/thumbs/     thumbnails, keyed by image content (never written into the user's folders)

`resolve(path)` is the one gate for every file endpoint: a path is served or changed only when, after
resolving symlinks, it lies inside the workspace or an opened data-set folder. It refuses `..` escapes, absolute
paths elsewhere, symlinks that point out, NUL bytes and (doubly) encoded tricks, by comparing resolved real paths,
never strings.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from conjure.errors import ConjureError


class PathRefused(ConjureError):
    """A path outside the folders the user opened (the API answers 403 without saying more)."""


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        for folder in (self.root, self.configs, self.jobs, self.runs, self.thumbs):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @property
    def db_path(self) -> Path:
        return self.root / "conjure.db"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def thumbs(self) -> Path:
        return self.root / "cache" / "thumbs"

    # --- opened data-set folders -----------------------------------------------------------------
    def _datasets_file(self) -> Path:
        return self.root / "datasets.json"

    def datasets(self) -> list[Path]:
        """The data-set folders opened so far (persisted), in the order they were opened."""
        try:
            data = json.loads(self._datasets_file().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [Path(p) for p in data.get("datasets", []) if isinstance(p, str)]

    def open_dataset(self, folder: str | Path) -> Path:
        """Register an existing folder as a data set (a servable root); returns its resolved path."""
        path = Path(folder).expanduser()
        if "\x00" in str(folder) or not path.is_absolute():
            raise ConjureError(f"give the data-set folder's full path, not {str(folder)!r}")
        path = path.resolve()
        if not path.is_dir():
            raise ConjureError(f"no such folder: {path}")
        with self._lock:
            known = self.datasets()
            if path not in known:
                known.append(path)
                tmp = self._datasets_file().with_suffix(".tmp")
                tmp.write_text(json.dumps({"datasets": [str(p) for p in known]}, indent=1), encoding="utf-8")
                os.replace(tmp, self._datasets_file())
        return path

    def roots(self) -> list[Path]:
        return [self.root, *self.datasets()]

    # --- the gate ----------------------------------------------------------------------------------
    def resolve(self, path: str | Path, *, under: Path | None = None) -> Path:
        """The real path of `path` (relative paths are taken inside `under`, default the workspace) when it lies
        inside the workspace or an opened data set; else PathRefused. The file need not exist."""
        text = str(path)
        if "\x00" in text or "%" in text and any(c in text.lower() for c in ("%2e", "%2f", "%5c", "%00")):
            raise PathRefused("path refused")
        base = Path(under).resolve() if under is not None else self.root
        candidate = Path(text).expanduser()
        candidate = candidate if candidate.is_absolute() else base / candidate
        real = candidate.resolve()  # follows symlinks: a link pointing out resolves out, and is refused
        if under is not None and not _inside(real, base):
            raise PathRefused("path refused")
        if not any(_inside(real, root.resolve()) for root in self.roots()):
            raise PathRefused("path refused")
        return real

    def dataset_root(self, folder: str | Path) -> Path:
        """An opened data-set folder, by its path (as `open_dataset` returned it); else PathRefused."""
        real = Path(folder).expanduser().resolve()
        if real not in [p.resolve() for p in self.datasets()]:
            raise PathRefused("not an opened data-set folder")
        return real


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)
