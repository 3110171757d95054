"""Which step is best: a run's evidence per step (`read_rows`) and the step it suggests (`suggest`).

The evidence comes from the run's events.jsonl: the held-out loss of each validation (`validation_loss`, written by
conjure.train.heldout), the image scores of each validation (`image_scores`: fidelity and alignment, conjure.scoring)
and the checkpoints still in the folder. The rule, in order:

1. the base is step 0 (the validation before training); without a held-out loss there is nothing to suggest;
2. no step improved on the base when no checkpointed step's held-out loss is below the base's by more than
   `IMPROVED` of it (a run that never learns, or only got worse);
3. near-best steps: those whose loss is within `LOSS_MARGIN` of the improvement (base - best) above the best;
4. among them, where image scores exist, those whose fidelity has reached `FIDELITY_MARGIN` of the best fidelity
   (it has plateaued) and whose alignment has not fallen more than `ALIGNMENT_MARGIN` below the base's;
5. the earliest such step (the least over-trained one), else the step of the best loss.

kohya-ss/sd-scripts logs a held-out loss (docs/validation.md, `--validation_split`) and EveryDream2 one on a split
or a folder of its own (its validation config's `val_split_mode`); neither suggests a step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from conjure.runs.checkpoints import list_checkpoints
from conjure.runs.events import EVENTS_FILE, Event, read_events

IMPROVED = 0.01
LOSS_MARGIN = 0.1
FIDELITY_MARGIN = 0.02
ALIGNMENT_MARGIN = 0.02
RULE = (f"the earliest checkpointed step whose held-out loss is within {LOSS_MARGIN:.0%} of the improvement over "
        f"step 0 of the best, whose fidelity is within {FIDELITY_MARGIN} of the best and whose alignment is at most "
        f"{ALIGNMENT_MARGIN} below step 0's (the scores where measured)")


@dataclass(frozen=True)
class StepRow:
    """One validated or checkpointed step: its held-out loss (overall and per timestep band), its image scores
    (None where not measured) and its checkpoint folder (None: none kept)."""

    step: int
    val_loss: float | None = None
    bands: dict[str, float] = field(default_factory=dict)
    fidelity: float | None = None
    alignment: float | None = None
    checkpoint: str | None = None


@dataclass(frozen=True)
class Suggestion:
    step: int | None
    rule: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_rows(run_dir: Path) -> list[StepRow]:
    """The run's steps with a held-out loss, image scores or a kept checkpoint, oldest first (a resumed run's
    repeated step keeps its last figures)."""
    rows: dict[int, dict[str, Any]] = {}
    for event in read_events(Path(run_dir) / EVENTS_FILE).events:
        kind, step = event.get("event"), event.get("step")
        if not isinstance(step, int):
            continue
        if kind == Event.VALIDATION_LOSS:
            rows.setdefault(step, {}).update(val_loss=event.get("loss"), bands=dict(event.get("bands") or {}))
        elif kind == Event.IMAGE_SCORES:
            rows.setdefault(step, {}).update(fidelity=event.get("fidelity"), alignment=event.get("alignment"))
    for step, folder in list_checkpoints(run_dir):
        rows.setdefault(step, {})["checkpoint"] = str(folder)
    return [StepRow(step=step, **values) for step, values in sorted(rows.items())]


def _scores_hold(row: StepRow, best_fidelity: float | None, base_alignment: float | None) -> bool:
    if best_fidelity is not None and row.fidelity is not None and row.fidelity < best_fidelity - FIDELITY_MARGIN:
        return False
    return not (base_alignment is not None and row.alignment is not None
                and row.alignment < base_alignment - ALIGNMENT_MARGIN)


def suggest(rows: list[StepRow]) -> Suggestion:
    """The step to take by the module's rule, the rule in words and why this step (or why none)."""
    base = next((r for r in rows if r.step == 0 and r.val_loss is not None), None)
    trained = [r for r in rows if r.step > 0 and r.val_loss is not None and r.checkpoint is not None]
    if base is None or base.val_loss is None or not trained:
        why = ("no held-out loss at step 0 (set validation.holdout or validation.loss_images, and validation.at_start)"
               if base is None else "no kept checkpoint of a step with a held-out loss (validate at the steps that "
               "are saved: basic.validate_every_n_steps a multiple of save_every_n_steps)")
        return Suggestion(None, RULE, f"nothing to compare: {why}")
    best = min(trained, key=lambda r: (r.val_loss, r.step))
    assert best.val_loss is not None  # every trained row has one
    if best.val_loss >= base.val_loss * (1 - IMPROVED):
        return Suggestion(None, RULE, f"no step improved on the base: the best held-out loss, {best.val_loss:.4f} "
                                      f"at step {best.step}, is not below step 0's {base.val_loss:.4f}")
    near = [r for r in trained if r.val_loss is not None
            and r.val_loss <= best.val_loss + LOSS_MARGIN * (base.val_loss - best.val_loss)]
    fidelities = [r.fidelity for r in near if r.fidelity is not None]
    kept = [r for r in near if _scores_hold(r, max(fidelities) if fidelities else None, base.alignment)]
    chosen = kept[0] if kept else best
    scores = "" if chosen.fidelity is None else f", fidelity {chosen.fidelity:.3f}"
    scores += "" if chosen.alignment is None else f", alignment {chosen.alignment:.3f}"
    return Suggestion(chosen.step, RULE, f"step {chosen.step}: held-out loss {chosen.val_loss:.4f}{scores}; best "
                                         f"{best.val_loss:.4f} at step {best.step}, step 0 {base.val_loss:.4f}")
