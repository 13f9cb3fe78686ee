"""Liveness and readiness of the edge (no auth: probes carry no key)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()


@router.get("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", include_in_schema=False)
async def ready() -> dict[str, str]:
    return {"status": "ready"}
