"""Data-set tab API (stub: being written; see docs/ui.md)."""

from fastapi import APIRouter

router = APIRouter(prefix="/api/datasets", tags=["data sets"])
