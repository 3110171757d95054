"""An image-text embedding model (CLIP, through transformers) and the two scores computed with it.

Both scores are cosine similarities of unit-length embeddings, the measures of the papers that use them for
personalisation: fidelity is DreamBooth's CLIP-I (Ruiz et al. 2023, section 4.1: "the average pairwise cosine
similarity between CLIP embeddings of generated and real images"), alignment its CLIP-T (prompt-image
similarity), here with the trained token replaced by its class word so that the text is one CLIP knows. They are
not scaled to CLIPScore's 0-100 range (Hessel et al. 2021 clip and multiply by 2.5): a comparison across steps
needs neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from conjure.errors import ConjureError


@dataclass
class Scorer:
    """A CLIP model and its processor, on the CPU in float32 (a few images per validation: the training's GPU
    memory stays the training's). `name`: the hub id or folder it came from, logged with the scores."""

    model: Any
    processor: Any
    name: str

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-length image embeddings, one row per image."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return _unit(_pooled(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-length text embeddings, one row per text (cut at the text model's length, as CLIP was trained)."""
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                          max_length=self.model.config.text_config.max_position_embeddings)
        return _unit(_pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                          attention_mask=tokens["attention_mask"])))


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns the projected embedding as the output's pooler_output, earlier versions the tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def load_scorer(source: str, *, local_only: bool) -> Scorer:
    """The CLIP model of `source` (a hub id or a folder); `local_only`: from files on this machine only (the hub's
    cache or a folder), never downloading. ConjureError, one line, when it cannot be loaded."""
    from transformers import AutoConfig, AutoProcessor, CLIPModel

    from conjure.models.loading import fail

    folder = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not folder.is_dir():
        raise ConjureError(f"validation.score_model {source!r}: no such folder")
    where = str(folder) if folder.is_dir() else source
    if local_only and not folder.is_dir() and not _in_hub_cache(source):
        raise ConjureError(f"validation.score_model {source!r} is not on this machine (not a folder, not in the "
                           "Hugging Face cache)")
    try:
        kind = AutoConfig.from_pretrained(where, local_files_only=local_only).model_type
        # CLIPModel would load another model type's weights into a CLIP with a warning only (SigLIP's included)
        if kind != "clip":
            raise ConjureError(f"validation.score_model {source!r} is a {kind} model; image scores need a CLIP")
        processor = AutoProcessor.from_pretrained(where, local_files_only=local_only)
        model = CLIPModel.from_pretrained(where, local_files_only=local_only, dtype=torch.float32)
    except ConjureError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError or hub errors here
        raise fail(source, exc, what="image-scoring model (validation.score_model)") from None
    return Scorer(model=model.eval(), processor=processor, name=source)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError:  # not a hub id either: the load below says so
        return True


def fidelity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean cosine similarity of every generated image to every reference (training) image: unit rows in,
    the mean of all pairs' dot products."""
    return float((generated @ reference.T).mean())


def alignment(images: torch.Tensor, texts: torch.Tensor) -> float:
    """The mean cosine similarity of each image to its own text (row i with row i)."""
    return float((images * texts).sum(dim=-1).mean())


def with_class_word(prompt: str, word: str, class_word: str) -> str:
    """`prompt` with each whole occurrence of `word` (the placeholder token or trigger word) replaced by
    `class_word` ("" drops it), spaces tidied: "a photo of <cat-toy>" -> "a photo of toy"."""
    pattern = r"(?<![\w<>-])" + re.escape(word) + r"(?![\w<>-])"
    return re.sub(r"\s+", " ", re.sub(pattern, class_word, prompt)).strip(" ,")
