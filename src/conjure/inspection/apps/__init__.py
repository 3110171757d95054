"""Per-app loader rules: one module per app (`invokeai`, `comfyui`, `a1111`, `diffusers`), each with its NAME,
the VERSION whose loader code the rules were read from, and RULES (functions Inspection -> findings, each citing
the function of the app it restates). docs/app-loaders.md lists them with their sources."""

from __future__ import annotations

from types import ModuleType

from conjure.inspection.apps import a1111, comfyui, diffusers, invokeai
from conjure.inspection.checkpoint import model_verdict
from conjure.inspection.model import FAILING, IGNORED, REFUSED, Inspection, Verdict

APPS: tuple[ModuleType, ...] = (invokeai, comfyui, a1111, diffusers)

__all__ = ["APPS", "verdict", "verdicts"]


def verdict(app: ModuleType, insp: Inspection) -> Verdict:
    if insp.model is not None:
        return model_verdict(app, insp)
    findings = [f for rule in app.RULES for f in rule(insp)]
    total = len(insp.shapes)
    if any(f.outcome == REFUSED for f in findings):
        # the rules run in the app's order (probe, then load): it stops at the first refusal
        findings = [next(f for f in findings if f.outcome == REFUSED)]
        applied = 0
    else:
        lost = {k for f in findings if f.outcome in FAILING or f.outcome == IGNORED for k in f.keys}
        applied = total - len(lost)
    return Verdict(app=app.NAME, version=app.VERSION, findings=findings, applied=applied)


def verdicts(insp: Inspection) -> list[Verdict]:
    return [verdict(app, insp) for app in APPS]
