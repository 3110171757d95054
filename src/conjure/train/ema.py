"""An exponential moving average (EMA) of trained weights: the `finetune` method's `finetune.ema`.

The average follows diffusers' EMAModel (training_utils.py, 0.42) with its defaults: after optimizer step `s`
(counted from 1) the average moves to `decay_s * average + (1 - decay_s) * weights`, where
`decay_s = min(decay, s / (9 + s))` (EMAModel.get_decay without its `use_ema_warmup`: 0 at the first step, so the
average starts from the weights after one step, then warms up to `decay`). Updated every N steps, one update stands
for N steps: `decay_s ** N`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def decay_at(step: int, decay: float) -> float:
    """The decay of the update after optimizer step `step` (counted from 1), as diffusers' EMAModel.get_decay."""
    return 0.0 if step <= 1 else min(decay, step / (9 + step))


class Ema:
    """The average of `params` (float32 copies, on `device` or theirs), its update and its use in place of them."""

    def __init__(self, params: list[nn.Parameter], *, decay: float, update_every: int,
                 device: torch.device | None = None):
        self.params, self.decay, self.update_every = params, decay, update_every
        self.device = device  # where it was asked to live (None: with the weights); `conjure estimate` reads it
        # On the meta device (`conjure estimate` builds the recipe there) a copy elsewhere has no values to copy.
        where = [device if device is not None and p.device.type != "meta" else p.device for p in params]
        self.average = [p.detach().to(d, torch.float32, copy=True) for p, d in zip(params, where)]

    def update(self, step: int) -> None:
        """The update after optimizer step `step`, when it falls on `update_every`."""
        if step % self.update_every:
            return
        weight = 1.0 - decay_at(step, self.decay) ** self.update_every
        with torch.no_grad():
            current = [p.detach().to(a.device, a.dtype) for p, a in zip(self.params, self.average)]
            # One fused kernel per device and dtype over every tensor instead of a Python loop of ops per tensor:
            # average += weight * (current - average). diffusers' EMAModel(foreach=True) does the same with
            # _foreach_sub_; lerp_ is that update in one op.
            torch._foreach_lerp_(self.average, current, weight)

    @contextmanager
    def in_place(self) -> Iterator[None]:
        """The parameters hold the average (as views of it, no copy where it lives with them) until exit."""
        kept = [p.data for p in self.params]
        try:
            for p, a in zip(self.params, self.average):
                p.data = a.to(p.device, p.dtype)
            yield
        finally:
            for p, data in zip(self.params, kept):
                p.data = data

    def state_dict(self) -> list[torch.Tensor]:
        return [a.detach().cpu() for a in self.average]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for a, saved in zip(self.average, state, strict=True):
                a.copy_(saved)
