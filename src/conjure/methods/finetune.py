"""Full fine-tune: every weight of the UNet trains, and of each text encoder given a learning rate.

The trained components become float32 masters (the loop cast the whole model to the run's precision first; under
mixed precision their forward runs in autocast, as a LoRA's adapters do), or bf16 weights with stochastic rounding
(`weights_dtype`). An optional EMA of the trained weights
(conjure.train.ema) renders the validation images and is saved as the model. A checkpoint's training state holds
the trained weights and the EMA (the loop saves the optimizer's state beside them); its files are a diffusers model
folder (`pipeline.save_pretrained`: the trained components and the frozen ones) and the same model as one
single-file checkpoint (conjure.export.single_file), both in `finetune.save_dtype`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conjure.errors import ConjureError
from conjure.models.loading import LoadedModel
from conjure.train.ema import Ema
from conjure.train.sharding import copy_into

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@contextmanager
def cast_to_cpu(modules: list[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Every floating-point tensor of `modules` as a CPU copy in `dtype` until exit: what is saved is written in
    the save precision without touching the training weights or holding a second copy on the GPU.

    The copies stand in the modules' parameter and buffer tables, and the trained tensors are put back as they
    were. Assigning another dtype or device to a parameter's `.data` instead would drop its gradient accumulator
    (torch's VariableHooks::set_data), and with it the hooks DDP registered there: the next backward of the
    process that saved would then skip the all-reduce the other processes wait in."""
    kept: list[tuple[dict[str, Any], str, Any]] = []
    copies: dict[int, Any] = {}  # tied tensors stay tied
    try:
        for sub in {id(m): m for module in modules for m in module.modules()}.values():
            for table in (sub._parameters, sub._buffers):
                for name, tensor in table.items():
                    if tensor is None or not tensor.is_floating_point():
                        continue
                    if id(tensor) not in copies:
                        copy = tensor.detach().to("cpu", dtype)
                        copies[id(tensor)] = nn.Parameter(copy, requires_grad=False) if isinstance(
                            tensor, nn.Parameter) else copy
                    kept.append((table, name, tensor))
                    table[name] = copies[id(tensor)]
        yield
    finally:
        for table, name, tensor in reversed(kept):
            table[name] = tensor


def unread_parameters(encoder: nn.Module, slot: Any, clip_skip: int) -> list[nn.Parameter]:
    """The parameters of a text encoder whose output the denoiser never reads: its last `slot.unread_layers`
    layers (SDXL's CLIP-L: the last one) and, where the read hidden state is taken before it and no pooled
    embedding is read, its final layer norm. They get no gradient, which DDP (without find_unused_parameters)
    stops at, as kohya-ss/sd-scripts#997 did for LoRA (conjure.methods.lora.text_encoder_targets)."""
    # CLIPTextModel's modules sit at its root in transformers 5, CLIPTextModelWithProjection's under text_model.
    named = {name.removeprefix("text_model."): m for name, m in encoder.named_modules()}
    if slot.kind != "clip" or "encoder.layers" not in named:
        return []
    layers = list(named["encoder.layers"].children())
    unread = slot.unread_layers(clip_skip)
    modules = layers[len(layers) - unread:] if unread else []
    if not slot.final_norm and not slot.pooled:
        modules.append(named["final_layer_norm"])
    return [p for m in modules for p in m.parameters()]


