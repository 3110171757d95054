"""Writing `.txt` captions for a folder's images with an image-to-text model (`conjure caption`, the web app's
caption buttons; docs/captions.md).

Owns loading the captioning model (any model `AutoModelForImageTextToText` and `AutoProcessor` load; the
pipeline("image-to-text") of transformers 4 is gone in 5), asking it for a caption or for tags, and the folder
rules: an image with a caption keeps it unless `overwrite`, each caption file appears complete or not at all
(`conjure.files.atomic_write_text`, written as soon as its batch is done), so a run stopped midway resumes by
running it again; an image that does not decode is skipped with the reason (`conjure.data.images`' rules).
Images are found as training finds them (`conjure.data.sources.scan_source`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from conjure.data.caption_settings import CaptionSettings
from conjure.data.captions import add_prefix
from conjure.data.example import caption_of
from conjure.data.images import ImageError, load_image
from conjure.data.sources import scan_source
from conjure.errors import ConjureError
from conjure.files import atomic_write_text


@dataclass(frozen=True)
class ModelTasks:
    """What a model family is asked for each caption style, and how a tag answer is read from its text."""

    sentence: str | None
    tags: str | None
    read_tags: Callable[[Any, str, str, tuple[int, int]], list[str]] | None = None


def _florence_labels(processor: Any, text: str, task: str, size: tuple[int, int]) -> list[str]:
    """The object names of a Florence-2 detection answer ("car<loc_52><loc_33>...</s>"), read by the processor's
    own parser (transformers processing_florence2.py, Florence2Processor.post_process_generation, 5.25)."""
    answer = processor.post_process_generation(text, task=task, image_size=size)[task]
    return [str(label) for label in answer.get("labels", answer.get("bboxes_labels", []))]


MODEL_TASKS: dict[str, ModelTasks] = {
    # Florence-2's task tokens (Florence2Processor.task_prompts_without_inputs): <CAPTION> is one sentence, which
    # fits the 77 tokens of an SD text encoder; <OD> lists the objects it finds, with boxes that are dropped.
    "florence2": ModelTasks(sentence="<CAPTION>", tags="<OD>", read_tags=_florence_labels),
}
"""Keyed by the model's `config.model_type`; a model not listed gets its processor's plain captioning (images only,
or `--prompt`) and has no tag style."""


@dataclass
class Captioner:
    """A loaded captioning model and what to ask it."""

    processor: Any
    model: Any
    prompt: str | None
    read_tags: Callable[[Any, str, str, tuple[int, int]], list[str]] | None
    max_new_tokens: int

    @property
    def device(self) -> torch.device:
        return self.model.device

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption (or tag list joined by ", ") per image, stripped; "" when the model gave nothing."""
        text = {"text": [self.prompt] * len(images)} if self.prompt is not None else {}
        inputs = self.processor(images=list(images), return_tensors="pt", **text).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        out = _answer_tokens(out, inputs.get("input_ids"))
        if self.read_tags is None:
            return [caption.strip() for caption in self.processor.batch_decode(out, skip_special_tokens=True)]
        assert self.prompt is not None  # a tag style always has its task prompt
        answers = self.processor.batch_decode(out, skip_special_tokens=False)
        return [", ".join(_unique(self.read_tags(self.processor, answer, self.prompt, image.size)))
                for answer, image in zip(answers, images)]


