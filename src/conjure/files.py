"""Writing files atomically, so that a crash or a full disk leaves the old file or the new one, never half a file.
Every write of conjure whose reader could see it half-done goes through here: app files (embeddings, LoRA,
latent caches, `save_safetensors_atomically`), checkpoint folders (`atomic_folder`), the web app's captions,
configs and thumbnails, `conjure dataset jsonl`, `conjure export` (`copy_to_temporary`, then `publish`).

One rule: a temporary `.tmp-<random>-<name>.part` in the target's folder (unique, so two writers never share
one; the `.part` ending keeps it out of the apps' model lists), flushed to the disk, renamed onto the target,
removed if anything fails. Its mode is what a plain write would leave: the replaced file's, or for a new file
0666 less the umask (`tempfile.mkstemp` makes 0600 files, which an app running as another user, a ComfyUI
container or a shared A1111, cannot read).

`cache_dir()` is the user-level folder of conjure's caches (a Hugging Face data set's images, the tokenizers
`models/tokenizer_cache.py` built).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _temporary_name(name: str) -> str:
    return f".tmp-{secrets.token_hex(4)}-{name}.part"


def new_temporary(folder: Path, name: str) -> Path:
    """A new empty file `.tmp-<random>-<name>.part` in `folder`, made with 0666 less the umask as `open()` makes
    files."""
    while True:
        path = Path(folder) / _temporary_name(name)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def _flush(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def publish(tmp: Path, path: Path) -> None:
    """Rename the complete temporary file `tmp` onto `path` (taking the mode of a file it replaces), after
    flushing it to the disk; `tmp` is removed if that fails."""
    try:
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        _flush(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write; flushed to the disk and renamed onto `path` when
    the block succeeds (an old file is replaced only then), removed when it fails."""
    path = Path(path)
    tmp = new_temporary(path.parent, path.name)
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        # The writer may have put its own file there: safetensors (0.8) writes a temporary file (mode 0600) and
        # renames it onto ours.
        os.chmod(tmp, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Replace `path` with what `write(tmp)` writes to a temporary file beside it (a PIL image's save, a
    library's writer that takes a path)."""
    with replacing(path) as tmp:
        write(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8, newlines as given."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write `tensors` with string `metadata` as a safetensors file at `path`."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """A .safetensors file's header length and JSON header (its "__metadata__" included), read with plain reads
    as the format's spec lays it out: an 8-byte little-endian length, the header, then the data. ValueError
    (OSError for the file itself) where the file is not one or is cut short."""
    import json

    with Path(path).open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= 100 * 2**20:  # the format's own limit on the header
            raise ValueError("not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError:  # json's errors and undecodable bytes
            raise ValueError("its safetensors header is cut short or corrupt") from None
    return length, header


def cache_dir() -> Path:
    """conjure's cache folder: `$CONJURE_CACHE_DIR`, else `$XDG_CACHE_HOME/conjure`, else `~/.cache/conjure`."""
    if os.environ.get("CONJURE_CACHE_DIR"):
        return Path(os.environ["CONJURE_CACHE_DIR"]).expanduser()
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "conjure"


def atomic_folder(path: Path, write: Callable[[Path], Any]) -> None:
    """Replace the folder `path` with what `write(tmp)` writes into a new temporary folder beside it, published
    by a rename once complete (files written with `atomic_write` are flushed; anything else is the caller's).
    The temporary folder is removed when `write` fails."""
    path = Path(path)
    tmp = path.parent / _temporary_name(path.name)
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():  # a rename cannot replace a folder that has files in it
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_to_temporary(src: Path, folder: Path, name: str) -> Path:
    """A complete copy of `src`, flushed to the disk, in a new temporary file of `folder`, for the caller to
    `publish` onto `folder / name`; nothing is left on failure. Its mode is a new file's, not the source's."""
    tmp = new_temporary(folder, name)
    try:
        with open(src, "rb") as source, open(tmp, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
            target.flush()
            os.fsync(target.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