class FullFinetune:
    """The recipe: the chosen components train whole; a diffusers model folder per checkpoint."""

    kind = "finetune"

    def __init__(self, model: LoadedModel, section: Any, *, clip_skip: int = 1):
        self.model, self.section = model, section
        rates = section.learning_rates()
        present = {model.family.denoiser, *(slot.encoder for slot in model.family.text_encoders)}
        for name, lr in rates.items():
            if lr is not None and name not in present:
                raise ConjureError(f"finetune.{name}_learning_rate: {model.family.title} has no {name}")
        self.rates = {name: lr for name, lr in rates.items() if name == model.family.denoiser or lr is not None}
        self.modules: dict[str, nn.Module] = {name: model.components[name] for name in self.rates}
        # float32 masters (the loop cast every part to the run's precision), or bf16 weights that the fused
        # backward pass steps in float32 (conjure.train.optimizers.FusedBackward)
        dtype = torch.bfloat16 if section.weights_dtype == "bf16" else torch.float32
        slots = {slot.encoder: slot for slot in model.family.text_encoders}
        for name, module in self.modules.items():
            module.to(dtype)
            module.requires_grad_(True)
            if name in slots:  # what the denoiser never reads gets no gradient: under DDP that stops the run
                for p in unread_parameters(module, slots[name], clip_skip):
                    p.requires_grad_(False)
        ema = section.ema
        self.ema = Ema([p for _, p in self._params()], decay=ema.decay, update_every=ema.update_every,
                       device=torch.device("cpu") if ema.on_cpu else None) if ema.enabled else None

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        """The trained parameters by name, as the modules hold them now: under advanced.distributed: fsdp the
        sharded ones, or the whole ones while they are gathered (conjure.train.sharding)."""
        return [(f"{component}.{n}", p) for component, module in self.modules.items()
                for n, p in module.named_parameters()]

    # --- what trains -------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        return dict(self.modules)

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        return [{"params": list(module.parameters()), "lr": self.rates[name] or learning_rate, "name": name}
                for name, module in self.modules.items()]

    def frozen_parameters(self, step: int, max_steps: int) -> list[nn.Parameter]:
        return []

    def expand_caption(self, caption: str) -> str:
        return caption

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(step)

    def validation_weights(self) -> AbstractContextManager[None]:
        use = self.ema is not None and self.section.ema.use_for_validation
        return self.ema.in_place() if use and self.ema is not None else nullcontext()

    # --- state for resume and files for consumers --------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {name: p.detach().cpu() for name, p in self._params()}
        if self.ema is not None:
            state.update({f"ema.{name}": a for (name, _), a in zip(self._params(), self.ema.state_dict())})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = [name for name, _ in self._params()]
        expected = set(names) | ({f"ema.{n}" for n in names} if self.ema is not None else set())
        if set(state) != expected:
            first = sorted(expected ^ set(state))[0]
            raise ConjureError("the checkpoint's weights do not match this config (other text encoders trained, or "
                               f"finetune.ema.enabled changed?); first difference: {first}")
        for name, p in self._params():
            copy_into(p, state[name])
        if self.ema is not None:
            self.ema.load_state_dict([state[f"ema.{n}"] for n in names])

    def output_name(self, run_name: str) -> str:
        return self.section.output_name or run_name

    def save(
        self, folder: Path, *, step: int, resolution: int, base_model: str, run_name: str, prediction_type: str
    ) -> list[Path]:
        """The diffusers model folder `finetune.output_name` (or the run's name) and, with `single_file`, the
        `.safetensors` of that name: every component of the model, the trained ones with the EMA weights where
        `ema.use_for_save`, in `save_dtype`; the scheduler is the one training used (its prediction type is what
        the run trained, which the single file's header and v_pred marker say)."""
        from conjure.export.modelspec import conjure_keys
        from conjure.export.single_file import save_single_file
        from conjure.train.validation import build_pipeline

        name = self.output_name(run_name)
        components = dict(self.model.components)
        pipe = build_pipeline(self.model.family.pipeline_class, components, sampler=lambda scheduler: scheduler)
        modules = [part for part in components.values() if isinstance(part, nn.Module)]
        use_ema = self.ema is not None and self.section.ema.use_for_save
        written = [Path(folder) / name]
        with ExitStack() as stack:
            if use_ema and self.ema is not None:
                stack.enter_context(self.ema.in_place())
            stack.enter_context(cast_to_cpu(modules, SAVE_DTYPES[self.section.save_dtype]))
            pipe.save_pretrained(written[0], safe_serialization=True)
            if self.section.single_file:
                metadata = {"modelspec.resolution": f"{resolution}x{resolution}", **conjure_keys(
                    method="finetune", step=step, base_model=base_model, ema=use_ema,
                    trained=",".join(self.modules))}
                written.append(save_single_file(components, Path(folder) / f"{name}.safetensors",
                                                self.model.family, dtype=None, metadata=metadata,
                                                prediction_type=prediction_type))
        return written