def _answer_tokens(out: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
    """The generated tokens without the prompt that decoder-only models (GIT, chat models) repeat at the start of
    their output; encoder-decoder models (Florence-2) and BLIP, whose output starts with its own start token, do not
    repeat it exactly and are left as they are."""
    if input_ids is None or out.shape[1] < input_ids.shape[1]:
        return out
    length = input_ids.shape[1]
    return out[:, length:] if torch.equal(out[:, :length], input_ids.to(out.device)) else out


def _unique(tags: list[str]) -> list[str]:
    """Tags stripped, in first-seen order, each once (detection names an object once per box)."""
    return list(dict.fromkeys(tag.strip() for tag in tags if tag.strip()))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConjureError("device: cuda asked for, but torch sees no GPU (use --device auto or cpu)")
    return torch.device(device)


def load_captioner(settings: CaptionSettings) -> Captioner:
    """Load `settings.model` on its device (float16 on a GPU, float32 on the CPU); ConjureError, one line, when it
    cannot be loaded or cannot give the asked style."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from conjure.models.loading import fail

    device = pick_device(settings.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(settings.model)
        model = AutoModelForImageTextToText.from_pretrained(settings.model, dtype=dtype)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError or hub errors here
        error = fail(settings.model, exc, what="captioning model")
        raise ConjureError(f"{error}; to use files you have, give their folder: --model DIR (a copy of the Hub "
                           f"repository, e.g. `hf download {settings.model} --local-dir DIR` on a machine online)"
                           ) from None
    tasks = MODEL_TASKS.get(model.config.model_type, ModelTasks(sentence=None, tags=None))
    if settings.style == "tags" and tasks.read_tags is None:
        raise ConjureError(f"style: tags needs a model with an object-detection task (Florence-2: the default "
                           f"{CaptionSettings.model_fields['model'].default}); {settings.model} writes sentences")
    default = tasks.tags if settings.style == "tags" else tasks.sentence
    return Captioner(processor=processor, model=model.to(device).eval(), prompt=settings.prompt or default,
                     read_tags=tasks.read_tags if settings.style == "tags" else None,
                     max_new_tokens=settings.max_new_tokens)


@dataclass
class CaptionReport:
    """What a captioning run did: captions written, images that kept theirs, images skipped with the reason."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.written)} written, {len(self.kept)} kept (captioned already), {len(self.skipped)} skipped"


def folder_images(folder: Path, *, confine: Path | None = None) -> list[Path]:
    """The images of `folder` as training lists them (subfolders too, masks and hidden files left out)."""
    if not Path(folder).is_dir():  # a .jsonl or Hugging Face source keeps its captions elsewhere than in .txt files
        raise ConjureError(f"{folder}: not a folder (conjure caption writes .txt captions beside a folder's images)")
    return [example.image for example in scan_source(Path(folder), check_images=False, confine=confine).examples]


def has_caption(image: Path) -> bool:
    """Whether `image` has a caption training reads: a `.txt` beside it that is not blank."""
    target = image.with_suffix(".txt")
    if not target.is_file():
        return False
    return caption_of(target.read_text(encoding="utf-8-sig", errors="replace")) is not None


def with_prefix(caption: str, prefix: str) -> str:
    """`prefix, caption` (the trigger word first, as kohya-style captions have it), unless it starts with it
    as a whole word already (training's rule: `conjure.data.captions.add_prefix`)."""
    return add_prefix(caption, prefix.strip(), ", ") if prefix.strip() else caption


Progress = Callable[[int, int, CaptionReport], None]
Write = Callable[[Path, str], None]


def _write(image: Path, caption: str) -> None:
    atomic_write_text(image.with_suffix(".txt"), caption)


def caption_images(
    images: Sequence[Path], captioner: Captioner, settings: CaptionSettings, *, write: Write = _write,
    progress: Progress | None = None,
) -> CaptionReport:
    """Caption `images` in batches of `settings.batch_size`, writing each caption with `write(image, caption)`
    (default: `<stem>.txt` beside the image, atomically; a ConjureError it raises skips the image with that
    reason) as soon as its batch is done. Images with a caption keep
    it unless `settings.overwrite` (checked again just before writing: a caption the user wrote meanwhile stays).
    `progress(done, total, report)` is called after each batch; a progress bar shows on a terminal."""
    report = CaptionReport()
    todo = []
    for image in images:
        (todo if settings.overwrite or not has_caption(image) else report.kept).append(image)
    with tqdm(total=len(todo), desc="Captioning", unit="image", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(todo), settings.batch_size):
            batch = _loaded(todo[start:start + settings.batch_size], report)
            captions = captioner.caption([picture for _, picture in batch]) if batch else []
            for (image, _), caption in zip(batch, captions):
                _keep(image, caption, settings, report, write)
            done = min(start + settings.batch_size, len(todo))
            bar.update(done - bar.n)
            if progress is not None:
                progress(done, len(todo), report)
    return report


def _loaded(images: list[Path], report: CaptionReport) -> list[tuple[Path, Image.Image]]:
    """The images of a batch that decode; the others go to `report.skipped` with the reason."""
    loaded = []
    for image in images:
        try:
            loaded.append((image, load_image(image)))
        except ImageError as error:
            report.skipped.append((image, str(error).removeprefix(f"{image}: ")))
        except OSError as error:  # gone or unreadable since it was listed
            report.skipped.append((image, error.strerror or type(error).__name__))
    return loaded


def _keep(image: Path, caption: str, settings: CaptionSettings, report: CaptionReport, write: Write) -> None:
    if not caption:
        report.skipped.append((image, "the model gave an empty caption"))
    elif not settings.overwrite and has_caption(image):
        report.kept.append(image)
    else:
        try:
            write(image, with_prefix(caption, settings.prefix))
        except ConjureError as error:  # the web app's writer refuses a caption file linking out of the folder
            report.skipped.append((image, str(error)))
            return
        report.written.append(image)
