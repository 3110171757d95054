"""One training example, the record every source (folder, `.jsonl`, Hugging Face data set) produces.

Its own module so that `conjure.data.sources` and `conjure.data.hf` both import it from below instead of
from each other.
"""

from dataclasses import dataclass
from pathlib import Path

PROGRESS_MIN_IMAGES = 50
"""Checking more images than this shows a progress bar; fewer finish too fast to need one."""


@dataclass(frozen=True)
class Example:
    """One training image and its caption; `caption` is None when there is none (no caption file or
    field, or only whitespace in it). `loss_weight` multiplies its loss; `is_class`: a class
    (regularisation) image, whose caption is used as it is; `mask`: a greyscale image weighting its loss
    per pixel (white counts, black does not), or None."""

    image: Path
    caption: str | None
    loss_weight: float = 1.0
    is_class: bool = False
    mask: Path | None = None


def caption_of(text: str | None) -> str | None:
    """None for a missing or blank caption, else the caption stripped."""
    if text is None or not text.strip():
        return None
    return text.strip()
