"""What the per-app rule modules share: findings grouped by reason, the DoRA-scale orientation test, and the
rules that read the same in several apps. A rule is a function Inspection -> list[Finding]."""

from __future__ import annotations

import re
from typing import Callable, Iterable

from conjure import families
from conjure.inspection.model import DROPPED, IGNORED, REFUSED, Finding, Inspection, Module

Rule = Callable[[Inspection], list[Finding]]

# CLIP text-encoder layers every app maps (ComfyUI comfy/lora.py LORA_CLIP_MAP; A1111 and InvokeAI read the same)
CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def grouped(outcome: str, items: Iterable[tuple[str, Iterable[str]]]) -> list[Finding]:
    """One finding per distinct reason, with the keys of every (reason, keys) item that gave it."""
    by_reason: dict[str, list[str]] = {}
    for reason, keys in items:
        by_reason.setdefault(reason, []).extend(keys)
    return [Finding(outcome, reason, tuple(keys)) for reason, keys in by_reason.items()]


def modules_where(insp: Inspection, outcome: str, why: Callable[[Module], str | None]) -> list[Finding]:
    """Findings for the modules `why` gives a reason for (None: the module is fine)."""
    return grouped(outcome, ((r, m.keys) for m in insp.modules if (r := why(m)) is not None))


def unknown_keys_dropped(app: str) -> Rule:
    def rule(insp: Inspection) -> list[Finding]:
        if not insp.unknown or insp.is_embedding:
            return []
        return [Finding(DROPPED, f"neither an adapter part nor an embedding: {app} does not read it",
                        tuple(insp.unknown))]
    return rule


def bundles_ignored(reason: str) -> Rule:
    """Bundled embeddings an app's LoRA loader does not read: nothing is lost when the embedding also ships as
    its own file (conjure always writes both)."""
    def rule(insp: Inspection) -> list[Finding]:
        return grouped(IGNORED, ((reason, e.tensors.values()) for e in insp.bundled()))
    return rule


def family_of(insp: Inspection) -> families.Family:
    return families.get(insp.family or families.SD1.name)


def slot_kind(insp: Inspection, component: str | None) -> str | None:
    """"clip" / "t5" for a text-encoder component, None for the denoiser or an unknown one."""
    slot = family_of(insp).slot(component) if component else None
    return slot.kind if slot else None


def embedding_widths(app: str) -> Rule:
    """An embedding whose tensor names and widths are no family's (family records: embedding_key, width) loads in
    no model: every app checks the width against its text encoder and skips a mismatch."""
    def rule(insp: Inspection) -> list[Finding]:
        if not insp.is_embedding or insp.family_certain:
            return []
        keys = tuple(k for e in insp.embeddings for k in e.tensors.values())
        widths = sorted({s[-1] for e in insp.embeddings for s in e.shapes.values()})
        return [Finding(DROPPED, f"tensor names/widths ({', '.join(map(str, widths))}) fit no real model's text "
                        f"encoders, as a toy or tiny model's would ({app} skips it)", keys)]
    return rule


def one_tensor_embedding(why: str) -> Rule:
    """Loaders that take a single-encoder embedding only as a file of exactly one tensor."""
    def rule(insp: Inspection) -> list[Finding]:
        if not insp.is_embedding or len(family_of(insp).text_encoders) != 1 or len(insp.shapes) == 1:
            return []
        return [Finding(REFUSED, why, tuple(insp.shapes))]
    return rule
