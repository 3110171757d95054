"""Steps skipped for a non-finite loss or gradients (fp16 safety): the check that decides a step is skipped, the
count the events and checkpoints carry, and the stop once advanced.max_consecutive_skipped_steps were skipped in
a row.

A skipped step moves nothing (no optimizer update, the schedule waits) but still counts as a step: its batch and
noise were drawn, so the data order and a resume stay those of a run without the skip (train/loop.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from conjure.errors import ConjureError
from conjure.runs.checkpoints import kept_checkpoint
from conjure.train.control import say
from conjure.train.sharding import whole

if TYPE_CHECKING:
    from accelerate import Accelerator


class TooManySkipped(ConjureError):
    """The run stopped after too many skips in a row. They changed nothing since the last good step, so the
    checkpoint kept is that state: the loop saves no rescue checkpoint for it."""


def read_step(accelerator: Accelerator, loss: torch.Tensor, params: Sequence[torch.Tensor],
              max_grad_norm: float | None) -> tuple[float, bool]:
    """The micro-batch's loss (all processes' mean) and whether it is finite, with the gradients where accumulation
    completes (clipping them where advanced.max_grad_norm is set; one answer for every process: the gradients are
    already reduced). Read from the device in one transfer: on a GPU each read waits for the queued work, and a
    finite check before the optimizer step and the loss read after it were two."""
    checks = [accelerator.reduce(loss.detach(), "mean").float()]
    # (sharded gradients have a DTensor norm, each process holding its part: `whole` sums them)
    if accelerator.sync_gradients and max_grad_norm:  # unscales fp16 gradients first, as the GradScaler's check does
        checks.append(whole(accelerator.clip_grad_norm_(params, max_grad_norm)).float())
    elif accelerator.sync_gradients and accelerator.scaler is None:
        checks.append(whole(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])).float())
    values = torch.stack([c.to(checks[0].device) for c in checks]).tolist()
    return values[0], all(map(math.isfinite, values))


@dataclass
class SkippedSteps:
    """The run's skipped steps: `total` so far and `in_a_row` (both checkpointed as `state()`)."""

    limit: int  # advanced.max_consecutive_skipped_steps
    total: int = 0
    in_a_row: int = 0

    def count(self, skipped: bool, loss: float, step: int, run_dir: Path) -> None:
        """Count step `step`; raise TooManySkipped (naming `run_dir`'s last checkpoint) at the limit, else warn."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if not skipped:
            return
        self.total += 1
        what = f"loss became {loss}" if not math.isfinite(loss) else "gradients became inf/nan"
        if self.in_a_row >= self.limit:
            raise TooManySkipped(
                f"{what} at step {step} ({self.in_a_row} step(s) in a row skipped, "
                f"advanced.max_consecutive_skipped_steps: {self.limit}); lower optimizer.learning_rate or use "
                f"advanced.mixed_precision: bf16/no ({kept_checkpoint(run_dir)})"
            )
        say(f"warning: step {step} skipped, {what} ({self.in_a_row} in a row)")

    def state(self) -> tuple[int, int]:
        return self.total, self.in_a_row

    def load(self, state: tuple[int, int] | None) -> None:
        """A checkpoint's `state()`; one written before skips were counted has none."""
        self.total, self.in_a_row = state or (0, 0)
