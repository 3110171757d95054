"""The curves behind `conjure runs score`'s suggestion as one PNG in the run folder (`PLOT_FILE`): a panel per
measured figure (held-out loss, fidelity, alignment) over the steps, the suggested step marked in each.

Drawn with Pillow, which conjure already needs, rather than matplotlib (a 30 MB dependency for three line charts).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from conjure.files import atomic_write
from conjure.runs.best import StepRow, Suggestion

PLOT_FILE = "score.png"
PANELS: tuple[tuple[str, str], ...] = (
    ("val_loss", "held-out loss (lower is better)"),
    ("fidelity", "fidelity: similarity to the training images"),
    ("alignment", "alignment: similarity to the prompt with the class word"),
)
_WIDTH, _PANEL, _LEFT, _RIGHT, _TOP, _GAP = 760, 170, 78, 24, 40, 46
_LINE, _MARK, _GRID, _TEXT = (31, 94, 168), (214, 96, 24), (225, 225, 225), (40, 40, 40)


def _label(value: float) -> str:
    return f"{value:.4g}"


def _x_ticks(steps: list[int]) -> list[int]:
    """Every step when there are few, else about eight spread over them (first and last kept)."""
    if len(steps) <= 10:
        return steps
    every = -(-len(steps) // 8)
    return sorted({*steps[::every], steps[-1]})


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, points: list[tuple[int, float]],
           to_x: Callable[[int], float], ticks: list[int], suggested: int | None) -> None:
    font = ImageFont.load_default(size=13)
    bottom, right = top + _PANEL, _WIDTH - _RIGHT
    draw.text((_LEFT, top - 20), title, fill=_TEXT, font=font)
    draw.rectangle((_LEFT, top, right, bottom), outline=_TEXT)
    for step in ticks:
        draw.line((to_x(step), top + 1, to_x(step), bottom - 1), fill=_GRID)
        draw.text((to_x(step), bottom + 4), str(step), fill=_TEXT, font=font, anchor="mt")
    low, high = min(v for _, v in points), max(v for _, v in points)
    pad = (high - low) * 0.08 or abs(high) * 0.05 or 0.05  # a flat line sits mid-panel

    def to_y(value: float) -> float:
        return bottom - (value - (low - pad)) / ((high + pad) - (low - pad)) * _PANEL

    for value in (low, high):
        draw.text((_LEFT - 6, to_y(value)), _label(value), fill=_TEXT, font=font, anchor="rm")
    if suggested is not None:
        draw.line((to_x(suggested), top, to_x(suggested), bottom), fill=_MARK, width=3)
    xy = [(to_x(step), to_y(value)) for step, value in points]
    if len(xy) > 1:
        draw.line(xy, fill=_LINE, width=2)
    for x, y in xy:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=_LINE)


def plot(rows: list[StepRow], suggestion: Suggestion) -> Image.Image:
    """The panels of the figures `rows` have (a row without a figure leaves a gap in that curve only)."""
    series = [(title, [(r.step, v) for r in rows if (v := getattr(r, name)) is not None]) for name, title in PANELS]
    series = [(title, points) for title, points in series if points]
    height = _TOP + max(len(series), 1) * (_PANEL + _GAP) + 10
    image = Image.new("RGB", (_WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    chosen = "none" if suggestion.step is None else f"step {suggestion.step}"
    draw.text((_LEFT, 10), f"suggested: {chosen}", fill=_MARK, font=ImageFont.load_default(size=15))
    steps = sorted({step for _, points in series for step, _ in points})
    if not steps:
        draw.text((_LEFT, _TOP + 20), "no held-out loss or image scores in this run", fill=_TEXT)
        return image
    first, last = steps[0], steps[-1]

    def to_x(step: int) -> float:
        return _LEFT + 8 + (step - first) / ((last - first) or 1) * (_WIDTH - _LEFT - _RIGHT - 16)

    for i, (title, points) in enumerate(series):
        _panel(draw, _TOP + 20 + i * (_PANEL + _GAP), title, points, to_x, _x_ticks(steps), suggestion.step)
    return image


def write_plot(rows: list[StepRow], suggestion: Suggestion, path: Path) -> Path:
    """Write `plot(rows, suggestion)` as a PNG at `path` (atomically: the web app may be reading it)."""
    image = plot(rows, suggestion)
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))
    return Path(path)
