"""The data-set tab's API (docs/ui.md, "Data set tab"): open image folders, list, show, caption, upload and trash
their images, bulk caption edits, tag counts, a `.jsonl` of the folder and the `conjure dataset check` report.

Every `folder` must be an opened data set (`Workspace.dataset_root`) and every `name` a posix path inside it
(relative, no `..`, no hidden part) that `Workspace.resolve(name, under=folder)` accepts: else 403. Images are
found as training finds them (`scan_source`); an image whose real file lies outside the folder (a symlink
pointing out) is not listed and cannot be addressed. Captions follow training's rules (`<stem>.txt` beside the
image, UTF-8 with or without a byte-order mark).

Nothing here deletes a user's file: captions are replaced atomically (temporary file + rename), uploads never
overwrite, trash moves files into `<folder>/.trash/`. Thumbnails are written to the workspace's cache only.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import shutil
import stat
import threading
import unicodedata
import uuid
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from conjure.data.check import check_source, write_jsonl
from conjure.data.check_settings import CheckSettings
from conjure.data.hf import is_hf_source
from conjure.data.images import IMAGE_EXTENSIONS, ImageError, image_size, is_image_file, load_image
from conjure.data.sources import MASK_SUFFIX, scan_source
from conjure.errors import ConjureError
from conjure.ui.workspace import NotFound, PathRefused, Workspace

TRASH = ".trash"
THUMB_SIZES = (64, 1024)
"""Smallest and largest thumbnail long side, in pixels."""
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
"""Largest file an upload takes (a photo is a few MB; anything this big is a mistake or an attack)."""
MAX_UPLOAD_REQUEST_BYTES = 1024 * 1024 * 1024
"""Largest upload request, refused (413) from its Content-Length before it is read (conjure.ui.app)."""
MAX_UPLOAD_FILES = 1000
UPLOAD_PATH = "/api/datasets/upload"
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_FORMAT_SUFFIX = {"MPO": ".jpg", **{fmt: suffix for suffix, fmt in reversed(Image.registered_extensions().items())
                                    if suffix in IMAGE_EXTENSIONS}}
"""PIL format -> the file suffix an upload without an image suffix gets (the first one PIL registers)."""
_FOLDER_LOCKS: dict[Path, threading.Lock] = {}
_FOLDER_LOCKS_LOCK = threading.Lock()


class Missing(NotFound):
    """No such image in the data set (404)."""


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


# --- finding things --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """An image of a data set: its name, the path under the folder (as training sees it), the real file."""

    name: str
    path: Path
    real: Path

    @property
    def caption_path(self) -> Path:
        return self.path.with_suffix(".txt")

    @property
    def mask_path(self) -> Path:
        return self.path.with_name(self.path.stem + MASK_SUFFIX)


def _folder_lock(root: Path) -> threading.Lock:
    """The lock of one data-set folder, held while its files change: an upload choosing a free name and taking
    it, a trash move, a caption write after checking that its image is still there (a caption racing a trash
    of its image left an orphan .txt 2 times in 25). Within this server; a second server on the workspace only
    serves the API of a user who is already here."""
    with _FOLDER_LOCKS_LOCK:
        return _FOLDER_LOCKS.setdefault(root, threading.Lock())


def _workspace(request: Request) -> Workspace:
    return request.app.state.workspace


def _check_name(name: str) -> PurePosixPath:
    """A name as the listing gives them: relative, posix, no `..` and nothing hidden (`.trash` included)."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part.startswith(".") for part in path.parts):
        raise PathRefused("path refused")
    return path


def _inside(ws: Workspace, folder: Path, path: Path) -> Path | None:
    """The real path of `path` (under `folder`) when the gate lets it through, else None."""
    try:
        return ws.resolve(path.relative_to(folder).as_posix(), under=folder)
    except (PathRefused, ValueError):  # ValueError: not even spelled as a path under `folder`
        return None


