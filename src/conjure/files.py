"""Writing files that apps load: atomically, so a crash or a full disk leaves the old file or the new one, never
half a file. Every safetensors writer of conjure (embeddings, LoRA, latent caches) goes through `save_atomically`;
`conjure export` copies through `copy_to_temporary`.

A new file gets the mode of any file the user creates (0666 less the umask): `tempfile.mkstemp` makes 0600 files,
which an app running as another user (a ComfyUI container, a shared A1111) cannot read.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def new_temporary(folder: Path, name: str) -> Path:
    """A new empty file `.tmp-<random>-<name>.part` in `folder`, made with 0666 less the umask as `open()` makes
    files. The `.part` ending keeps it out of the apps' model lists while it is written."""
    while True:
        path = Path(folder) / f".tmp-{secrets.token_hex(4)}-{name}.part"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def _flush(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write; flushed to the disk and renamed onto `path` when
    the block succeeds (an old file is replaced only then), removed when it fails."""
    path = Path(path)
    tmp = new_temporary(path.parent, path.name)
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        # safetensors (0.8) writes its own temporary file (mode 0600) and renames it onto ours: give it back the
        # mode the umask gave ours.
        os.chmod(tmp, mode)
        _flush(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write `tensors` with string `metadata` to a temporary file beside `path`, then rename it into place."""
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def copy_to_temporary(src: Path, folder: Path, name: str) -> Path:
    """A complete copy of `src`, flushed to the disk, in a new temporary file of `folder`, for the caller to
    `os.replace` onto `folder / name`; nothing is left on failure. Its mode is a new file's, not the source's."""
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
