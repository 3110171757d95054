"""Turning an example's caption (or its absence) into the text the model is trained with.

Owns the textual-inversion prompt templates, `CaptionTransform`, the one pure function of (caption, rng) that
applies templates, tag shuffling and a prefix, in that documented order, and `caption_transform()`, the one place
that builds it from the config: for training, for class images and for the check that captions hold the token.
A method contributes only its `TokenRule`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from conjure.config.sections import DataConfig

# The "small" ImageNet templates from the textual-inversion paper's code (Gal et al. 2022,
# rinongal/textual_inversion, ldm/data/personalized.py), as the diffusers textual_inversion example
# also uses them. Kept verbatim, duplicates included, so results are comparable with those scripts.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


@dataclass(frozen=True)
class CaptionTransform:
    """The training text for one example, built in these steps:

    1. Source: the example's caption; when it has none, a template of `preset` chosen with
       `rng.choice` and filled with `placeholder`; with no preset either, "".
    2. Substitution (when `replace_word` is set): each whole-word occurrence of it becomes `placeholder`.
    3. Shuffle (when `shuffle_delimiter` is set): split on it, strip the parts, drop empty ones, keep the
       first `keep_tokens` parts in place and shuffle the rest with `rng`, then join them with the
       separator (the delimiter followed by one space, e.g. ", ", unless it already ends in whitespace).
       `keep_tokens` does nothing without a delimiter.
    4. Prefix (when `prefix` is set): put in front, joined by the separator (a single space without a
       delimiter), unless the text already starts with it as a whole word. A template text already holds
       the placeholder, so a prefix equal to the placeholder is not added to it again.
    5. Placeholder (when `ensure_placeholder` is set): a text that does not contain `placeholder` gets it
       in front, joined like the prefix.
    6. Dropout (when `dropout` > 0): with that probability (drawn last from `rng`, so the other draws are
       the same as without dropout) the text becomes "", the unconditional input of classifier-free guidance.

    The prefix and placeholder are added after shuffling, so they come first and are not `keep_tokens`.
    """

    prefix: str = ""
    shuffle_delimiter: str | None = None
    keep_tokens: int = 0
    preset: Literal["object", "style"] | None = None
    placeholder: str | None = None
    replace_word: str | None = None
    ensure_placeholder: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be 0 or more, got {self.keep_tokens}")
        if self.shuffle_delimiter == "":
            raise ValueError("shuffle_delimiter must not be empty (use None for no shuffling)")
        if self.preset is not None and self.preset not in TEMPLATES:
            raise ValueError(f"preset must be one of {sorted(TEMPLATES)}, got {self.preset!r}")
        if self.preset is not None and not self.placeholder:
            raise ValueError(f"preset {self.preset!r} needs a placeholder to fill its templates")
        if (self.replace_word or self.ensure_placeholder) and not self.placeholder:
            raise ValueError("replace_word and ensure_placeholder need a placeholder")

    def __call__(self, caption: str | None, rng: random.Random) -> str:
        from_template = caption is None and self.preset is not None
        if caption is None:
            caption = rng.choice(TEMPLATES[self.preset]).format(self.placeholder) if from_template else ""
        if self.replace_word:
            word = re.escape(self.replace_word)
            caption = re.sub(rf"(?<!\w){word}(?!\w)", lambda _: self.placeholder, caption)
        if self.shuffle_delimiter is not None:
            caption = self._shuffle(caption, rng)
        if self.prefix and not (from_template and self.prefix == self.placeholder):
            caption = self._add_prefix(caption, self.prefix)
        if self.ensure_placeholder and self.placeholder not in caption:
            caption = self._add_prefix(caption, self.placeholder)
        if self.dropout and rng.random() < self.dropout:
            return ""
        return caption

    @property
    def separator(self) -> str:
        """What shuffled parts and the prefix are joined with."""
        delimiter = self.shuffle_delimiter
        if delimiter is None:
            return " "
        return delimiter if delimiter[-1].isspace() else delimiter + " "

    def _shuffle(self, caption: str, rng: random.Random) -> str:
        parts = [part.strip() for part in caption.split(self.shuffle_delimiter)]
        parts = [part for part in parts if part]
        kept, rest = parts[: self.keep_tokens], parts[self.keep_tokens :]
        rng.shuffle(rest)
        return self.separator.join(kept + rest)

    def _add_prefix(self, caption: str, prefix: str) -> str:
        return add_prefix(caption, prefix, self.separator)


def add_prefix(caption: str, prefix: str, separator: str) -> str:
    """`prefix + separator + caption`; `prefix` alone for an empty caption; the caption as it is when it starts
    with `prefix` as a whole word (not followed by a letter or digit)."""
    if not caption:
        return prefix
    if caption.startswith(prefix) and not caption[len(prefix) :][:1].isalnum():
        return caption
    return prefix + separator + caption


@dataclass(frozen=True)
class TokenRule:
    """How a method's new token gets into the captions: it replaces `replace_word`, or (without one) goes in front
    of every caption that lacks it; captionless images get `preset` templates filled with it."""

    placeholder: str
    replace_word: str | None = None
    preset: Literal["object", "style"] | None = None


def caption_transform(
    data: DataConfig, token: TokenRule | None, *, class_images: bool = False, dropout: bool = True
) -> CaptionTransform:
    """The transform of `data`'s settings and the method's `token` (None: a method without one, e.g. LoRA).

    `class_images`: for class (regularisation) images, whose captions are used as they are (no prefix, token or
    shuffling: they keep the model's idea of the class); caption dropout still applies to them.
    `dropout=False`: what a caption is before dropout (the check that training captions hold the token)."""
    rate = data.caption_dropout if dropout else 0.0
    if class_images:
        return CaptionTransform(dropout=rate)
    return CaptionTransform(
        prefix=data.caption_prefix,
        shuffle_delimiter=data.shuffle_caption_delimiter,
        keep_tokens=data.keep_tokens,
        preset=token.preset if token else None,
        placeholder=token.placeholder if token else None,
        replace_word=token.replace_word if token else None,
        ensure_placeholder=token is not None and token.replace_word is None,
        dropout=rate,
    )