def _entry(ws: Workspace, folder: Path, name: str, *, masks: bool = False) -> _Entry:
    """The image `name` of the data set `folder`: PathRefused outside it, Missing when there is no such image
    (a mask counts only with `masks`)."""
    relative = _check_name(name)
    real = ws.resolve(relative.as_posix(), under=folder)
    # Its caption and mask sit beside the name, not the real file: that folder must lie inside too (a folder
    # link pointing out, holding a link back in, would otherwise let trash move files out of it).
    ws.resolve(relative.parent.as_posix(), under=folder)
    is_mask = name.endswith(MASK_SUFFIX)
    if not (real.is_file() and is_image_file(real) and is_image_file(Path(name))) or (is_mask and not masks):
        raise Missing(f"no such image: {name}")
    return _Entry(relative.as_posix(), folder.joinpath(*relative.parts), real)


def _entries(ws: Workspace, folder: Path) -> list[_Entry]:
    """The folder's images in training's order, less those whose real file lies outside the folder."""
    if not folder.is_dir():
        raise ConjureError(f"no such folder: {folder} (moved or deleted since it was opened?)")
    try:
        examples = scan_source(folder, check_images=False, confine=folder).examples
    except ConjureError:
        if _has_images(folder):  # a caption that is not UTF-8: say so
            raise
        return []  # an empty folder is a data set to upload into, not an error
    entries = []
    for example in examples:
        real = _inside(ws, folder, example.image)
        if real is not None:
            entries.append(_Entry(example.image.relative_to(folder).as_posix(), example.image, real))
    return entries


def _has_images(folder: Path) -> bool:
    return any(is_image_file(path) for path in folder.rglob("*")
               if not any(part.startswith(".") for part in path.relative_to(folder).parts))


def _read_caption(ws: Workspace, folder: Path, entry: _Entry) -> str | None:
    """The caption as training reads it (stripped), "" for a blank file, None without a file (or with one whose
    real path lies outside the folder)."""
    real = _inside(ws, folder, entry.caption_path)
    if real is None or not real.is_file():
        return None
    try:
        return real.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise ConjureError(f"{entry.caption_path}: caption file is not UTF-8 (bad byte at offset {error.start})") from None


def _caption_target(ws: Workspace, folder: Path, entry: _Entry) -> Path:
    """Where to write `entry`'s caption: the real caption file (PathRefused when it lies outside the folder)."""
    return ws.resolve(entry.caption_path.relative_to(folder).as_posix(), under=folder)


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) via a hidden temporary file beside it and a rename: readers see the old
    file or the new one. The file keeps its permissions; a new one gets the umask's."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(text.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        if path.exists():
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# --- the endpoints ----------------------------------------------------------------------------------


@router.get("", summary="The opened data sets")
def list_datasets(request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    return {"datasets": [{"path": str(folder), "images": _count(ws, folder)} for folder in ws.datasets()]}


def _count(ws: Workspace, folder: Path) -> int:
    try:
        return len(_entries(ws, folder))
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
    return {"path": str(folder), "images": len(_entries(ws, folder))}


@router.get("/images", summary="The images of a data set")
def images(folder: str, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    root = ws.dataset_root(folder)
    listed = []
    for entry in _entries(ws, root):
        try:
            height, width = image_size(entry.real)
        except ImageError:
            height = width = None
        mask = _inside(ws, root, entry.mask_path)
        listed.append({"name": entry.name, "caption": _read_caption(ws, root, entry), "width": width,
                       "height": height, "mask": mask is not None and mask.is_file()})
    return {"folder": str(root), "images": listed}


@router.get("/image", summary="An image file itself", response_class=FileResponse)
def image(folder: str, name: str, request: Request) -> FileResponse:
    ws = _workspace(request)
    entry = _entry(ws, ws.dataset_root(folder), name, masks=True)
    media_type = mimetypes.guess_type(entry.real.name)[0] or "application/octet-stream"
    return FileResponse(entry.real, media_type=media_type, headers={"Cache-Control": "no-cache"})


@router.get("/thumb", summary="A JPEG thumbnail (long side at most `size`)", response_class=FileResponse)
def thumb(folder: str, name: str, request: Request, size: int = 256) -> FileResponse:
    ws = _workspace(request)
    entry = _entry(ws, ws.dataset_root(folder), name, masks=True)
    if not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
        raise ConjureError(f"size: a thumbnail is {THUMB_SIZES[0]} to {THUMB_SIZES[1]} px, not {size}")
    cached = _thumbnail(ws, entry.real, size)
    return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})


