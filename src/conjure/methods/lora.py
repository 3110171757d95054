"""LoRA and DoRA concept models: low-rank adapters on the UNet (and optionally the text encoders).

LoRA (and PEFT-format DoRA) use PEFT's layers, injected into the loaded diffusers / transformers modules in
place. Kohya-format DoRA uses `conjure.adapters.dora.InputColumnDora` (the decomposition every app applies;
PEFT's is a different function, see that module). Either way the adapters end up as submodules of the UNet and
text encoders, so the loop wraps those models for distributed training and validation pipelines built from the
same components render with the adapters live. Only adapter parameters train; they are float32 whatever the
frozen weights' precision.

Checkpoints write the neutral `LoraWeights` (conjure.adapters) through `conjure.export.kohya` / `conjure.export.peft`: the kohya file
by default, or diffusers' PEFT format.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conjure.adapters import LoraModule, LoraWeights
from conjure.adapters.dora import InputColumnDora, share_decomposition
from conjure.errors import ConjureError
from conjure.export.modelspec import conjure_keys, modelspec
from conjure.families import Family
from conjure.models.loading import LoadedModel

TEXT_ENCODER = re.compile(r"layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")
ADAPTED_TYPES = (nn.Linear, nn.Conv2d)
ADAPTER_NAME = "default"


def denoiser_targets(family: Family, denoiser: nn.Module, preset: str) -> list[str]:
    """Module paths of the denoiser layers a preset of `family` adapts (`Family.lora_presets`; "auto": the
    family's default); a preset the family does not have is refused naming the field."""
    try:
        patterns = [re.compile(p) for p in family.lora_preset(preset)]
    except KeyError:
        names = ", ".join(name for name, _ in family.lora_presets)
        raise ConjureError(f"lora.unet_targets: {family.title} has the presets {names} (or auto), not {preset!r}") from None
    return [
        name for name, module in denoiser.named_modules()
        if isinstance(module, ADAPTED_TYPES) and any(p.search(name) for p in patterns)
    ]


def text_encoder_targets(encoder: nn.Module, unread_layers: int = 0) -> list[str]:
    """q, k, v, out and the MLP of every layer (apps need the full attention set, FORMATS.md) but the last
    `unread_layers`, whose output the UNet never reads (`TextEncoderSlot.unread_layers`)."""
    read = encoder.config.num_hidden_layers - unread_layers
    return [
        n for n, m in encoder.named_modules()
        if isinstance(m, nn.Linear) and (hit := TEXT_ENCODER.search(n)) and int(hit.group(1)) < read
    ]


def _inject_peft(module: nn.Module, targets: list[str], *, rank: int, alpha: float, dropout: float, dora: bool) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    # Full module paths from the root: PEFT matches a list entry by equality or dotted suffix, so exactly these.
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=dora, init_lora_weights=True, target_modules=targets
    )
    inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)


