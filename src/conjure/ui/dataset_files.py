"""The files of an opened data set, as the data-set tab changes them (its routes: conjure.ui.datasets): images
found as training finds them, captions read and written atomically, thumbnails, uploads and the trash.

Every `name` is a posix path inside the folder (relative, no `..`, no hidden part) that
`Workspace.resolve(name, under=folder)` accepts, else PathRefused; an image whose real file lies outside the
folder (a symlink pointing out) is not listed and cannot be addressed. Captions follow training's rules
(`<stem>.txt` beside the image, UTF-8 with or without a byte-order mark).

Nothing here deletes a user's file: captions are replaced atomically (temporary file + rename), uploads never
overwrite, trash moves files into `<folder>/.trash/`. Thumbnails are written to the workspace's cache only.
Changes to one folder's files hold its lock (`folder_lock`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from PIL import Image
from starlette.datastructures import UploadFile

from conjure.data.images import IMAGE_EXTENSIONS, ImageError, is_image_file, load_image
from conjure.data.sources import MASK_SUFFIX, scan_source
from conjure.errors import ConjureError
from conjure.files import atomic_write, atomic_write_text, new_temporary, publish
from conjure.ui.workspace import NotFound, PathRefused, Workspace

TRASH = ".trash"
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
"""Largest file an upload takes (a photo is a few MB; anything this big is a mistake or an attack)."""
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_FORMAT_SUFFIX = {"MPO": ".jpg", **{fmt: suffix for suffix, fmt in reversed(Image.registered_extensions().items())
                                    if suffix in IMAGE_EXTENSIONS}}
"""PIL format -> the file suffix an upload without an image suffix gets (the first one PIL registers)."""
_FOLDER_LOCKS: dict[Path, threading.Lock] = {}
_FOLDER_LOCKS_LOCK = threading.Lock()


class Missing(NotFound):
    """No such image in the data set (404)."""


@dataclass(frozen=True)
class Entry:
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


def folder_lock(root: Path) -> threading.Lock:
    """The lock of one data-set folder, held while its files change: an upload choosing a free name and taking
    it, a trash move, a caption write after checking that its image is still there (a caption racing a trash
    of its image left an orphan .txt 2 times in 25). Within this server; a second server on the workspace only
    serves the API of a user who is already here."""
    with _FOLDER_LOCKS_LOCK:
        return _FOLDER_LOCKS.setdefault(root, threading.Lock())


# --- finding images and captions ----------------------------------------------------------------------


def check_name(name: str) -> PurePosixPath:
    """A name as the listing gives them: relative, posix, no `..` and nothing hidden (`.trash` included)."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part.startswith(".") for part in path.parts):
        raise PathRefused("path refused")
    return path


def inside(ws: Workspace, folder: Path, path: Path) -> Path | None:
    """The real path of `path` (under `folder`) when the gate lets it through, else None."""
    try:
        return ws.resolve(path.relative_to(folder).as_posix(), under=folder)
    except (PathRefused, ValueError):  # ValueError: not even spelled as a path under `folder`
        return None


def entry(ws: Workspace, folder: Path, name: str, *, masks: bool = False) -> Entry:
    """The image `name` of the data set `folder`: PathRefused outside it, Missing when there is no such image
    (a mask counts only with `masks`)."""
    relative = check_name(name)
    real = ws.resolve(relative.as_posix(), under=folder)
    # Its caption and mask sit beside the name, not the real file: that folder must lie inside too (a folder
    # link pointing out, holding a link back in, would otherwise let trash move files out of it).
    ws.resolve(relative.parent.as_posix(), under=folder)
    is_mask = name.endswith(MASK_SUFFIX)
    if not (real.is_file() and is_image_file(real) and is_image_file(Path(name))) or (is_mask and not masks):
        raise Missing(f"no such image: {name}")
    return Entry(relative.as_posix(), folder.joinpath(*relative.parts), real)


def entries(ws: Workspace, folder: Path) -> list[Entry]:
    """The folder's images in training's order, less those whose real file lies outside the folder."""
    if not folder.is_dir():
        raise ConjureError(f"no such folder: {folder} (moved or deleted since it was opened?)")
    try:
        examples = scan_source(folder, check_images=False, confine=folder).examples
    except ConjureError:
        if _has_images(folder):  # a caption that is not UTF-8: say so
            raise
        return []  # an empty folder is a data set to upload into, not an error
    found = []
    for example in examples:
        real = inside(ws, folder, example.image)
        if real is not None:
            found.append(Entry(example.image.relative_to(folder).as_posix(), example.image, real))
    return found


def _has_images(folder: Path) -> bool:
    return any(is_image_file(path) for path in folder.rglob("*")
               if not any(part.startswith(".") for part in path.relative_to(folder).parts))


def read_caption(ws: Workspace, folder: Path, image: Entry) -> str | None:
    """The caption as training reads it (stripped), "" for a blank file, None without a file (or with one whose
    real path lies outside the folder)."""
    real = inside(ws, folder, image.caption_path)
    if real is None or not real.is_file():
        return None
    try:
        return real.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise ConjureError(
            f"{image.caption_path}: caption file is not UTF-8 (bad byte at offset {error.start})") from None


# --- captions -------------------------------------------------------------------------------------------


def set_caption(ws: Workspace, root: Path, name: str, caption: str) -> Entry:
    """Write the caption file of the image `name`, under the folder's lock: its image is still there."""
    with folder_lock(root):
        image = entry(ws, root, name)
        atomic_write_text(_caption_target(ws, root, image), caption)
    return image