def _thumbnail(ws: Workspace, image_path: Path, size: int) -> Path:
    """The cached thumbnail of `image_path`'s content at `size`, rendered on first use (upright, RGB)."""
    info = image_path.stat()
    digest = _file_digest(str(image_path), info.st_size, info.st_mtime_ns, info.st_ino)
    key = hashlib.sha256(f"{digest}:{size}".encode()).hexdigest()
    cached = ws.thumbs / key[:2] / f"{key}.jpg"
    if cached.is_file():
        return cached
    picture = load_image(image_path)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    cached.parent.mkdir(parents=True, exist_ok=True)
    temporary = cached.with_name(f".{key}.{uuid.uuid4().hex}.tmp")
    try:
        picture.save(temporary, format="JPEG", quality=85)
        os.replace(temporary, cached)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return cached


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """SHA-256 of a file's bytes; cached per (path, size, mtime, inode), so a changed file is read again."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@router.put("/caption", summary="Write an image's caption file")
def put_caption(body: CaptionBody, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    root = ws.dataset_root(body.folder)
    with _folder_lock(root):
        entry = _entry(ws, root, body.name)
        _write_atomically(_caption_target(ws, root, entry), body.caption)
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
    with _folder_lock(root):
        entries = [_entry(ws, root, name) for name in body.names] if body.names is not None else _entries(ws, root)
        targets = [(_caption_target(ws, root, entry), entry) for entry in entries]  # all refusals before any write
        changed = 0
        for target, entry in targets:
            old = _read_caption(ws, root, entry) if target.is_file() else None
            new = _edited(old, target, body)
            if new is not None:
                _write_atomically(target, new)
                changed += 1
    return {"changed": changed}


def _edited(old: str | None, target: Path, body: BulkBody) -> str | None:
    """The caption after `body`'s edit, or None when it stays as it is. Prefix and suffix are added to the
    stripped caption, once: a caption that already starts / ends with them, or is nothing else, is left alone
    (applying the same edit twice changes nothing). Replace edits the file's text as it is, and leaves images
    without a caption file alone."""
    if body.op == "replace":
        if old is None:
            return None
        raw = target.read_text(encoding="utf-8-sig")
        new = raw.replace(body.find, body.text)
        return new if new != raw else None
    old = old or ""
    if old == body.text.strip():
        return None
    if body.op == "prefix":
        return None if old.startswith(body.text) else body.text + old
    return None if old.endswith(body.text) else old + body.text


@router.get("/tags", summary="Tag counts over the captions")
def tags(folder: str, request: Request, delimiter: str = ",") -> dict[str, Any]:
    """Each caption is split at `delimiter`, parts stripped; a tag's count is how many captions hold it."""
    ws = _workspace(request)
    root = ws.dataset_root(folder)
    if not delimiter:
        raise ConjureError("delimiter: give the text that separates tags (e.g. ,)")
    counts: Counter[str] = Counter()
    for entry in _entries(ws, root):
        caption = _read_caption(ws, root, entry)
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
        files = form.getlist("files")
        if not files or not all(isinstance(file, UploadFile) for file in files):
            raise ConjureError("files: give one or more image files")
        added, refused = await run_in_threadpool(_save_uploads, root, files)
    if not added:
        reasons = "; ".join(f"{item['name']}: {item['reason']}" for item in refused)
        raise ConjureError(f"nothing added: {reasons}")
    return {"added": added, "refused": refused}


def _save_uploads(root: Path, files: list[UploadFile]) -> tuple[list[str], list[dict[str, str]]]:
    added, refused = [], []
    for file in files:
        original = file.filename or ""
        try:
            added.append(_save_upload(root, file))
        except ConjureError as error:
            refused.append({"name": original, "reason": str(error)})
    return added, refused


