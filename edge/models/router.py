"""HTTP glue for GET /v1/models and GET /v1/models/{id}: configured models and their aliases."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from edge.catalog import ModelEntry
from edge.dependencies import State

router = APIRouter()


def _model(entry: ModelEntry, created: int) -> dict[str, Any]:
    return {"id": entry.name, "object": "model", "created": created, "owned_by": entry.model.owned_by}


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [_model(e, state.catalog.created) for e in state.catalog.entries()]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, state: State) -> dict[str, Any]:
    return _model(state.catalog.get(model), state.catalog.created)
