"""Training tab, jobs and monitor API (stub: being written; see docs/ui.md)."""

from typing import Any

from fastapi import APIRouter

router = APIRouter(prefix="/api", tags=["training"])


def start_runner(app: Any) -> None:
    """Start the job runner thread for `app` (stub)."""