def _save_upload(root: Path, file: UploadFile) -> str:
    """Copy an uploaded image into `root` under a safe, unused name; ConjureError (the reason) when it is not
    an image, too large or has no usable name."""
    name = _safe_name(file.filename or "")
    file.file.seek(0, os.SEEK_END)
    if file.file.tell() > MAX_UPLOAD_BYTES:
        raise ConjureError(f"over {MAX_UPLOAD_BYTES // 2**20} MB")
    file.file.seek(0)
    temporary = root / f".upload-{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "xb") as out:
            shutil.copyfileobj(file.file, out)
        try:
            load_image(temporary)
            with Image.open(temporary) as opened:
                image_format = opened.format
        except ImageError as error:
            raise ConjureError(str(error).removeprefix(f"{temporary}: ")) from None
        stem, suffix = _split(name)
        if suffix.lower() not in IMAGE_EXTENSIONS:
            if image_format not in _FORMAT_SUFFIX:
                raise ConjureError(f"a {image_format} image: training reads {', '.join(sorted(IMAGE_EXTENSIONS))}")
            suffix = _FORMAT_SUFFIX[image_format]
        with _folder_lock(root):
            final = _free_name(root, stem, suffix)
            os.replace(temporary, final)
        return final.name
    finally:
        temporary.unlink(missing_ok=True)


def _safe_name(filename: str) -> str:
    """A plain file name from an uploaded one: its last path part, printable, without characters Windows
    refuses or `%` (the gate refuses names with percent-encodings), without leading dots (no hidden files) or
    trailing dots and spaces, not a Windows device name."""
    base = unicodedata.normalize("NFC", re.split(r"[\\/]", filename)[-1])
    base = "".join(ch for ch in base if ch.isprintable() and ch not in '<>:"|?*%').strip().lstrip(".").rstrip(". ")
    stem, suffix = _split(base)
    stem = stem[:120].strip()
    if not stem:
        raise ConjureError("no usable file name")
    if stem.upper() in _WINDOWS_RESERVED:
        stem = f"_{stem}"
    return stem + suffix


def _split(name: str) -> tuple[str, str]:
    path = PurePosixPath(name)
    return (path.stem, path.suffix) if path.stem else (name, "")


def _free_name(root: Path, stem: str, suffix: str) -> Path:
    """`stem + suffix`, else `stem-1 + suffix`, ...: the first name no file takes and whose stem no image or
    caption file of `root` uses (an image sharing a stem would share its caption file). Call under the lock."""
    taken = {entry.name.lower() for entry in os.scandir(root)}
    stems = {PurePosixPath(n).stem for n in taken if PurePosixPath(n).suffix in (*IMAGE_EXTENSIONS, ".txt")}
    for n in range(100_000):
        candidate = stem if n == 0 else f"{stem}-{n}"
        if f"{candidate}{suffix}".lower() not in taken and candidate.lower() not in stems:
            return root / f"{candidate}{suffix}"
    raise ConjureError(f"no free name for {stem}{suffix}")


@router.post("/trash", summary="Move images (with caption and mask) into the folder's .trash")
def trash(body: TrashBody, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    root = ws.dataset_root(body.folder)
    moved = []
    with _folder_lock(root):
        entries = [_entry(ws, root, name) for name in body.names]  # every refusal before any move
        for entry in entries:
            if not entry.path.exists() and not entry.path.is_symlink():
                continue  # listed twice, moved already
            files = [path for path in (entry.path, entry.caption_path, entry.mask_path)
                     if path.exists() or path.is_symlink()]
            for path, destination in zip(files, _trash_names(ws, root, entry, files)):
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)  # the entry itself: a symlink moves as the link
            moved.append(entry.name)
    return {"moved": moved}


def _trash_names(ws: Workspace, root: Path, entry: _Entry, files: list[Path]) -> list[Path]:
    """Where `files` (an image and its caption and mask) go in the trash: the same relative place under
    `.trash/`, with one suffix -1, -2, ... for all of them when any of those names is taken. The trash folder
    must lie inside the data set (a `.trash` link pointing out is refused)."""
    relative = entry.path.relative_to(root)
    folder = ws.resolve((PurePosixPath(TRASH) / relative.parent.as_posix()).as_posix(), under=root)
    stem = entry.path.stem
    for n in range(100_000):
        new_stem = stem if n == 0 else f"{stem}-{n}"
        destinations = [folder / (new_stem + path.name[len(stem):]) for path in files]
        if not any(d.exists() or d.is_symlink() for d in destinations):
            return destinations
    raise ConjureError(f"no free name in the trash for {entry.name}")


@router.post("/jsonl", summary="Write the data set as a .jsonl source inside its folder")
def jsonl(body: JsonlBody, request: Request) -> dict[str, Any]:
    ws = _workspace(request)
    root = ws.dataset_root(body.folder)
    out = ws.resolve(_check_name(body.out).as_posix(), under=root)
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