class Lora:
    """The recipe: adapters in, parameters out, kohya/PEFT files per checkpoint."""

    kind = "lora"

    def __init__(self, model: LoadedModel, section: Any, *, trigger: str | None = None, seed: int = 0,
                 clip_skip: int = 1):
        self.model, self.section, self.trigger, self.clip_skip = model, section, trigger, clip_skip
        self.own_dora = section.dora and section.save_format == "kohya"
        # The CLIP encoders train with lora.train_text_encoder; a T5 stays frozen (FLUX.1's T5-XXL, as kohya's
        # FLUX LoRA leaves it unless asked, and as the apps' FLUX LoRA files hold CLIP-L only: lora_te1_)
        slots = ({s.encoder: s for s in model.family.text_encoders if s.kind == "clip"}
                 if section.train_text_encoder else {})
        self.denoiser = model.family.denoiser
        self.preset = model.family.default_lora_preset if section.unet_targets == "auto" else section.unet_targets
        self.modules: dict[str, nn.Module] = {name: model.components[name] for name in [self.denoiser, *slots]}
        self.targets: dict[str, list[str]] = {}
        for name, module in self.modules.items():
            targets = (denoiser_targets(model.family, module, self.preset) if name == self.denoiser
                       else text_encoder_targets(module, slots[name].unread_layers(clip_skip)))
            if not targets:
                raise ConjureError(f"lora: no layers of the {name} match the preset {self.preset!r}")
            groups = self._fused_groups(name, targets)
            targets = list(dict.fromkeys(targets + [p for members in groups.values() for p in members]))
            self.targets[name] = targets
            module.requires_grad_(False)  # only the adapters train (the loop freezes too; a recipe stands alone)
            # The random start of `down` comes from the run's seed, not the process's RNG state: the same config
            # gives the same adapter, in a fresh process or the tenth run of one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + sum(map(ord, name)))
                self._inject(module, targets)
            for group, members in groups.items():
                share_decomposition([module.get_submodule(p) for p in members], group)
        # The adapters' parameters, fixed now: a recipe that adds more trainable parts to the same modules
        # afterwards (pivotal tuning's token rows) keeps them out of the LoRA's groups, state and files.
        self._params: list[tuple[str, str, nn.Parameter]] = [
            (component, n, p) for component, module in self.modules.items()
            for n, p in module.named_parameters() if p.requires_grad
        ]
        for p in self.parameters():
            p.data = p.data.float()  # trained parameters are float32 masters
        if section.save_format == "kohya" and model.denoiser.device.type != "meta":
            # What the file layout cannot hold is refused now, before the first step, not at the first checkpoint.
            # (On the meta device, where `conjure estimate` counts the adapters, there are no values to lay out.)
            from conjure.export.kohya import kohya_state_dict

            kohya_state_dict(self.lora_weights(), model.family, model.denoiser.config)

    def _fused_groups(self, component: str, targets: list[str]) -> dict[str, tuple[str, ...]]:
        """A kohya-layout DoRA of a family whose kohya layout fuses layers (FLUX.1's q|k|v, and the single blocks'
        q|k|v|proj_mlp: export/kohya_flux.py): fused layer -> all its parts. Apps decompose the fused weight as one,
        so its parts train one shared decomposition, and a preset that adapts some parts (FLUX's `attention`: the
        single blocks' q, k, v) brings the others along (proj_mlp), as kohya's own FLUX LoRA adapts `linear1` whole."""
        if not self.own_dora:
            return {}
        from conjure.export.kohya import kohya_fused_parts

        return kohya_fused_parts(self.model.family, component, targets)

    def _inject(self, module: nn.Module, targets: list[str]) -> None:
        s = self.section
        if self.own_dora:
            for path in targets:
                base = module.get_submodule(path)
                _set_submodule(module, path, InputColumnDora(base, s.rank, s.alpha, s.dropout))
        else:
            from conjure.adapters.lean_lora import use_lean_forward

            _inject_peft(module, targets, rank=s.rank, alpha=s.alpha, dropout=s.dropout, dora=s.dora)
            use_lean_forward(module)  # PEFT's layers, without its per-call dispatch (PEFT DoRA keeps PEFT's)

    # --- what trains -------------------------------------------------------------------------------
    def _adapted(self, component: str) -> list[tuple[str, nn.Module]]:
        module = self.modules[component]
        return [(path, module.get_submodule(path)) for path in self.targets[component]]

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{component}.{n}", p) for component, n, p in self._params]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self._named_parameters()]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return dict(self.modules)

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        s, groups = self.section, []
        for component in self.modules:
            lr = (s.unet_learning_rate if component == self.denoiser else s.text_encoder_learning_rate) or learning_rate
            params = [p for c, _, p in self._params if c == component]
            groups.append({"params": params, "lr": lr, "name": component})
        return groups

    def expand_caption(self, caption: str) -> str:
        return caption

    def frozen_parameters(self, step: int, max_steps: int) -> list[nn.Parameter]:
        return []

    def after_step(self, step: int) -> None:
        pass

    def validation_weights(self) -> AbstractContextManager[None]:
        return nullcontext()  # the weights as they train

    # --- state for resume and files for consumers --------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in self._named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self._named_parameters())
        missing = sorted(set(params) - set(state))
        if missing or set(state) - set(params):
            raise ConjureError(
                "the checkpoint's adapter does not match this config (different rank, layers or text-encoder "
                f"training?); first difference: {(missing or sorted(set(state) - set(params)))[0]}"
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])

    def lora_weights(self) -> LoraWeights:
        weights: LoraWeights = {}
        for component in self.modules:
            for path, layer in self._adapted(component):
                weights[(component, path)] = self._module_weights(layer)
        return weights

    def _module_weights(self, layer: nn.Module) -> LoraModule:
        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().float().cpu().clone()

        if isinstance(layer, InputColumnDora):
            return LoraModule(down=copy(layer.lora_down.weight), up=copy(layer.lora_up.weight), alpha=layer.alpha,
                              dora_scale=copy(layer.dora_scale), dora_group=layer.group)
        magnitude = copy(layer.lora_magnitude_vector[ADAPTER_NAME].weight) if self.section.dora else None
        return LoraModule(
            down=copy(layer.lora_A[ADAPTER_NAME].weight), up=copy(layer.lora_B[ADAPTER_NAME].weight),
            alpha=float(layer.lora_alpha[ADAPTER_NAME]), magnitude=magnitude,
        )

    def metadata(
        self, name: str, *, step: int, resolution: int, base_model: str, prediction_type: str
    ) -> dict[str, str]:
        s, family, trigger = self.section, self.model.family, self.trigger
        variant = self.model.facts.get("variant")
        meta = modelspec(family, self.kind, title=name, resolution=resolution, prediction_type=prediction_type,
                         variant=variant.value if variant else None)
        meta.update({
            "ss_network_module": "lycoris.kohya" if self.own_dora else "networks.lora",
            "ss_network_dim": str(s.rank),
            "ss_network_alpha": str(float(s.alpha)),
            # LyCORIS reads `wd_on_output` (lycoris/kohya.py create_network), default True since 2025-04: the
            # input-column decomposition of these files must say false.
            "ss_network_args": (
                '{"algo": "lora", "dora_wd": true, "wd_on_output": false}' if self.own_dora else "{}"
            ),
            "ss_base_model_version": family.ss_base_model_version,
            "ss_output_name": name,
            "ss_training_comment": f"trained with conjure ({'DoRA' if s.dora else 'LoRA'})",
            "ss_resolution": f"({resolution}, {resolution})",
            "ss_steps": str(step),
            **({"ss_clip_skip": str(self.clip_skip)} if family.clip_skip else {}),
        })
        meta.update(conjure_keys(
            method="dora" if s.dora else "lora", step=step, base_model=base_model, rank=s.rank, alpha=s.alpha,
            unet_targets=self.preset, text_encoder=s.train_text_encoder, trigger_words=trigger or "",
            unet_layers_per_block=getattr(self.model.denoiser.config, "layers_per_block", None),
        ))
        return meta

    def output_name(self, run_name: str) -> str:
        return self.section.output_name or run_name

    def save(
        self, folder: Path, *, step: int, resolution: int, base_model: str, run_name: str, prediction_type: str
    ) -> list[Path]:
        """Write the LoRA file apps load, named `lora.output_name` or after the run."""
        name = self.output_name(run_name)
        meta = self.metadata(name, step=step, resolution=resolution, base_model=base_model,
                             prediction_type=prediction_type)
        return [self.write(Path(folder) / f"{name}.safetensors", meta)]

    def write(self, path: Path, metadata: dict[str, str], *, bundle: dict[str, torch.Tensor] | None = None) -> Path:
        """The LoRA file in the configured format and precision; `bundle`: extra `bundle_emb.*` tensors (kohya)."""
        from conjure.export.kohya import save_kohya
        from conjure.export.peft import save_peft

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.section.save_dtype]
        weights, family = self.lora_weights(), self.model.family
        if self.section.save_format == "kohya":
            return save_kohya(path, weights, metadata, family, self.model.denoiser.config, dtype=dtype,
                              bundle=bundle)
        if bundle:
            raise ConjureError("lora.save_format: peft cannot carry a bundled embedding; use kohya")
        return save_peft(path, weights, metadata, family, dtype=dtype)
