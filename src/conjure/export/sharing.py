"""What a file conjure writes for others carries in its header, and what it must not (issue 24).

- `shareable(metadata, level)`: the one rule every shared header goes through: models named by hub id or file
  name, never by a local path, and only the keys `export.metadata` (full | minimal | none) keeps.
- `finish_shared_file(path, extra, level)`: that header written onto a file already on disk, with the file's own
  hashes computed on its final bytes (`file_hashes`).
- `base_file_hashes(path)`: the two hashes kohya writes of the base model file, computed once per file (cached
  by path, size and modification time in `conjure.files.cache_dir()`), with a progress bar.

The hashes, as their readers compute them (all read 2026-12):
- `sshs_model_hash`: sha256 of the bytes after the header (kohya-ss/sd-webui-additional-networks
  scripts/safetensors_hack.py hash_file, commit 272029d5; kohya sd-scripts library/train_util.py
  addnet_hash_safetensors, commit 48d368fa). A1111's built-in Lora extension hashes LoRA files the same way
  (`use_addnet_hash`). Rewriting the header moves the data but never changes it, so the hash of the final file is
  the hash of the data as first written.
- `sshs_legacy_hash`: the extension's legacy_hash_file: the tensors written again with only the `ss_*` keys
  (safetensors.torch.save), and sha256 of bytes 0x100000..0x110000 of that, first 8 hex digits. Where that range
  would reach into the rewritten header (a header over 1 MiB), the value would depend on the order safetensors
  writes the keys in: left out, so the reader computes it itself.
- `modelspec.hash_sha256`: "0x" + sha256 of the bytes after the header (the model spec's reference code, as kohya
  library/sai_model_spec.py quotes it, 48d368fa).
- Base model: `ss_new_sd_model_hash` sha256 of the whole file and `ss_sd_model_hash` A1111's old
  sd_models.model_hash (sha256 of bytes 0x100000..0x110000, 8 hex digits): kohya train_util.py calculate_sha256 and
  model_hash, written by train_network.py only when the model is a file. A folder or a hub id has no file that any
  reader hashes (kohya writes "IsADirectory" for a folder): no hash is written for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

from conjure.errors import ConjureError
from conjure.files import atomic_write_text, cache_dir, read_safetensors_header, replacing

LEVELS = ("full", "minimal", "none")
HASH_KEYS = ("modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash")
LEGACY_RANGE = (0x100000, 0x110000)
# kohya library/train_util.py SS_METADATA_MINIMUM_KEYS (48d368fa): what its --no_metadata keeps, as loaders read it
KOHYA_MINIMUM = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                 "ss_network_args")
# What loading the file needs, whatever the level: kohya's minimum, diffusers' PEFT adapter config
# (`lora_adapter_metadata`, export/peft.py) and transformers' `format`, the model spec's required keys and the
# `conjure.*` keys conjure's own readers use (the kohya layout, a pivotal pair's links, the file's family).
LOAD_KEYS = frozenset(KOHYA_MINIMUM + (
    "format", "lora_adapter_metadata", "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.prediction_type", "conjure.version", "conjure.family", "conjure.method",
    "conjure.unet_layers_per_block", "conjure.unet_up_block_attention", "conjure.kohya_alpha_dtype",
    "conjure.pivotal_token", "conjure.pivotal_embedding", "conjure.pivotal_lora", "conjure.placeholder_token",
    "conjure.num_vectors",
))
# The training record that `minimal` leaves out: kohya's ss_* keys beyond its minimum, the base model and what a
# merge or bake was made from.
RECORD_KEYS = frozenset({"conjure.base_model", "conjure.merge", "conjure.baked_loras"})
# Values that name a model: a local path becomes its file or folder name
MODEL_NAME_KEYS = frozenset({"conjure.base_model", "ss_sd_model_name", "ss_vae_name"})


def model_name(model: str) -> str:
    """A hub id as it is; a local file or folder by its name (a path would tell the user's folders)."""
    from conjure.models.loading import HUB_ID

    path = Path(model).expanduser()
    if HUB_ID.match(model) and not path.exists():
        return model
    return path.name or model


def kept(key: str, level: str) -> bool:
    """Whether `export.metadata: level` keeps the header key `key`."""
    if level == "full" or key in LOAD_KEYS:
        return True
    if level == "none":
        return False
    return key not in RECORD_KEYS and not (key.startswith("ss_") and key not in ("ss_output_name",))


def shareable(metadata: Mapping[str, str], level: str = "full") -> dict[str, str]:
    """`metadata` as a shared file may carry it: the keys `level` keeps, models named by name, and any value
    that is a whole absolute path (a header from elsewhere, a converted file's) by its last part."""
    if level not in LEVELS:
        raise ConjureError(f"export.metadata: one of {', '.join(LEVELS)}, not {level!r}")
    out = {}
    for key, value in metadata.items():
        if not kept(key, level):
            continue
        if key in MODEL_NAME_KEYS or (os.path.isabs(value) and "\n" not in value):
            value = model_name(value)
        out[key] = value
    return out


# --- hashing ---------------------------------------------------------------------------------------
def _read_header(path: Path) -> tuple[int, dict]:
    try:
        return read_safetensors_header(path)
    except (OSError, ValueError) as exc:
        raise ConjureError(f"cannot read {path} as a safetensors file: {exc}") from None


def _sha256(path: Path, start: int = 0, *, bar: bool = False) -> str:
    from tqdm import tqdm

    digest, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size - start, unit="B", unit_scale=True, desc=f"hashing {path.name}",
                                     disable=not bar, leave=False) as progress:
        f.seek(start)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            progress.update(len(chunk))
    return digest.hexdigest()


