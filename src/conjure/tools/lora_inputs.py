"""The LoRA files `conjure lora` reads (`FILE[:WEIGHT]`) and the one-alpha form it writes.

Any file `conjure inspect` reads (kohya, diffusers/PEFT, LyCORIS LoCon, attn-procs, ... layouts) comes in through
`inspection.weights.lora_weights` as `adapters.LoraWeights`; LoHa/LoKr and full-difference modules are refused
there by name."""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from conjure.adapters import LoraWeights
from conjure.errors import ConjureError

__all__ = ["LoraInput", "one_alpha", "parse_input", "read_input"]


@dataclass(frozen=True)
class LoraInput:
    path: Path
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.weight:g}"


def parse_input(text: str) -> LoraInput:
    """`FILE` or `FILE:WEIGHT` (a path that itself ends in `:<not a number>` stays whole)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return LoraInput(Path(head), float(tail))
        except ValueError:
            pass
    return LoraInput(Path(text))


def read_input(lora: LoraInput) -> tuple[LoraWeights, str, dict[str, str]]:
    """(weights, family name, metadata) of one LoRA/DoRA file."""
    from conjure.inspection.reader import inspect_file
    from conjure.inspection.weights import lora_weights

    insp = inspect_file(lora.path)
    if not insp.modules:
        raise ConjureError(f"{lora.path} is {insp.kind}, not a LoRA/DoRA file")
    if insp.family is None:
        raise ConjureError(f"cannot tell which model family {lora.path} is for")
    return lora_weights(insp), insp.family, dict(insp.metadata)


def one_alpha(weights: LoraWeights) -> tuple[LoraWeights, float]:
    """The same updates with one alpha for every module, the most common rank (scale 1 there), the rest folded into
    `lora_up`. One alpha because diffusers 0.42's kohya reader applies the most common alpha to every attention
    projection (export/kohya.py save_kohya): per-module alphas would load wrongly there."""
    ranks = collections.Counter(m.rank for m in weights.values())
    alpha = float(ranks.most_common(1)[0][0])
    out = {
        key: m if m.alpha == alpha else dataclasses.replace(m, up=m.up * (m.alpha / alpha), alpha=alpha)
        for key, m in weights.items()
    }
    return out, alpha
