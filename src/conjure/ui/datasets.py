"""The data-set tab's API (docs/ui.md, "Data set tab"): open image folders, list, show, caption, upload and trash
their images, bulk caption edits, tag counts, a `.jsonl` of the folder and the `conjure dataset check` report.

Every `folder` must be an opened data set (`Workspace.dataset_root`) and every `name` a posix path inside it
that the gate accepts: else 403. The files themselves, and the rules that keep the user's files safe (atomic
captions, uploads that never overwrite, a trash that never deletes, the folder's lock), are
conjure.ui.dataset_files'.
"""

from __future__ import annotations

import mimetypes
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from conjure.data.check import check_source
from conjure.data.sources import write_jsonl
from conjure.data.check_settings import CheckSettings
from conjure.data.hf import is_hf_source
from conjure.data.images import ImageError, image_size
from conjure.errors import ConjureError
from conjure.ui import dataset_files as files
from conjure.ui.workspace import Workspace

THUMB_SIZES = (64, 1024)
"""Smallest and largest thumbnail long side, in pixels."""
MAX_UPLOAD_REQUEST_BYTES = 1024 * 1024 * 1024
"""Largest upload request, refused (413) from its Content-Length before it is read (conjure.ui.app)."""
MAX_UPLOAD_FILES = 1000
UPLOAD_PATH = "/api/datasets/upload"


router = APIRouter(prefix="/api/datasets", tags=["data sets"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenBody(_Body):
    path: str


class CaptionBody(_Body):
    folder: str
    name: str
    caption: str


class BulkBody(_Body):
    folder: str
    names: list[str] | None = None
    op: Literal["prefix", "suffix", "replace"]
    text: str = ""
    find: str | None = None


class TrashBody(_Body):
    folder: str
    names: list[str]


class JsonlBody(_Body):
    folder: str
    out: str


class CheckBody(CheckSettings):
    folder: str


def _workspace(request: Request) -> Workspace:
    return request.app.state.workspace


# --- the endpoints ----------------------------------------------------------------------------------


@router.get("", summary="The opened data sets")
def list_datasets(request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    return {"datasets": [{"path": str(folder), "images": _count(ws, folder)} for folder in ws.datasets()]}


def _count(ws: Workspace, folder: Path) -> int:
    try:
        return len(files.entries(ws, folder))
    except ConjureError:
        return 0


@router.post("/open", summary="Open a folder as a data set")
def open_dataset(body: OpenBody, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    try:
        candidate = Path(body.path).expanduser() if "\x00" not in body.path else None
    except RuntimeError:  # ~name of an unknown user: open_dataset says so
        candidate = None
    if candidate is not None and candidate.is_absolute() and candidate.is_dir() and is_hf_source(candidate):
        raise ConjureError(f"{candidate} is a Hugging Face data set: the data-set tab edits folders of images "
                           "with .txt captions (train on it with data.source)")
    folder = ws.open_dataset(body.path)
    return {"path": str(folder), "images": len(files.entries(ws, folder))}


@router.get("/images", summary="The images of a data set")
def images(folder: str, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    root = ws.dataset_root(folder)
    listed = []
    for entry in files.entries(ws, root):
        try:
            height, width = image_size(entry.real)
        except ImageError:
            height = width = None
        mask = files.inside(ws, root, entry.mask_path)
        listed.append({"name": entry.name, "caption": files.read_caption(ws, root, entry), "width": width,
                       "height": height, "mask": mask is not None and mask.is_file()})
    return {"folder": str(root), "images": listed}


@router.get("/image", summary="An image file itself", response_class=FileResponse)
def image(folder: str, name: str, request: Request) -> FileResponse:
    ws = _workspace(request)
    entry = files.entry(ws, ws.dataset_root(folder), name, masks=True)
    media_type = mimetypes.guess_type(entry.real.name)[0] or "application/octet-stream"
    return FileResponse(entry.real, media_type=media_type, headers={"Cache-Control": "no-cache"})


@router.get("/thumb", summary="A JPEG thumbnail (long side at most `size`)", response_class=FileResponse)
def thumb(folder: str, name: str, request: Request, size: int = 256) -> FileResponse:
    ws = _workspace(request)
    entry = files.entry(ws, ws.dataset_root(folder), name, masks=True)
    if not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
        raise ConjureError(f"size: a thumbnail is {THUMB_SIZES[0]} to {THUMB_SIZES[1]} px, not {size}")
    cached = files.thumbnail(ws, entry.real, size)
    return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})


@router.put("/caption", summary="Write an image's caption file")
def put_caption(body: CaptionBody, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    entry = files.set_caption(ws, ws.dataset_root(body.folder), body.name, body.caption)
    return {"name": entry.name, "caption": body.caption}


@router.post("/bulk", summary="Add a prefix or suffix to captions, or replace text in them")
def bulk(body: BulkBody, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    root = ws.dataset_root(body.folder)
    if body.op == "replace" and not body.find:
        raise ConjureError("find: give the text to replace")
    if body.op != "replace" and body.find is not None:
        raise ConjureError(f"find: only replace takes it, not {body.op}")
    if body.op != "replace" and not body.text:
        raise ConjureError(f"text: give the {body.op} to add")
    edit = files.CaptionEdit(body.op, body.text, body.find)
    return {"changed": files.edit_captions(ws, root, body.names, edit)}


@router.get("/tags", summary="Tag counts over the captions")
def tags(folder: str, request: Request, delimiter: str = ",") -> dict[str, Any]:
    """Each caption is split at `delimiter`, parts stripped; a tag's count is how many captions hold it."""
    ws = _workspace(request)
    root = ws.dataset_root(folder)
    if not delimiter:
        raise ConjureError("delimiter: give the text that separates tags (e.g. ,)")
    counts: Counter[str] = Counter()
    for entry in files.entries(ws, root):
        caption = files.read_caption(ws, root, entry)
        if caption:
            counts.update({part.strip() for part in caption.split(delimiter)} - {""})
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {"tags": [{"tag": tag, "count": count} for tag, count in ordered]}


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["folder", "files"],
            "properties": {
                "folder": {"type": "string", "description": "an opened data set"},
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            },
        }}},
    }
}


