"""The data-set tab's "Caption missing" and "Caption selected" (docs/ui.md, "Data set tab"): `conjure caption`
(conjure.data.autocaption) run in a thread of the server, one at a time, which the page polls for its progress.

A thread, not a job of the training queue: captioning reads and writes only the opened folder, needs no run
folder or log, and the page wants each caption as it lands. The model loaded last stays loaded for the next click
(loading it takes longer than captioning a few images). Images are the folder's entries (conjure.ui.dataset_files:
the gate's rules), and each caption is written by `dataset_files.set_caption`, under the folder's lock, after
checking that its image is still there: a caption file linking out of the folder is refused and reported.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from conjure.data.autocaption import CaptionReport, Captioner, caption_images, load_captioner
from conjure.data.caption_settings import CaptionSettings
from conjure.errors import ConjureError
from conjure.ui import dataset_files as files
from conjure.ui.workspace import NotFound, Workspace

router = APIRouter(prefix="/api/datasets/caption", tags=["data sets"])


class CaptionBody(CaptionSettings):
    folder: str
    names: list[str] | None = None
    """The images to caption (None: every image of the folder); those with a caption keep it unless overwrite."""


@dataclass
class CaptionRun:
    """One click's progress, as the page shows it."""

    folder: str
    total: int
    state: str = "loading"  # loading the model, captioning, done, failed
    done: int = 0
    written: list[str] = field(default_factory=list)
    kept: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None

    def public(self) -> dict[str, Any]:
        return {"folder": self.folder, "state": self.state, "done": self.done, "total": self.total,
                "written": self.written, "kept": self.kept, "skipped": self.skipped, "error": self.error}


class Captioning:
    """The server's captioning: the latest run and the model it loaded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.run: CaptionRun | None = None
        self.loaded: tuple[tuple[str, ...], Captioner] | None = None

    def start(self, ws: Workspace, root: Path, entries: list[files.Entry], settings: CaptionSettings) -> CaptionRun:
        with self.lock:
            if self.run is not None and self.run.state in ("loading", "captioning"):
                raise ConjureError(f"captioning {self.run.folder} is running already: wait for it to finish")
            self.run = run = CaptionRun(str(root), total=len(entries))
        threading.Thread(target=self._work, args=(run, ws, root, entries, settings), daemon=True,
                         name="conjure-captioning").start()
        return run

    def _work(self, run: CaptionRun, ws: Workspace, root: Path, entries: list[files.Entry],
              settings: CaptionSettings) -> None:
        names = {entry.path: entry.name for entry in entries}

        def write(image: Path, caption: str) -> None:
            try:
                files.set_caption(ws, root, names[image], caption)
            except NotFound as error:
                raise ConjureError(str(error)) from None  # trashed meanwhile: skipped with that reason

        def progress(done: int, total: int, report: CaptionReport) -> None:
            run.done, run.total = done, total
            run.written = [names[image] for image in report.written]
            run.skipped = [{"name": names[image], "reason": reason} for image, reason in report.skipped]

        try:
            captioner = self._captioner(settings)
            run.state = "captioning"
            report = caption_images(list(names), captioner, settings, write=write, progress=progress)
            progress(run.done, run.total, report)
            run.kept = len(report.kept)
            run.done = run.total = len(names) - run.kept
            run.state = "done"
        except ConjureError as error:
            run.error, run.state = str(error), "failed"
        except Exception as error:  # noqa: BLE001 - a bug, but the page still learns that the run stopped
            run.error, run.state = f"unexpected {type(error).__name__}: {error}", "failed"

    def _captioner(self, settings: CaptionSettings) -> Captioner:
        key = (settings.model, settings.device, settings.style, str(settings.prompt), str(settings.max_new_tokens))
        if self.loaded is None or self.loaded[0] != key:
            self.loaded = None  # free the last model before loading the next
            self.loaded = (key, load_captioner(settings))
        return self.loaded[1]


def captioning(request: Request) -> Captioning:
    return request.app.state.captioning


@router.post("", summary="Caption images in the background (conjure caption); poll GET for the progress")
def start(body: CaptionBody, request: Request) -> dict[str, Any]:
    ws: Workspace = request.app.state.workspace
    root = ws.dataset_root(body.folder)
    if body.names is not None:
        entries = [files.entry(ws, root, name) for name in body.names]
    else:
        entries = files.entries(ws, root)
    if not entries:
        raise ConjureError("names: no images to caption")
    settings = CaptionSettings(**body.model_dump(exclude={"folder", "names"}))
    return captioning(request).start(ws, root, entries, settings).public()


@router.get("", summary="The progress of the latest captioning")
def status(request: Request) -> dict[str, Any]:
    run = captioning(request).run
    return run.public() if run is not None else {"state": "idle"}


@router.get("/schema", summary="The captioning settings (JSON schema): the page shows the default model from it")
def schema() -> dict[str, Any]:
    return CaptionSettings.model_json_schema()