def _legacy_hash(path: Path, metadata: Mapping[str, str]) -> str | None:
    """The additional-networks extension's legacy hash (module docstring); None where its range would reach into
    the header."""
    import safetensors.torch

    written = safetensors.torch.save(safetensors.torch.load_file(str(path)),
                                     {k: v for k, v in metadata.items() if k.startswith("ss_")})
    if 8 + int.from_bytes(written[:8], "little") > LEGACY_RANGE[0]:
        return None
    return hashlib.sha256(written[LEGACY_RANGE[0]:LEGACY_RANGE[1]]).hexdigest()[:8]


def file_hashes(path: Path, metadata: Mapping[str, str], data_start: int) -> dict[str, str]:
    """The hashes a file's header states of the file itself: the model spec's, and for a LoRA (a header with
    `ss_network_module`) the additional-networks extension's two."""
    digest = _sha256(path, data_start)
    hashes = {"modelspec.hash_sha256": f"0x{digest}"}
    if "ss_network_module" in metadata:
        hashes["sshs_model_hash"] = digest
        legacy = _legacy_hash(path, metadata)
        if legacy is not None:
            hashes["sshs_legacy_hash"] = legacy
    return hashes


def finish_shared_file(path: Path, extra: Mapping[str, str] | None = None, level: str = "full") -> dict[str, str]:
    """Rewrite the header of the safetensors file `path` (atomically) as it is shared: its metadata, and `extra`
    where it has no such key (the `ss_*` keys of `extra` for a LoRA only, since apps take a file with them for one), through
    `shareable`, and its own hashes (every level but none). Returns the metadata written.

    The header is written compact, padded with spaces to 8 bytes as safetensors pads it; the tensors' offsets
    count from the end of the header, so a longer or shorter header leaves them right."""
    path = Path(path)
    n, header = _read_header(path)
    own = dict(header.pop("__metadata__", None) or {})
    lora = "ss_network_module" in own
    meta = shareable({**{k: v for k, v in (extra or {}).items() if lora or not k.startswith("ss_")}, **own}, level)
    for key in HASH_KEYS:
        meta.pop(key, None)  # a converted file's: they were of other bytes
    if level != "none":
        meta.update(file_hashes(path, meta, 8 + n))
    raw = json.dumps({"__metadata__": meta, **header}, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with replacing(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(raw)) + raw)
        src.seek(8 + n)
        shutil.copyfileobj(src, dst, 1 << 20)
    return meta


def base_file_hashes(model: str) -> dict[str, str]:
    """kohya's `ss_sd_model_hash` and `ss_new_sd_model_hash` of a base model file (module docstring); nothing for a
    folder or a hub id. Cached by the file's resolved path, size and modification time, so a multi-GB checkpoint
    is read once, however many runs train on it."""
    path = Path(model).expanduser()
    if not path.is_file():
        return {}
    path, stat = path.resolve(), path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir() / "model-hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        with open(path, "rb") as f:
            f.seek(LEGACY_RANGE[0])
            legacy = hashlib.sha256(f.read(LEGACY_RANGE[1] - LEGACY_RANGE[0])).hexdigest()[:8]
        cache[key] = {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": _sha256(path, bar=True)}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=1))
    return dict(cache[key])
