"""The LoRA files `conjure lora` reads (`FILE[:WEIGHT]`).

Any file `conjure inspect` reads (kohya, diffusers/PEFT, LyCORIS LoCon, attn-procs, ... layouts) comes in through
`inspection.weights.lora_weights` as `adapters.LoraWeights`; LoHa/LoKr and full-difference modules are refused
there by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conjure.adapters import LoraWeights
from conjure.errors import ConjureError

__all__ = ["LoraFile", "LoraInput", "bundle_note", "parse_input", "read_input"]


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


@dataclass(frozen=True)
class LoraFile:
    weights: LoraWeights
    family: str
    metadata: dict[str, str]
    bundled: list[str]  # names of the embeddings bundled in the file (bundle_emb.*), which no LoRA tool carries


def read_input(lora: LoraInput) -> LoraFile:
    """One LoRA/DoRA file read; refused when some tensor is no module's part (using the rest would drop it)."""
    from conjure.inspection.reader import inspect_file
    from conjure.inspection.weights import lora_weights

    insp = inspect_file(lora.path)
    if not insp.modules:
        raise ConjureError(f"{lora.path} is {insp.kind}, not a LoRA/DoRA file")
    if insp.unknown:
        raise ConjureError(f"{lora.path}: {len(insp.unknown)} tensors belong to no LoRA module (first: "
                           f"{insp.unknown[0]}); using the rest would drop them")
    if insp.family is None:
        raise ConjureError(f"cannot tell which model family {lora.path} is for")
    return LoraFile(lora_weights(insp), insp.family, dict(insp.metadata), [e.name for e in insp.bundled()])


def bundle_note(path: Path, names: list[str]) -> str:
    """What the tools say of the embeddings bundled in a file they read."""
    return (f"note: {path} bundles the embedding(s) {', '.join(names)}, which this leaves out; "
            f"`conjure convert {path} OUT --split-bundle` writes them as embedding files")
