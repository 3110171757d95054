"""The `sharing` table of `conjure inspect`: what a file tells whoever it is shared with (issue 24), from the keys
kohya sd-scripts (train_network.py), the additional-networks extension (sshs_*) and the model spec write."""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from collections.abc import Callable, Mapping

__all__ = ["sharing_lines"]


def _when(stamp: str | None) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(stamp or ""), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return "?"


def _json(meta: Mapping[str, str], key: str) -> dict:
    try:
        value = json.loads(meta.get(key, "{}"))
    except ValueError:
        return {}  # another tool's malformed value loses its line only
    return value if isinstance(value, dict) else {}


def _base(meta: Mapping[str, str]) -> str | None:
    name = meta.get("ss_sd_model_name") or meta.get("conjure.base_model")
    if not name:
        return None
    hashes = [f"{label} {meta[k]}" for label, k in (("sha256", "ss_new_sd_model_hash"), ("legacy", "ss_sd_model_hash"))
              if k in meta]
    return name + (f" ({', '.join(hashes)})" if hashes else "")


def _trained(meta: Mapping[str, str]) -> str | None:
    if "ss_training_started_at" not in meta:
        return None
    span = f"{_when(meta['ss_training_started_at'])} to {_when(meta.get('ss_training_finished_at'))}"
    return f"{span}, {meta.get('ss_steps', '?')} steps, epoch {meta.get('ss_epoch', '?')} of {meta.get('ss_num_epochs', '?')}"


def _data(meta: Mapping[str, str]) -> str | None:
    dirs = _json(meta, "ss_dataset_dirs")
    folders = [f"{name} ({info.get('img_count', '?')} images x {info.get('n_repeats', '?')})"
               for name, info in dirs.items() if isinstance(info, dict)]
    tags: Counter[str] = Counter()
    for folder in _json(meta, "ss_tag_frequency").values():
        if isinstance(folder, dict):
            tags.update({str(t): n for t, n in folder.items() if isinstance(n, int)})
    top = ", ".join(f"{t} ({n})" for t, n in tags.most_common(8))
    if not folders and not top:
        return None
    return "; ".join(part for part in (", ".join(folders), f"tags {top}" if top else "") if part)


SETTINGS = (("batch", "ss_total_batch_size"), ("lr", "ss_learning_rate"), ("unet lr", "ss_unet_lr"),
            ("text encoder lr", "ss_text_encoder_lr"), ("scheduler", "ss_lr_scheduler"), ("optimizer", "ss_optimizer"),
            ("precision", "ss_mixed_precision"), ("seed", "ss_seed"), ("clip skip", "ss_clip_skip"),
            ("noise offset", "ss_noise_offset"), ("min-SNR gamma", "ss_min_snr_gamma"))


def _settings(meta: Mapping[str, str]) -> str | None:
    parts = [f"{label} {meta[k]}" for label, k in SETTINGS if meta.get(k) not in (None, "None")]
    return ", ".join(parts) or None


def _hashes(meta: Mapping[str, str]) -> str | None:
    keys = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
    return ", ".join(f"{k} {meta[k]}" for k in keys if k in meta) or None


ROWS: tuple[tuple[str, Callable[[Mapping[str, str]], str | None]], ...] = (
    ("base model", _base), ("trained", _trained), ("data", _data), ("settings", _settings),
    ("trigger", lambda m: m.get("modelspec.trigger_phrase")),
    ("description", lambda m: m.get("modelspec.description")), ("hashes", _hashes),
)


def sharing_lines(meta: Mapping[str, str]) -> list[str]:
    """One line per fact the header states; nothing when it states none of them."""
    rows = [(label, value) for label, read in ROWS if (value := read(meta))]
    if not rows:
        return []
    return ["sharing", *(f"  {label:<12} {value}" for label, value in rows)]
