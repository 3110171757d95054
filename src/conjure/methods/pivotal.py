"""Pivotal tuning: a LoRA (or DoRA) and its own new token, trained together in one loop.

Composes the two recipes: `Lora` injects the adapters first and fixes its parameter list, then
`TextualInversion` adds the token rows to the same text encoders, so each part keeps its own parameters,
learning rate, state and files. The token can sit out the steps after `freeze_after` (its gradients are
dropped, so the optimizer neither moves nor decays it) while the LoRA goes on learning around it.

Each checkpoint holds the LoRA file (`<name>.safetensors`), the embedding file of the family's TI format
(named after the token: what A1111/ComfyUI users type), and with `bundle` one more LoRA file that carries the
embedding as `bundle_emb.*` (`<name>.bundle.safetensors`), so an A1111/Forge user installs two files or one
(ComfyUI and InvokeAI users install the two).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conjure.export.embeddings import bundle_tensors, embedding_file_name, embedding_name, save_embedding
from conjure.methods.lora import Lora
from conjure.methods.textual_inversion import TextualInversion
from conjure.models.loading import LoadedModel


class PivotalTuning:
    kind = "lora"  # the modelspec architecture suffix of the main file

    def __init__(self, model: LoadedModel, lora: Any, ti: Any, *, seed: int = 0, clip_skip: int = 1):
        self.model, self.ti_section = model, ti
        # The LoRA first: it freezes its modules and records its parameters before the token rows exist.
        self.lora = Lora(model, lora, trigger=ti.placeholder_token, seed=seed, clip_skip=clip_skip)
        self.ti = TextualInversion(
            model, placeholder_token=ti.placeholder_token, initializer=ti.initializer, num_vectors=ti.num_vectors
        )

    # --- what trains -------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {**self.lora.trainable_modules(), **self.ti.trainable_modules()}

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        embedding = self.ti.parameter_groups(self.ti_section.learning_rate)[0]
        return self.lora.parameter_groups(learning_rate) + [{**embedding, "name": "embedding"}]

    def freeze_step(self, max_steps: int) -> int | None:
        """The first step (counted from 0) at which the embedding no longer trains; None: never."""
        fraction = self.ti_section.freeze_after
        return None if fraction is None else math.ceil(fraction * max_steps)

    def frozen_parameters(self, step: int, max_steps: int) -> list[nn.Parameter]:
        first = self.freeze_step(max_steps)
        return [e.new_rows for e in self.ti.embeddings] if first is not None and step >= first else []

    def after_step(self, step: int) -> None:
        pass

    def validation_weights(self) -> AbstractContextManager[None]:
        return nullcontext()  # the weights as they train

    def expand_caption(self, caption: str) -> str:
        return self.ti.expand_caption(caption)

    # --- state for resume and files for consumers --------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"lora.{k}": v for k, v in self.lora.state_dict().items()}
        state.update({f"ti.{k}": v for k, v in self.ti.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        self.lora.load_state_dict(part("lora."))
        self.ti.load_state_dict(part("ti."))

    def save(
        self, folder: Path, *, step: int, resolution: int, base_model: str, run_name: str, prediction_type: str
    ) -> list[Path]:
        folder = Path(folder)
        token = self.ti.placeholder
        embedding_path = folder / embedding_file_name(token)
        name = self.lora.output_name(run_name)
        if f"{name}.safetensors" == embedding_path.name:
            name += "-lora"  # the embedding keeps the token's name: it is what users type
        facts = {"conjure.pivotal_token": token, "conjure.pivotal_embedding": embedding_path.name}
        facts_of_run: dict[str, Any] = dict(step=step, resolution=resolution, base_model=base_model, prediction_type=prediction_type)
        meta = {**self.lora.metadata(name, **facts_of_run), **facts}
        meta["conjure.method"] = "pivotal"
        files = [self.lora.write(folder / f"{name}.safetensors", meta)]
        ti_meta = self.ti.metadata(**facts_of_run, method="pivotal")
        save_embedding(embedding_path, self.ti.embedding_tensors(), {**ti_meta, "conjure.pivotal_lora": files[0].name})
        files.append(embedding_path)
        if self.ti_section.bundle:
            bundle = bundle_tensors(embedding_name(token), self.ti.embedding_tensors())
            files.append(self.lora.write(folder / f"{name}.bundle.safetensors", meta, bundle=bundle))
        return files
