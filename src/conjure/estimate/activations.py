"""Activations of a training step, traced on the meta device: the tensors autograd keeps for backward."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if TYPE_CHECKING:
    from conjure.config import RunConfig
    from conjure.models.loading import LoadedModel


@dataclass(frozen=True)
class Traced:
    """What one forward of the run's batch leaves for backward: the bytes autograd keeps (under gradient
    checkpointing: outside the checkpointed blocks, and each block's inputs), the largest saved tensor, and the
    most one checkpointed block saves when it is recomputed."""

    saved: float
    largest: float
    recomputed: float = 0.0


class _Saved:
    """Counts the tensors autograd saves (parameters excepted: they are in the weights)."""

    def __init__(self) -> None:
        self.kept: dict[int, torch.Tensor] = {}  # each tensor once, however many ops save it (or a view of it)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if not isinstance(base, torch.nn.Parameter):
            self.kept[id(base)] = base
        return t

    @property
    def sizes(self) -> list[float]:
        return [float(t.numel() * t.element_size()) for t in self.kept.values()]

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


@contextmanager
def _memory_efficient_attention() -> Iterator[None]:
    """On the meta device torch picks SDPA's math path, which saves the whole attention matrix; on a GPU it picks
    flash or memory-efficient attention, which keep q, k, v, the output and a log-sum-exp. Trace the latter (the
    same op and autograd formula: aten._scaled_dot_product_efficient_attention)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def efficient(*args: Any, **kwargs: Any) -> torch.Tensor:
        named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args), **kwargs)
        q, k, v = named.pop("query"), named.pop("key"), named.pop("value")
        plain = named.get("attn_mask") is None and not named.get("is_causal") and not named.get("enable_gqa")
        if not plain or q.dim() != 4:
            return original(*args, **kwargs)
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True,
                                                                      scale=named.get("scale"))[0]

    F.scaled_dot_product_attention = efficient
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class _Checkpointed:
    """diffusers' `enable_gradient_checkpointing(gradient_checkpointing_func=...)`: each checkpointed block's call
    comes here; its inputs stay (torch.utils.checkpoint keeps them) and what it saves is counted apart, since it
    exists only while that block is recomputed in backward."""

    def __init__(self) -> None:
        self.inputs: dict[int, float] = {}
        self.blocks: list[float] = []

    def __call__(self, block: Any, *args: Any, **kwargs: Any) -> Any:
        self.inputs.update((id(a), float(a.numel() * a.element_size())) for a in args if isinstance(a, torch.Tensor))
        inner = _Saved()
        with inner.hooks():
            out = block(*args, **kwargs)
        self.blocks.append(sum(inner.sizes))
        return out


def trace_activations(config: RunConfig, model: LoadedModel, *, resolution: int, dtype: torch.dtype) -> Traced:
    """One training forward on the meta device (no memory, exact shapes), counting the tensors autograd saves for
    backward (`saved_tensors_hooks`). The recipe's trained parameters make the graph, as in the run: a LoRA's
    starts at the first adapted layer, textual inversion's at the token rows."""
    from conjure.train.objectives import build_conditioning
    from conjure.train.setup import text_reading

    meta = torch.device("meta")
    conditioning = build_conditioning(model, text_reading(config, model), resolution=resolution,
                                      guidance=config.advanced.guidance)
    batch = config.data.batch_size
    vae = model.vae.config
    side = resolution // 2 ** (len(vae.block_out_channels) - 1)
    noisy = torch.zeros(batch, vae.latent_channels, side, side, device=meta, dtype=dtype)
    outside, checkpointed = _Saved(), _Checkpointed()
    if config.advanced.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed)
    with _memory_efficient_attention(), outside.hooks(), torch.enable_grad():
        predict = conditioning.predictor(model.denoiser, model.text_encoders(), ["a photo"] * batch, meta, {})
        predict(noisy, torch.full((batch,), 0.5, device=meta))
    return Traced(sum(outside.sizes) + sum(checkpointed.inputs.values()), max(outside.sizes, default=0.0),
                  max(checkpointed.blocks, default=0.0))


class _Live(TorchDispatchMode):
    """The bytes of the tensors alive at once while ops run (views and in-place results share their base's
    memory), and their peak: what a no_grad forward needs beyond its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0.0
        self.seen: set[int] = set()

    def add(self, t: torch.Tensor) -> None:
        if t._is_view() or id(t) in self.seen:
            return
        size = float(t.numel() * t.element_size())
        self.seen.add(id(t))
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, id(t), size)

    def _free(self, key: int, size: float) -> None:
        self.seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def vae_encode_working_set(model: LoadedModel, *, batch: int, resolution: int) -> float:
    """The peak bytes of one batch's VAE encode (`train/loss.py vae_posterior`, under no_grad, in the VAE's own
    dtype; each step without a latent cache, the first epoch with one), pixels and posterior included, traced on
    the meta device with the memory-efficient attention a GPU runs (the CPU's flash kernel keeps as little)."""
    from conjure.train.loss import vae_posterior

    vae = model.vae
    live = _Live()
    with _memory_efficient_attention(), torch.no_grad(), live:
        pixels = torch.zeros(batch, 3, resolution, resolution, device="meta")  # as the batch holds them
        mean, std = vae_posterior(vae, pixels)
        del pixels, mean, std
    return live.peak