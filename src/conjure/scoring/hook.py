"""What a training session calls after each validation: the image scores of that validation's images, logged as
the `image_scores` event {step, fidelity, alignment, model} and as TensorBoard scalars (validation/fidelity,
validation/alignment).

`validation.image_scores`: "off" never loads a model; "on" loads `validation.score_model` (downloading it if
needed and allowed) and a failure stops the run before training; "auto" (the default) scores when the model
loads from files already on this machine and otherwise says in one line that scoring is off.

Fidelity compares with up to `MAX_REFERENCE_IMAGES` training images (not class images), taken evenly over the
data set's order and embedded once, at the first validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from conjure.data.images import ImageError, load_image
from conjure.errors import ConjureError
from conjure.runs.events import Event, EventLog
from conjure.scoring.scorer import Scorer, alignment, fidelity, load_scorer

if TYPE_CHECKING:
    from conjure.data.example import Example
    from conjure.train.settings import ValidationSettings

# A cap on what the first validation embeds (once per run): a CLIP of ViT-L/14's shape took 4-5 s per image on one
# thread of a busy 2-core machine (random weights, 2026-12-05), so 32 images cost it ~2.5 min. Every validation
# compares with the same images, so the cap leaves steps comparable.
MAX_REFERENCE_IMAGES = 32


def reference_images(examples: list[Example]) -> list[Path]:
    """The training images fidelity compares with: each file once, class images left out, at most
    `MAX_REFERENCE_IMAGES` taken evenly over the list."""
    paths = list(dict.fromkeys(e.image for e in examples if not e.is_class))
    if len(paths) <= MAX_REFERENCE_IMAGES:
        return paths
    return [paths[i * len(paths) // MAX_REFERENCE_IMAGES] for i in range(MAX_REFERENCE_IMAGES)]


@dataclass
class ImageScoring:
    """The scorer of one run; `alignment_prompts`: the validation prompts with the trained word replaced by its
    class word, in the order of the prompts (each prompt's images are one per seed)."""

    scorer: Scorer
    references: list[Path]
    alignment_prompts: tuple[str, ...]
    _reference: torch.Tensor | None = field(default=None, repr=False)

    def reference(self) -> torch.Tensor | None:
        if self._reference is None:
            images = []
            for path in self.references:
                try:
                    images.append(load_image(path))
                except ImageError:  # unreadable since the scan: training replaces it, scoring leaves it out
                    continue
            self._reference = self.scorer.images(images) if images else torch.empty(0)
        return self._reference if len(self._reference) else None

    def scores(self, images: list[Path]) -> dict[str, Any]:
        """{fidelity, alignment, model} of one validation's images (prompt-major, as `render` writes them)."""
        per_prompt = len(images) // len(self.alignment_prompts)
        generated = self.scorer.images([load_image(p) for p in images])
        texts = self.scorer.texts([self.alignment_prompts[i // per_prompt] for i in range(len(images))])
        reference = self.reference()
        return {
            "fidelity": None if reference is None else round(fidelity(generated, reference), 6),
            "alignment": round(alignment(generated, texts), 6),
            "model": self.scorer.name,
        }

    def log(self, step: int, images: list[Path], events: EventLog) -> None:
        scores = self.scores(images)
        events.emit(Event.IMAGE_SCORES, step=step, **scores)
        events.scalars(step, **{f"validation/{k}": v for k, v in scores.items() if isinstance(v, float)})


def image_scoring(settings: ValidationSettings, examples: list[Example], say: Any) -> ImageScoring | None:
    """The run's scorer, or None when scoring is off; `say` gets one line either way (under "auto": why off)."""
    if settings.image_scores == "off" or not settings.prompts:
        return None
    try:  # "auto" never downloads (HF_HUB_OFFLINE=1 keeps "on" from it too: transformers reads it)
        scorer = load_scorer(settings.score_model, local_only=settings.image_scores == "auto")
    except ConjureError as error:
        if settings.image_scores == "on":
            raise
        say(f"image scores off: {error}; validation.image_scores: on downloads a hub model, off silences this line")
        return None
    references = reference_images(examples)
    say(f"image scores: {settings.score_model} on the CPU; fidelity against {len(references)} training images "
        "(embedded at the first validation)")
    return ImageScoring(scorer, references, settings.alignment_prompts)
