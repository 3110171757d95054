"""Monitor API (prefix `/api`; the table in docs/ui.md): what a job's run shows, read from its run folder
(conjure.runs) and its log: events, log lines, validation images, the suggested step, checkpoints, export of a
checkpoint, and `/api/files`, the images those answers link to (through the workspace's path gate).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from conjure.errors import ConjureError
from conjure.runs.checkpoints import STATE_FILE, STEP_DIR
from conjure.runs.events import EVENTS_FILE, Event, read_events
from conjure.runs.folder import VALIDATION_DIR, VALIDATION_GRID, VALIDATION_IMAGE
from conjure.ui.queue import Job, checkpoint_steps
from conjure.ui.runner import JobQueue, read_log_lines
from conjure.ui.training import jobs_of
from conjure.ui.workspace import NotFound, PathRefused

MAX_EVENTS_PER_ANSWER = 5000

router = APIRouter(prefix="/api", tags=["training"])


class ExportBody(BaseModel):
    step: int | str = Field(description="A checkpoint's step, or 'latest'.")
    to: str = Field(description="The folder to copy the files to (a full path; created if missing), or with `app` "
                    "the app's own folder.")
    app: str | None = Field(None, description="Install into this app's folders under `to` (invokeai, comfyui or "
                            "a1111: conjure.runs.apps), as `conjure export --to-app`.")
    name: str | None = Field(None, description="File name stem instead of the trained one (one-file checkpoints).")
    force: bool = Field(False, description="Overwrite files that exist in `to`.")


def _jobs(request: Request) -> JobQueue:
    return jobs_of(request.app)


def _run_dir(job: Job) -> Path | None:
    return Path(job.run_dir) if job.run_dir else None


@router.get("/jobs/{job_id}/events")
def job_events(job_id: int, request: Request, after: int = Query(0, ge=0)) -> dict[str, Any]:
    run_dir = _run_dir(_jobs(request).get(job_id))
    if run_dir is None:
        return {"events": [], "next": after}
    read = read_events(run_dir / EVENTS_FILE, after, MAX_EVENTS_PER_ANSWER)
    return {"events": read.events, "next": read.next}


@router.get("/jobs/{job_id}/log")
def job_log(job_id: int, request: Request, tail: int = Query(200, ge=0, le=10_000)) -> dict[str, Any]:
    queue = _jobs(request)
    try:
        return {"lines": read_log_lines(queue.log_path(queue.get(job_id)), tail)}
    except FileNotFoundError:
        return {"lines": []}


def file_url(path: Path) -> str:
    return "/api/files?path=" + urllib.parse.quote(str(path), safe="/")


@router.get("/jobs/{job_id}/validation")
def job_validation(job_id: int, request: Request) -> dict[str, Any]:
    """The validation images of every step: folders `validation/step-NNNNNN/` (images `<prompt>-seed<seed>.png`,
    `grid.png`), with the prompts and seeds of the run's last validation event."""
    run_dir = _run_dir(_jobs(request).get(job_id))
    prompts: list[str] = []
    seeds: list[int] = []
    if run_dir is None:
        return {"prompts": prompts, "seeds": seeds, "steps": []}
    for event in read_events(run_dir / EVENTS_FILE).events:
        if event.get("event") == Event.VALIDATION:
            prompts, seeds = list(event.get("prompts") or []), list(event.get("seeds") or [])
    steps = []
    root = run_dir / VALIDATION_DIR
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        m = STEP_DIR.match(folder.name)
        if not m or not folder.is_dir():
            continue
        images = []
        for image in folder.iterdir():
            found = VALIDATION_IMAGE.match(image.name)
            if found:
                index, seed = int(found.group(1)), int(found.group(2))
                images.append({"prompt_index": index, "seed": seed, "url": file_url(image)})
        order = {seed: i for i, seed in enumerate(seeds)}
        images.sort(key=lambda im: (im["prompt_index"], order.get(im["seed"], len(order)), im["seed"]))
        grid = folder / VALIDATION_GRID
        steps.append({"step": int(m.group(1)), "images": images, "grid": file_url(grid) if grid.is_file() else None})
    return {"prompts": prompts, "seeds": seeds, "steps": steps}


@router.get("/jobs/{job_id}/score")
def job_score(job_id: int, request: Request) -> dict[str, Any]:
    """`conjure runs score --json` of the job's run (the plot aside): the evidence per step and the suggested step
    (conjure.runs.best), which the page marks in its gallery."""
    from conjure.runs.best import read_rows, suggest
    from conjure.runs.score import answer

    run_dir = _run_dir(_jobs(request).get(job_id))
    if run_dir is None:
        return {"rows": [], "suggestion": None}
    rows = read_rows(run_dir)
    return answer(rows, suggest(rows))


@router.get("/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: int, request: Request) -> dict[str, Any]:
    found = checkpoint_steps(_jobs(request).get(job_id).run_dir)
    return {"checkpoints": [
        {"step": step, "path": str(folder),
         "files": sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != STATE_FILE)}
        for step, folder in found
    ]}


@router.post("/jobs/{job_id}/export")
def job_export(job_id: int, body: ExportBody, request: Request) -> dict[str, Any]:
    """Copy a checkpoint's files to a folder of the user's choice (`conjure export`), or into an app's folders
    (`--to-app`, with what to type in the app as `usage`): not bound to the workspace, as the CLI is not; existing
    files are kept unless `force`."""
    from conjure.runs.apps import app_named, install_step, usage_lines
    from conjure.runs.export import check_file_stem, export_step

    run_dir = _run_dir(_jobs(request).get(job_id))
    if run_dir is None:
        raise ConjureError(f"job {job_id} has not run yet: nothing to export")
    if isinstance(body.step, str) and body.step != "latest" and not body.step.isdigit():
        raise ConjureError(f"step: a checkpoint's step number or 'latest', not {body.step!r}")
    to = Path(body.to).expanduser()
    if "\x00" in body.to or not to.is_absolute():
        raise ConjureError(f"export to: give the folder's full path, not {body.to!r}")
    if body.name is not None:
        check_file_stem(body.name, "name")
    try:
        if body.app is None:
            return {"files": [str(p) for p in export_step(run_dir, body.step, to, name=body.name, force=body.force)]}
        app = app_named(body.app, "app")
        installed = install_step(run_dir, body.step, app, to, name=body.name, force=body.force)
    except OSError as exc:
        raise ConjureError(f"cannot write to {to}: {exc.strerror or exc}") from None
    return {"files": [str(f.path) for f in installed if not f.left_out], "usage": usage_lines(app, installed)}


@router.get("/files")
def files(request: Request, path: str = Query(description="a file's full path")) -> Any:
    """An image inside the workspace or an opened data set (validation images, grids), through the path gate.
    Only images: the workspace also holds the job database and configs, which no page needs to fetch."""
    from conjure.data.images import is_image_file

    real = request.app.state.workspace.resolve(path)
    if not is_image_file(real):
        raise PathRefused("not an image")
    if not real.is_file():
        raise NotFound("no such file")
    return FileResponse(real)
