"""HTTP glue for POST /v1/embeddings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from edge.dependencies import Ctx, EmbeddingsDep, json_body
from edge.embeddings.schemas import EmbeddingRequest

router = APIRouter()


@router.post("/v1/embeddings", response_model=None)
async def create_embedding(
    body: Annotated[EmbeddingRequest, json_body(EmbeddingRequest)], ctx: Ctx, embeddings: EmbeddingsDep
) -> JSONResponse:
    embeddings.admit(body)  # overloaded: 429 before the inputs are checked and translated
    job = embeddings.prepare(body, request_id=ctx.request_id)
    headers = {"x-ark-ignored-params": ",".join(job.ignored_params)} if job.ignored_params else {}
    return JSONResponse(await embeddings.create(job), headers=headers)
