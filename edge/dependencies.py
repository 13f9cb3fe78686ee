"""Typed access to the edge's lifespan state and the per-request context, as FastAPI dependencies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Cookie, Depends, Request
from pydantic import BaseModel, ValidationError

from edge.catalog import Catalog
from edge.chat.serving import ChatCompletions
from edge.conversations.serving import Conversations
from edge.embeddings.serving import Embeddings
from edge.errors import validation_error
from edge.responses.serving import Responses
from edge.sessions.cookies import COOKIE_NAME
from edge.sessions.placement import SessionPlacer
from edge.transcriptions.serving import Transcriptions
from services.common.config import ArkConfig


@dataclass(frozen=True, slots=True)
class EdgeState:
    """Everything the routers need, built once in the lifespan."""

    config: ArkConfig
    catalog: Catalog
    chat: ChatCompletions
    embeddings: Embeddings
    sessions: SessionPlacer
    transcriptions: Transcriptions
    responses: Responses
    conversations: Conversations


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    api_key_hash: str


# Every dependency is `async def`, as none blocks: FastAPI runs a plain `def` dependency in its thread pool, a
# thread hop per request on the hot path.
async def get_state(request: Request) -> EdgeState:
    return request.state.ark


async def get_context(request: Request) -> RequestContext:
    return RequestContext(request.state.request_id, getattr(request.state, "api_key_hash", ""))


async def get_chat(request: Request) -> ChatCompletions:
    return request.state.ark.chat


async def get_embeddings(request: Request) -> Embeddings:
    return request.state.ark.embeddings


async def get_transcriptions(request: Request) -> Transcriptions:
    return request.state.ark.transcriptions


State = Annotated[EdgeState, Depends(get_state)]
Ctx = Annotated[RequestContext, Depends(get_context)]
Chat = Annotated[ChatCompletions, Depends(get_chat)]
EmbeddingsDep = Annotated[Embeddings, Depends(get_embeddings)]
TranscriptionsDep = Annotated[Transcriptions, Depends(get_transcriptions)]
SessionCookie = Annotated[str | None, Cookie(alias=COOKIE_NAME)]


Body = TypeVar("Body", bound=BaseModel)


def json_body(model: type[Body]) -> Any:
    """Parse the body as JSON whatever its Content-Type (curl -d sends form encoding; OpenAI accepts it)."""

    async def parse(request: Request) -> Body:
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None

    dependency: Callable[[Request], Awaitable[Body]] = parse
    return Depends(dependency)
