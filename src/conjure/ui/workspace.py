"""The UI's workspace: one folder that holds everything the web app writes, and the rule for which files the
app may serve.

Layout (created on first use):

    <workspace>/
      conjure.db        SQLite: the job queue (conjure.ui.queue)
      runner.lock       held (flock) by the one server that runs this workspace's jobs
      datasets.json     the data-set folders the user opened (they become servable roots)
      configs/          configs saved from the training form (<name>.yaml)
      jobs/<id>/        per job: config.yaml as launched, log.txt (the run's stdout and stderr)
      runs/             run folders of UI-launched jobs (their basic.output_dir)
      cache/thumbs/     thumbnails, keyed by image content (never written into the user's folders)

`resolve(path)` is the one gate for every file endpoint: a path is served or changed only when, after
resolving symlinks, it lies inside the workspace or an opened data-set folder. It compares real paths, never
strings, so `..` escapes, absolute paths elsewhere and symlinks that point out are refused however they are
spelled. User strings are taken literally (no `~` expansion: `~x` is a file name), and refused before the file
system is touched when they carry a NUL byte, a percent-encoded `.`, `/`, `\\` or NUL (the framework decoded
the URL once already: a second encoding is an attack, not a file name), a UNC prefix (`\\\\host`, `//host`:
on Windows resolving one would contact that host), or, for names inside a folder, a backslash (names are
posix; on Windows a backslash would be a separator). The opened folders are compared as they were resolved
when opened, so a folder later replaced by a symlink stops being a root instead of following the link.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from conjure.errors import ConjureError
from conjure.files import atomic_write_text


class NotFound(LookupError):
    """No such image, job, config or file (the API answers 404 {"error": message})."""


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
        """Register an existing folder as a data set (a servable root); returns its resolved path. The user
        typed this path, so `~` means their home here; a whole drive or the home folder itself is refused (it
        would make every file of it servable)."""
        text = str(folder)
        if "\x00" in text:
            raise ConjureError("a folder path cannot contain a NUL byte")
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~name of an unknown user
            raise ConjureError(f"no such folder: {text}") from None
        if not path.is_absolute():
            raise ConjureError(f"give the data-set folder's full path, not {text!r}")
        try:
            path = path.resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11's resolve)
            raise ConjureError(f"no such folder: {text} (a symlink loop)") from None
        if not path.is_dir():
            raise ConjureError(f"no such folder: {path}")
        if path.parent == path or path == _home():
            raise ConjureError(f"{path}: open the folder of one data set, not a whole drive or home folder")
        with self._lock:
            known = self.datasets()
            if path not in known:
                known.append(path)
                atomic_write_text(self._datasets_file(), json.dumps({"datasets": [str(p) for p in known]}, indent=1))
        return path

    def roots(self) -> list[Path]:
        """The workspace and the opened data sets: real paths as they were when opened (never re-resolved)."""
        return [self.root, *(p for p in self.datasets() if p.is_absolute())]

    # --- the gate ----------------------------------------------------------------------------------
    def resolve(self, path: str | Path, *, under: Path | None = None) -> Path:
        """The real path of `path` when it lies inside the workspace or an opened data set; else PathRefused.
        Relative paths are taken inside `under` (itself inside a root), default the workspace; with `under`,
        the result must also lie inside `under`. The file need not exist."""
        text = str(path) if isinstance(path, Path) else path
        if not isinstance(text, str):
            raise PathRefused("path refused")
        _refuse_tricks(text, name=under is not None)
        roots = self.roots()
        base = self.root if under is None else _real(Path(under))
        if not any(_inside(base, root) for root in roots):
            raise PathRefused("path refused")
        candidate = Path(text)
        real = _real(candidate if candidate.is_absolute() else base / candidate)
        if not _inside(real, base) and under is not None:
            raise PathRefused("path refused")
        if not any(_inside(real, root) for root in roots):
            raise PathRefused("path refused")
        return real

    def dataset_root(self, folder: str | Path) -> Path:
        """An opened data-set folder, by its path (as `open_dataset` returned it); else PathRefused. A folder
        whose real path is no longer the one opened (replaced by a symlink since) is refused."""
        text = str(folder) if isinstance(folder, Path) else folder
        if not isinstance(text, str):
            raise PathRefused("not an opened data-set folder")
        _refuse_tricks(text, name=False)
        path = Path(text)
        if not path.is_absolute():
            raise PathRefused("not an opened data-set folder")
        real = _real(path)
        if real not in self.datasets():
            raise PathRefused("not an opened data-set folder")
        return real


_ENCODED = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)


def _refuse_tricks(text: str, *, name: bool) -> None:
    """Refuse, before touching the file system, what no real file name of a data set holds (module docstring)."""
    if "\x00" in text or _ENCODED.search(text) or text.startswith(("\\\\", "//")) or (name and "\\" in text):
        raise PathRefused("path refused")


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (OSError, RuntimeError):  # no HOME and no password entry
        return None


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop; a path the OS cannot take
        raise PathRefused("path refused") from None


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)