@router.post(UPLOAD_PATH.removeprefix(router.prefix), summary="Add images to a data set", openapi_extra=_UPLOAD_BODY)
async def upload(request: Request) -> dict[str, Any]:
    ws = _workspace(request)  # the request's size was checked from its Content-Length (conjure.ui.app)
    async with request.form(max_files=MAX_UPLOAD_FILES, max_fields=16) as form:
        folder = form.get("folder")
        if not isinstance(folder, str):
            raise ConjureError("folder: give the data set's folder")
        root = ws.dataset_root(folder)
        uploads = form.getlist("files")
        if not uploads or not all(isinstance(file, UploadFile) for file in uploads):
            raise ConjureError("files: give one or more image files")
        added, refused = await run_in_threadpool(files.save_uploads, root, uploads)
    if not added:
        reasons = "; ".join(f"{item['name']}: {item['reason']}" for item in refused)
        raise ConjureError(f"nothing added: {reasons}")
    return {"added": added, "refused": refused}


@router.post("/trash", summary="Move images (with caption and mask) into the folder's .trash")
def trash(body: TrashBody, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    return {"moved": files.trash(ws, ws.dataset_root(body.folder), body.names)}


@router.post("/jsonl", summary="Write the data set as a .jsonl source inside its folder")
def jsonl(body: JsonlBody, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    root = ws.dataset_root(body.folder)
    out = ws.resolve(files.check_name(body.out).as_posix(), under=root)
    if out.exists():
        raise ConjureError(f"{out.name} exists: choose another name")
    lines = write_jsonl(root, out, confine=root)
    return {"path": str(out), "lines": lines}


@router.post("/check", summary="The data-set check report (conjure dataset check --json)")
def check(body: CheckBody, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    root = ws.dataset_root(body.folder)
    return check_source(root, **body.model_dump(exclude={"folder"}), confine=root).to_dict()


@router.get("/check/schema", summary="The check's settings (JSON schema): their defaults fill the page's form")
def check_schema() -> dict[str, Any]:
    return CheckSettings.model_json_schema()
