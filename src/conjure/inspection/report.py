"""What `conjure inspect` prints: the facts of an `Inspection` and the app verdicts as a table, or as JSON."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from conjure import families
from conjure.inspection.sharing import sharing_lines
from conjure.inspection.model import FAILING, IGNORED, Inspection, ModelFile, Module, Verdict

__all__ = ["as_json", "as_text", "trigger_words"]

# metadata keys worth a line of their own, in this order (kohya sd-scripts train_network.py, modelspec, conjure);
# the training record's base model, times, data and settings are the `sharing` table's (inspection/sharing.py)
TRAINING_KEYS = (
    "ss_output_name", "ss_training_comment", "ss_base_model_version", "ss_network_module",
    "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_steps", "ss_resolution",
    "modelspec.architecture", "modelspec.title", "modelspec.resolution",
    "modelspec.prediction_type", "modelspec.date", "modelspec.implementation", "name", "step",
)
_SKIPPED_META = {"lora_adapter_metadata", "ss_tag_frequency", "ss_dataset_dirs", "ss_datasets", "ss_bucket_info"}
_EXAMPLES = 3


def trigger_words(insp: Inspection) -> list[str]:
    """The words that call the adapter: conjure's keys, modelspec's trigger phrase, the most frequent kohya tags,
    and the names of the embeddings (what A1111/ComfyUI users type)."""
    meta = insp.metadata
    words = [w.strip() for key in ("conjure.trigger_words", "conjure.pivotal_token", "modelspec.trigger_phrase")
             for w in meta.get(key, "").split(",") if w.strip()]
    try:
        tags: Counter[str] = Counter()
        for folder in json.loads(meta.get("ss_tag_frequency", "{}")).values():
            tags.update({str(t): int(n) for t, n in folder.items()})
        words += [t for t, _ in tags.most_common(5)]
    except (ValueError, AttributeError, TypeError):
        pass  # a malformed tag table is another tool's; it only loses the hint
    words += [e.name for e in insp.embeddings if e.name]
    return list(dict.fromkeys(words))


def _range(values: list[float | int]) -> str:
    if not values:
        return "-"
    counts = Counter(values)
    lo, hi = min(values), max(values)
    if lo == hi:
        return f"{lo:g}"
    return f"{lo:g}-{hi:g} (most {counts.most_common(1)[0][0]:g})"


def _block(target: str) -> tuple[str, int | None]:
    """(block list, index) of a module path: ("down_blocks", 1), ("mid_block", None), ("text_model.encoder.layers", 3)."""
    hit = re.match(r"(.*?)\.(\d+)\.", target)
    if hit:
        return hit.group(1), int(hit.group(2))
    return target.rsplit(".", 1)[0] if "." in target else target, None


def _blocks(modules: list[Module]) -> str:
    groups: dict[str, list[int | None]] = {}
    for m in modules:
        for target in m.targets[:1]:
            name, index = _block(target)
            groups.setdefault(name, []).append(index)
    parts = []
    for name, indices in groups.items():
        numbers = sorted({i for i in indices if i is not None})
        span = "" if not numbers else f" {numbers[0]}" if len(numbers) == 1 else f" {numbers[0]}-{numbers[-1]}"
        parts.append(f"{name}{span} ({len(indices)})")
    return ", ".join(parts)


def _module_lines(insp: Inspection) -> list[str]:
    by_component: dict[str, list[Module]] = {}
    for m in insp.modules:
        by_component.setdefault(m.component or "not understood", []).append(m)
    lines = []
    for component, modules in by_component.items():
        namings = ", ".join(sorted({m.naming for m in modules}))
        where = _blocks(modules) if component != "not understood" else ", ".join(m.name for m in modules[:_EXAMPLES])
        lines.append(f"  {component}: {len(modules)} modules ({namings} names): {where}")
    return lines


def _family_line(insp: Inspection) -> str:
    if insp.family is None:
        return "unknown"
    title = families.get(insp.family).title
    return f"{title} ({insp.family})" + ("" if insp.family_certain else "? (not certain from names and shapes alone)")


def _model_lines(model: ModelFile) -> list[str]:
    present = [p for p, held in model.parts.items() if held]
    return [
        f"layout    {model.description}",
        f"predicts  {model.prediction}",
        f"size      {model.size / 2**20:,.1f} MiB, {model.parameters:,} parameters",
        f"parts     {', '.join(present)}" + (f"; missing: {', '.join(model.missing)}" if model.missing else ""),
    ]


def _verdict_lines(v: Verdict, total: int) -> list[str]:
    if v.summary:
        return [f"  {v.app:<20} {v.summary}"]
    failing = [f for f in v.findings if f.outcome in FAILING]
    head = f"  {v.app:<20} " + (f"ok: {v.applied} of {total} tensors applied" if v.complete else
                                 f"NOT COMPLETE: {v.applied} of {total} tensors applied as trained")
    lines = [head]
    for f in failing + [f for f in v.findings if f.outcome == IGNORED]:
        sample = ", ".join(f.keys[:_EXAMPLES]) + (f" (+{len(f.keys) - _EXAMPLES} more)" if len(f.keys) > _EXAMPLES else "")
        lines.append(f"    {f.outcome} {len(f.keys)}: {f.reason}")
        if sample:
            lines.append(f"      {sample}")
    return lines


def as_text(insp: Inspection, verdicts: list[Verdict]) -> str:
    dtypes = ", ".join(sorted(set(insp.dtypes.values())))
    lines = [
        f"file      {insp.path} ({insp.format}, {len(insp.shapes)} tensors, {dtypes})",
        f"kind      {insp.kind}",
        f"family    {_family_line(insp)}",
    ]
    if insp.model:
        lines += _model_lines(insp.model)
    if insp.modules:
        lines += [
            f"rank      {_range([m.rank for m in insp.modules if m.rank])}",
            f"alpha     {_range([m.alpha for m in insp.modules if m.alpha is not None])}"
            + ("" if all(m.alpha is not None for m in insp.modules) else " (modules without alpha: alpha = rank)"),
            "modules",
            *_module_lines(insp),
        ]
    for e in insp.embeddings:
        shapes = ", ".join(f"{k} {list(s)}" for k, s in e.shapes.items())
        lines.append(f"embedding {e.name or '(file name)'}{' (bundled)' if e.bundled else ''}: {e.vectors} vectors; {shapes}")
    if insp.unknown:
        lines.append(f"unknown   {len(insp.unknown)} tensors: {', '.join(insp.unknown[:_EXAMPLES])}")
    words = trigger_words(insp)
    if not insp.model:  # a model has no trigger words
        lines.append(f"trigger   {', '.join(words) if words else '(none in the metadata)'}")
    facts = [(k, insp.metadata[k]) for k in TRAINING_KEYS if k in insp.metadata]
    facts += [(k, v) for k, v in sorted(insp.metadata.items()) if k.startswith("conjure.") and len(v) < 200]
    if facts:
        lines.append("metadata")
        lines += [f"  {k}: {v}" for k, v in facts]
    lines += sharing_lines(insp.metadata)
    lines.append("apps")
    for v in verdicts:
        lines += _verdict_lines(v, len(insp.shapes))
    return "\n".join(lines)


def as_json(insp: Inspection, verdicts: list[Verdict]) -> dict[str, Any]:
    return {
        "path": insp.path, "format": insp.format, "kind": insp.kind, "family": insp.family,
        "family_certain": insp.family_certain, "tensors": len(insp.shapes),
        "modules": [
            {"name": m.name, "component": m.component, "targets": list(m.targets), "naming": m.naming,
             "spelling": m.spelling, "algorithm": m.algorithm, "rank": m.rank, "alpha": m.alpha,
             "parts": m.parts, "shapes": {r: list(s) for r, s in m.shapes.items()}}
            for m in insp.modules
        ],
        "embeddings": [
            {"name": e.name, "bundled": e.bundled, "vectors": e.vectors, "tensors": e.tensors,
             "shapes": {k: list(s) for k, s in e.shapes.items()}}
            for e in insp.embeddings
        ],
        "unknown": insp.unknown,
        "model": None if insp.model is None else {
            "layout": insp.model.layout, "parts": insp.model.parts, "prediction": insp.model.prediction,
            "parameters": insp.model.parameters, "size": insp.model.size},
        "trigger_words": trigger_words(insp),
        "metadata": {k: v for k, v in insp.metadata.items() if k not in _SKIPPED_META},
        "apps": [
            {"app": v.app, "version": v.version, "complete": v.complete, "applied": v.applied, "summary": v.summary,
             "findings": [{"outcome": f.outcome, "reason": f.reason, "keys": list(f.keys)} for f in v.findings]}
            for v in verdicts
        ],
    }
