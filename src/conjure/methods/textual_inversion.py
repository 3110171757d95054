"""Textual inversion: new token(s) whose embedding rows are the only thing trained.

The token embedding of each text encoder is wrapped by `ExtendedEmbedding`, which keeps the original
matrix frozen (never in the optimizer, never written) and holds the new rows as a separate float32
parameter. So the rest of the vocabulary provably cannot change, and optimizer state is [n, width]
instead of the whole [49408, width] matrix that a "train all rows, restore the old ones" loop carries.
Multi-vector tokens follow diffusers' naming (`<tok>`, `<tok>_1`, ...), which its pipelines expand in
prompts, so validation and consumers see the same tokens as training.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conjure.errors import ConjureError
from conjure.export.embeddings import embedding_file_name, save_embedding
from conjure.export.modelspec import conjure_keys, modelspec
from conjure.models.loading import LoadedModel
from conjure.models.pooling import pool_at_end_of_text


class ExtendedEmbedding(nn.Module):
    """A frozen token embedding plus trainable rows for ids >= its vocabulary size."""

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.first_new_id = base.num_embeddings
        self.new_rows = nn.Parameter(new_rows.detach().to(torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix, for code that reads `get_input_embeddings().weight` (not used in training)."""
        return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.first_new_id + self.new_rows.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        out = self.base(input_ids.clamp(max=self.first_new_id - 1))
        new = nn.functional.embedding((input_ids - self.first_new_id).clamp(min=0), self.new_rows)
        return torch.where(is_new.unsqueeze(-1), new.to(out.dtype), out)


def token_names(placeholder: str, num_vectors: int) -> list[str]:
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


class TextualInversion:
    """The recipe: add tokens, say what trains, expand captions, save consumer files."""

    kind = "textual-inversion"

    def __init__(self, model: LoadedModel, *, placeholder_token: str, initializer: str, num_vectors: int):
        self.model = model
        self.placeholder = placeholder_token
        self.initializer = initializer
        self.tokens = token_names(placeholder_token, num_vectors)
        self.embeddings: list[ExtendedEmbedding] = []
        for tokenizer, encoder in model.text_encoders():
            self.embeddings.append(self._add_tokens(tokenizer, encoder))

    def _add_tokens(self, tokenizer: Any, encoder: Any) -> ExtendedEmbedding:
        clash = [t for t in self.tokens if t in tokenizer.get_vocab() or len(tokenizer.tokenize(t)) == 1]
        if clash:
            raise ConjureError(
                f"textual_inversion.placeholder_token {self.placeholder!r} is already a token of the model's "
                f"vocabulary ({clash[0]!r}); pick a new word, e.g. '<{self.placeholder.strip('<>')}-concept>'"
            )
        init_ids = tokenizer(self.initializer, add_special_tokens=False)["input_ids"]
        unknown = tokenizer.unk_token_id
        if not init_ids or (unknown is not None and unknown in init_ids):
            raise ConjureError(
                f"textual_inversion.initializer {self.initializer!r} has no known tokens; use a plain word "
                "such as 'dog' or 'painting'"
            )
        base = encoder.get_input_embeddings()
        if isinstance(base, ExtendedEmbedding):
            raise ConjureError("this model already carries a textual-inversion wrapper; load a fresh model")
        tokenizer.add_tokens(self.tokens)
        new_ids = tokenizer.convert_tokens_to_ids(self.tokens)
        expected = list(range(base.num_embeddings, base.num_embeddings + len(self.tokens)))
        if new_ids != expected:
            # The tokenizer's vocabulary is larger than the encoder's matrix (or has holes): appending rows
            # would not line up ids and rows, so refuse rather than train the wrong rows.
            raise ConjureError(
                f"tokenizer and text encoder disagree on the vocabulary size ({new_ids[0]} vs {expected[0]})"
            )
        with torch.no_grad():
            # Vector i starts at initializer token i mod their count, as kohya's train_textual_inversion.py
            # does (`init_token_ids[i % len(init_token_ids)]`): each vector a real token's row. A mean of several
            # rows is shorter than any real token and the same for every vector.
            order = [init_ids[i % len(init_ids)] for i in range(len(self.tokens))]
            rows = base.weight[torch.tensor(order)].float()
        wrapped = ExtendedEmbedding(base, rows)
        encoder.set_input_embeddings(wrapped)
        pool_at_end_of_text(encoder, tokenizer.eos_token_id)  # as apps pool (conjure.models.pooling)
        return wrapped

    # --- what trains -------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Components whose parameters train, by pipeline name (wrapped for distributed training by the loop)."""
        return {slot.encoder: self.model.components[slot.encoder] for slot in self.model.family.text_encoders}

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        return [{"params": [e.new_rows for e in self.embeddings], "lr": learning_rate}]

    def frozen_parameters(self, step: int, max_steps: int) -> list[nn.Parameter]:
        return []

    def after_step(self, step: int) -> None:
        pass

    def validation_weights(self) -> AbstractContextManager[None]:
        return nullcontext()  # the weights as they train

    def expand_caption(self, caption: str) -> str:
        """'<tok>' -> '<tok> <tok>_1 ...' as diffusers' pipelines do for multi-vector tokens."""
        if len(self.tokens) == 1:
            return caption
        pattern = re.escape(self.placeholder) + r"(?!_\d)"
        return re.sub(pattern, " ".join(self.tokens), caption)

    # --- state for resume and files for consumers --------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"new_rows.{i}": e.new_rows.detach().cpu().clone() for i, e in enumerate(self.embeddings)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, e in enumerate(self.embeddings):
                e.new_rows.copy_(state[f"new_rows.{i}"])

    def embedding_tensors(self) -> dict[str, torch.Tensor]:
        slots = self.model.family.text_encoders
        return {slot.embedding_key: e.new_rows.detach() for slot, e in zip(slots, self.embeddings)}

    def metadata(
        self, *, step: int, resolution: int, base_model: str, prediction_type: str, method: str = "textual_inversion"
    ) -> dict[str, str]:
        metadata = modelspec(self.model.family, self.kind, title=self.placeholder, resolution=resolution,
                             prediction_type=prediction_type)
        metadata.update(
            conjure_keys(
                method=method,
                placeholder_token=self.placeholder,
                initializer=self.initializer,
                num_vectors=len(self.tokens),
                step=step,
                base_model=base_model,
            )
        )
        return metadata

    def save(
        self, folder: Path, *, step: int, resolution: int, base_model: str, prediction_type: str, run_name: str = ""
    ) -> list[Path]:
        """Write the embedding file that apps load; returns the files written."""
        path = Path(folder) / embedding_file_name(self.placeholder)
        metadata = self.metadata(step=step, resolution=resolution, base_model=base_model,
                                 prediction_type=prediction_type)
        save_embedding(path, self.embedding_tensors(), metadata)
        return [path]
