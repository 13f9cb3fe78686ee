"""Validate ARK's HTTP payloads against the pydantic types of the installed `openai` package, strictly.

The official Python client (pinned in pyproject's dev extra) is generated from OpenAI's OpenAPI document and
installed by `make install`, so every checkout has it, with or without ``../shared`` beside it. Its models are
lenient on purpose (``extra="allow"``, lax coercion); here they are used strictly: JSON-mode strict validation (no
``"1"`` for ``1``), the models' required fields and literals enforced, and every field a model does not declare
reported by walking ``model_extra`` through the whole parsed tree. ARK's own extensions are named by the caller.

:data:`RESPONSE_TYPES` maps the OpenAPI schema names the tests use to the package's types; the requests' fields come
from the package's ``*CreateParams`` TypedDicts (:data:`REQUEST_PARAMS`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from typing import Any, Literal

import pydantic
from openai import BaseModel
from openai.types import CreateEmbeddingResponse, Model, embedding_create_params
from openai.types.audio import (
    Transcription,
    TranscriptionStreamEvent,
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
    transcription_create_params,
)
from openai.types.chat import ChatCompletion, ChatCompletionChunk, completion_create_params
from openai.types.conversations import Conversation, ConversationDeletedResource, ConversationItemList
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from openai.types.shared import ErrorObject

__all__ = ["REQUEST_PARAMS", "RESPONSE_TYPES", "request_fields", "validate"]


class _StrictErrorObject(ErrorObject):
    """The SDK defaults `param` and `code` to None; OpenAI's envelope (and ARK's) always carries both keys."""

    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """`{"error": {...}}`: the SDK reads the envelope by hand and has no model for it."""

    error: _StrictErrorObject


class ListModelsResponse(BaseModel):
    """GET /v1/models: the SDK pages `Model`s and has no model for the page itself."""

    object: Literal["list"]
    data: list[Model]


# OpenAPI schema name (as in ../shared/openai/openapi.yaml) -> the openai package's type for it.
RESPONSE_TYPES: dict[str, Any] = {
    "CreateChatCompletionResponse": ChatCompletion,
    "CreateChatCompletionStreamResponse": ChatCompletionChunk,
    "CreateEmbeddingResponse": CreateEmbeddingResponse,
    "ListModelsResponse": ListModelsResponse,
    "Model": Model,
    "ErrorResponse": ErrorResponse,
    "CreateTranscriptionResponseJson": Transcription,
    "CreateTranscriptionResponseVerboseJson": TranscriptionVerbose,
    "CreateTranscriptionResponseStreamEvent": TranscriptionStreamEvent,
    "TranscriptTextDeltaEvent": TranscriptionTextDeltaEvent,
    "TranscriptTextDoneEvent": TranscriptionTextDoneEvent,
    "Response": Response,
    "ResponseStreamEvent": ResponseStreamEvent,
    "ResponseItemList": ResponseItemList,
    "ConversationResource": Conversation,
    "DeletedConversationResource": ConversationDeletedResource,
    "ConversationItemList": ConversationItemList,
}

# Fields OpenAI's API itself returns that neither its document nor its SDK declares: accepted like extensions.
UNDECLARED_OPENAI_FIELDS: dict[str, frozenset[str]] = {
    "CreateTranscriptionResponseVerboseJson": frozenset({"task"}),  # "transcribe", in every verbose_json
    # Whether the response is stored: in every response object OpenAI returns (its API reference's examples).
    "Response": frozenset({"store"}),
    "ResponseStreamEvent": frozenset({"response.store"}),
}

# OpenAPI request schema name -> the TypedDict of the SDK's `create(...)` keyword arguments. The streaming variant
# is the one that declares `stream` (the base leaves it to its two subclasses).
REQUEST_PARAMS: dict[str, Any] = {
    "CreateChatCompletionRequest": completion_create_params.CompletionCreateParamsStreaming,
    "CreateEmbeddingRequest": embedding_create_params.EmbeddingCreateParams,
    "CreateTranscriptionRequest": transcription_create_params.TranscriptionCreateParamsStreaming,
}
# Not CreateResponse: openai 3.51.0's ResponseCreateParams has two fields the shared document lacks (`image`,
# `access_programs`), so a table checked against one would fail against the other.


def request_fields(schema_name: str) -> set[str]:
    """The fields the openai package sends for a request schema (its TypedDict's keys, inherited ones included)."""
    return set(REQUEST_PARAMS[schema_name].__annotations__)


@functools.cache
def _adapter(schema_name: str) -> pydantic.TypeAdapter:
    if schema_name not in RESPONSE_TYPES:
        raise KeyError(f"no openai type for schema {schema_name!r} in tests.support.openai_types.RESPONSE_TYPES")
    return pydantic.TypeAdapter(RESPONSE_TYPES[schema_name])


def _unknown_fields(value: Any, path: tuple[str | int, ...]) -> list[tuple[str | int, ...]]:
    """Paths of every key a parsed model did not declare, at any depth."""
    found: list[tuple[str | int, ...]] = []
    if isinstance(value, pydantic.BaseModel):
        found += [(*path, key) for key in value.model_extra or {}]
        for name in type(value).model_fields:
            found += _unknown_fields(getattr(value, name), (*path, name))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found += _unknown_fields(item, (*path, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            found += _unknown_fields(item, (*path, key))
    return found


def validate(schema_name: str, instance: Any, *, extensions: Collection[str] = ()) -> None:
    """Fail with every violation listed when ``instance`` is not a ``schema_name`` as the openai package defines it.

    ``extensions`` are ARK's own additions, as dotted paths from the root (``"ark"``); any other undeclared field is
    an error, as is a missing required field, a wrong literal or a wrong JSON type.
    """
    try:
        parsed = _adapter(schema_name).validate_json(json.dumps(instance), strict=True)
    except pydantic.ValidationError as exc:
        lines = [f"  at {'/'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()]
        raise AssertionError(
            f"{exc.error_count()} error(s) validating against openai's type for {schema_name}:\n" + "\n".join(lines)
        ) from None
    allowed = set(extensions) | UNDECLARED_OPENAI_FIELDS.get(schema_name, frozenset())
    unknown = [p for p in _unknown_fields(parsed, ()) if ".".join(map(str, p)) not in allowed]
    if unknown:
        listed = "\n".join(f"  at {'/'.join(map(str, p))}: not a field of openai's type" for p in unknown)
        raise AssertionError(f"{len(unknown)} unknown field(s) for {schema_name}:\n{listed}")
