"""The OpenAPI validator used by the suite must accept what OpenAI sends and reject what it would not."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.openapi import SPEC_PATH, load_spec, require_spec, validate

pytestmark = require_spec


def _chat_completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "ark-test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }


def _chunk(**choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "ark-test",
        "choices": [{"index": 0, **choice}],
    }


def test_spec_path_is_beside_the_checkout() -> None:
    assert SPEC_PATH.parts[-3:] == ("shared", "openai", "openapi.yaml")
    assert SPEC_PATH.parent.parent.parent == Path(__file__).resolve().parents[3]


def test_load_spec_is_cached_and_rewrites_nullable() -> None:
    spec = load_spec()
    started = time.perf_counter()
    assert load_spec() is spec
    assert time.perf_counter() - started < 0.01
    assert "nullable: true" in SPEC_PATH.read_text(encoding="utf-8")  # the quirk exists in the source...
    assert "'nullable': True" not in repr(spec)  # ...and is gone after loading
    finish = spec["components"]["schemas"]["CreateChatCompletionStreamResponse"]["properties"]["choices"]["items"]
    finish = finish["properties"]["finish_reason"]
    assert finish["type"] == ["string", "null"]
    assert None in finish["enum"]


def test_minimal_chat_completion_validates() -> None:
    validate("CreateChatCompletionResponse", _chat_completion())


def test_unknown_finish_reason_is_rejected() -> None:
    body = _chat_completion()
    body["choices"][0]["finish_reason"] = "bogus"
    with pytest.raises(AssertionError, match="bogus"):
        validate("CreateChatCompletionResponse", body)


def test_missing_choices_is_rejected() -> None:
    body = _chat_completion()
    del body["choices"]
    with pytest.raises(AssertionError, match="'choices' is a required property"):
        validate("CreateChatCompletionResponse", body)


def test_refs_are_followed() -> None:
    """The message lives behind a $ref: a wrong role there must still be caught."""
    body = _chat_completion()
    body["choices"][0]["message"]["role"] = "user"
    with pytest.raises(AssertionError, match="choices/0/message/role"):
        validate("CreateChatCompletionResponse", body)


def test_stream_chunk_with_null_finish_reason_validates() -> None:
    """finish_reason is `nullable: true` (OpenAPI 3.0 style) in the document: this fails without the rewrite."""
    validate("CreateChatCompletionStreamResponse", _chunk(delta={"content": "x"}, finish_reason=None))
    validate(
        "CreateChatCompletionStreamResponse", _chunk(delta={}, finish_reason="stop", logprobs=None) | {"usage": None}
    )


def test_stream_chunk_rejects_bogus_finish_reason() -> None:
    with pytest.raises(AssertionError):
        validate("CreateChatCompletionStreamResponse", _chunk(delta={"content": "x"}, finish_reason="bogus"))


def test_error_envelope_validates() -> None:
    body = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    validate("ErrorResponse", body)
    del body["error"]["code"]
    with pytest.raises(AssertionError, match="'code' is a required property"):
        validate("ErrorResponse", body)


def test_unknown_schema_name_fails_loudly() -> None:
    with pytest.raises(KeyError, match="NoSuchSchema"):
        validate("NoSuchSchema", {})
