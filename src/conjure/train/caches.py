"""Caches that skip repeated work of frozen parts: VAE latents (in memory or on disk) and text-encoder outputs.

Latents. The cache holds the VAE posterior's (mean, std) of each prepared image, not a sampled latent: every
step still samples `mean + std * noise` with the run's generator, so a cached run draws exactly the random
numbers an uncached one does and resume stays exact. An entry is keyed by the image file's content (SHA-256),
its training size, crop and flip, and the VAE's identity (source, config, dtype and a checksum of its
weights): a changed image, setting or model never reuses a stale entry, and an unchanged one is reused across
runs (disk). Random crops make every epoch's pixels different, so they are refused (see config); flips are
two entries per image. Disk entries are one safetensors file each, written atomically under
`<cache_dir>/latents/<vae id>/`; nothing is ever written into the user's data folders.

Text-encoder outputs. When no text encoder trains, a caption's conditioning depends only on its text (and, for
SDXL, the per-image size ids, which are computed apart), so the encoders' outputs are kept in memory per caption
text. Dropped-out captions add one entry (""); shuffled captions would add one per order, so config validation
refuses caching them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from conjure.errors import ConjureError
from conjure.files import save_safetensors_atomically


def file_digest(path: Path, _memo: dict[tuple[str, int, int], str] = {}) -> str:  # noqa: B006 - per process memo
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) within the process."""
    stat = Path(path).stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _memo[memo_key] = digest.hexdigest()
    return _memo[memo_key]


def vae_identity(vae: Any, source: str) -> str:
    """A short id of the VAE as it encodes: where it came from, its config, its dtype, and its weights."""
    with torch.no_grad():
        checksum = sum(float(p.detach().double().abs().sum()) + 1e-3 * float(p.detach().double().sum())
                       for p in vae.encoder.parameters())
    facts = {"source": source, "config": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
             "dtype": str(vae.dtype), "weights": f"{checksum:.10e}"}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LatentCache:
    """`posteriors(batch, encode)`: the (mean, std) of each item of a collated batch, from the cache where it
    has them, else from `encode(pixels) -> (mean, std)` for the missing items only (then kept)."""

    def __init__(self, mode: str, *, vae_id: str, folder: Path | None = None):
        if mode not in ("memory", "disk"):
            raise ValueError(f"latent cache mode must be memory or disk, got {mode!r}")
        if mode == "disk" and folder is None:
            raise ValueError("a disk latent cache needs a folder")
        self.mode, self.vae_id = mode, vae_id
        self.folder = Path(folder) / "latents" / vae_id if folder is not None else None
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def key(self, image: Path, target_size: tuple[int, int], crop: tuple[int, int], flipped: bool) -> str:
        facts = [file_digest(image), list(target_size), list(crop), bool(flipped), self.vae_id, "v1"]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    def _load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if key in self.memory:
            return self.memory[key]
        if self.mode == "disk" and self._path(key).is_file():
            from safetensors.torch import load_file

            try:
                stored = load_file(str(self._path(key)))
                entry = (stored["mean"], stored["std"])
            except Exception:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
                return None
            self.memory[key] = entry
            return entry
        return None

    def _store(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        entry = (mean.detach().cpu().clone(), std.detach().cpu().clone())
        self.memory[key] = entry
        if self.mode == "disk":
            from safetensors import SafetensorError

            path = self._path(key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_safetensors_atomically({"mean": entry[0].contiguous(), "std": entry[1].contiguous()}, path, {})
            except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConjureError(
                    f"data.cache_latents: cannot write the latent cache in {self.folder} ({reason}); free some "
                    "space, set data.cache_dir to a folder on another disk, or use cache_latents: memory"
                ) from None

    def posteriors(
        self, keys: list[str], pixels: torch.Tensor, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        found = [self._load(k) for k in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            mean, std = encode(pixels[missing])
            for j, i in enumerate(missing):
                self._store(keys[i], mean[j], std[j])
                found[i] = self.memory[keys[i]]
        complete = cast(list[tuple[torch.Tensor, torch.Tensor]], found)  # every None was filled above
        return torch.stack([f[0] for f in complete]), torch.stack([f[1] for f in complete])


class TextCache:
    """Conditioning per caption text for frozen text encoders: `encode(captions)` computes only the new ones.
    Entries are kept in CPU memory (FLUX.1's T5 output is 4-8 MB a caption) and handed out on `device`."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, captions: list[str], encode: Callable[[list[str]], dict[str, torch.Tensor]],
            device: torch.device | None = None) -> dict[str, torch.Tensor]:
        new = list(dict.fromkeys(c for c in captions if c not in self.entries))
        if new:
            out = encode(new)
            for i, caption in enumerate(new):
                self.entries[caption] = {k: v[i].detach().cpu() for k, v in out.items()}
        stacked = {k: torch.stack([self.entries[c][k] for c in captions]) for k in self.entries[captions[0]]}
        return stacked if device is None else {k: v.to(device) for k, v in stacked.items()}