def edit_captions(ws: Workspace, root: Path, names: list[str] | None, edit: CaptionEdit) -> int:
    """Apply `edit` to the captions of the images `names` (None: every image); how many files changed. Every
    name is checked before any file is written."""
    with folder_lock(root):
        images = [entry(ws, root, name) for name in names] if names is not None else entries(ws, root)
        targets = [(_caption_target(ws, root, image), image) for image in images]
        changed = 0
        for target, image in targets:
            old = read_caption(ws, root, image) if target.is_file() else None
            new = edit.apply(old, target)
            if new is not None:
                atomic_write_text(target, new)
                changed += 1
    return changed


@dataclass(frozen=True)
class CaptionEdit:
    """A bulk edit: add `text` as a prefix or suffix, or replace `find` by `text`."""

    op: str
    text: str
    find: str | None = None

    def apply(self, old: str | None, target: Path) -> str | None:
        """The caption after the edit, or None when it stays as it is. Prefix and suffix are added to the
        stripped caption, once: a caption that already starts / ends with them, or is nothing else, is left
        alone (applying the same edit twice changes nothing). Replace edits the file's text as it is, and leaves
        images without a caption file alone."""
        if self.op == "replace":
            if old is None or self.find is None:
                return None
            raw = target.read_text(encoding="utf-8-sig")
            new = raw.replace(self.find, self.text)
            return new if new != raw else None
        old = old or ""
        if old == self.text.strip():
            return None
        if self.op == "prefix":
            return None if old.startswith(self.text) else self.text + old
        return None if old.endswith(self.text) else old + self.text


def _caption_target(ws: Workspace, folder: Path, image: Entry) -> Path:
    """Where to write `image`'s caption: the real caption file (PathRefused when it lies outside the folder)."""
    return ws.resolve(image.caption_path.relative_to(folder).as_posix(), under=folder)


# --- thumbnails -----------------------------------------------------------------------------------------


def thumbnail(ws: Workspace, image_path: Path, size: int) -> Path:
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
    atomic_write(cached, lambda tmp: picture.save(tmp, format="JPEG", quality=85))
    return cached


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """SHA-256 of a file's bytes; cached per (path, size, mtime, inode), so a changed file is read again."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- uploads --------------------------------------------------------------------------------------------


def save_uploads(root: Path, files: list[UploadFile]) -> tuple[list[str], list[dict[str, str]]]:
    """Copy uploaded images into `root`: (the names they got, [{"name", "reason"}] of those refused)."""
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
    name = safe_name(file.filename or "")
    file.file.seek(0, os.SEEK_END)
    if file.file.tell() > MAX_UPLOAD_BYTES:
        raise ConjureError(f"over {MAX_UPLOAD_BYTES // 2**20} MB")
    file.file.seek(0)
    temporary = new_temporary(root, "upload")
    try:
        with open(temporary, "wb") as out:
            shutil.copyfileobj(file.file, out)
        stem, suffix = _split(name)
        suffix = _image_suffix(temporary, suffix)
        with folder_lock(root):
            final = _free_name(root, stem, suffix)
            publish(temporary, final)
        return final.name
    finally:
        temporary.unlink(missing_ok=True)


def _image_suffix(temporary: Path, suffix: str) -> str:
    """`suffix` when it is an image's, else the one of the uploaded image's format; ConjureError when the file
    is no image training reads."""
    try:
        load_image(temporary)
        with Image.open(temporary) as opened:
            image_format = opened.format
    except ImageError as error:
        raise ConjureError(str(error).removeprefix(f"{temporary}: ")) from None
    if suffix.lower() in IMAGE_EXTENSIONS:
        return suffix
    if image_format not in _FORMAT_SUFFIX:
        raise ConjureError(f"a {image_format} image: training reads {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return _FORMAT_SUFFIX[image_format]


def safe_name(filename: str) -> str:
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
    taken = {item.name.lower() for item in os.scandir(root)}
    stems = {PurePosixPath(n).stem for n in taken if PurePosixPath(n).suffix in (*IMAGE_EXTENSIONS, ".txt")}
    for n in range(100_000):
        candidate = stem if n == 0 else f"{stem}-{n}"
        if f"{candidate}{suffix}".lower() not in taken and candidate.lower() not in stems:
            return root / f"{candidate}{suffix}"
    raise ConjureError(f"no free name for {stem}{suffix}")


# --- the trash ------------------------------------------------------------------------------------------


def trash(ws: Workspace, root: Path, names: list[str]) -> list[str]:
    """Move the images `names` (with caption and mask) into the folder's trash; the names moved. Every name is
    checked before anything moves."""
    moved = []
    with folder_lock(root):
        images = [entry(ws, root, name) for name in names]
        for image in images:
            if not image.path.exists() and not image.path.is_symlink():
                continue  # listed twice, moved already
            files = [path for path in (image.path, image.caption_path, image.mask_path)
                     if path.exists() or path.is_symlink()]
            for path, destination in zip(files, _trash_names(ws, root, image, files)):
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)  # the entry itself: a symlink moves as the link
            moved.append(image.name)
    return moved


def _trash_names(ws: Workspace, root: Path, image: Entry, files: list[Path]) -> list[Path]:
    """Where `files` (an image and its caption and mask) go in the trash: the same relative place under
    `.trash/`, with one suffix -1, -2, ... for all of them when any of those names is taken. The trash folder
    must lie inside the data set (a `.trash` link pointing out is refused)."""
    relative = image.path.relative_to(root)
    folder = ws.resolve((PurePosixPath(TRASH) / relative.parent.as_posix()).as_posix(), under=root)
    stem = image.path.stem
    for n in range(100_000):
        new_stem = stem if n == 0 else f"{stem}-{n}"
        destinations = [folder / (new_stem + path.name[len(stem):]) for path in files]
        if not any(d.exists() or d.is_symlink() for d in destinations):
            return destinations
    raise ConjureError(f"no free name in the trash for {image.name}")
