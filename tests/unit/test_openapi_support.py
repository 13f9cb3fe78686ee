"""The validators used by the suite must accept what OpenAI sends and reject what it would not.

Every payload check runs against the openai package's types (in every checkout) and, where ../shared/openai/openapi.yaml
is present, against the document too. The JSON Schema machinery (the `nullable` rewrite, `$ref`s, caching) is tested
on a small OpenAPI document written here, so it is tested whether or not the shared one is present.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import openai_types
from tests.support.openapi import (
    SPEC_PATH,
    load_spec,
    spec_available,
    spec_request_fields,
    validate,
    validate_against_spec,
)

TESTS = Path(__file__).resolve().parents[1]

# The shared document where it is present; the openai package's types always.
CHECKERS = [openai_types.validate] + ([validate_against_spec] if spec_available() else [])
checkers = pytest.mark.parametrize("check", CHECKERS, ids=lambda f: f.__module__.rsplit(".", 1)[-1])


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


@checkers
def test_minimal_chat_completion_validates(check) -> None:
    check("CreateChatCompletionResponse", _chat_completion())


@checkers
def test_unknown_finish_reason_is_rejected(check) -> None:
    body = _chat_completion()
    body["choices"][0]["finish_reason"] = "bogus"
    with pytest.raises(AssertionError, match="choices/0/finish_reason"):
        check("CreateChatCompletionResponse", body)


@checkers
def test_missing_choices_is_rejected(check) -> None:
    body = _chat_completion()
    del body["choices"]
    with pytest.raises(AssertionError, match="choices"):
        check("CreateChatCompletionResponse", body)


@checkers
def test_nested_types_are_checked(check) -> None:
    """The message is a nested type (a $ref in the document): a wrong role there must still be caught."""
    body = _chat_completion()
    body["choices"][0]["message"]["role"] = "user"
    with pytest.raises(AssertionError, match="choices/0/message/role"):
        check("CreateChatCompletionResponse", body)


@checkers
def test_a_string_where_a_number_belongs_is_rejected(check) -> None:
    with pytest.raises(AssertionError, match="created"):
        check("CreateChatCompletionResponse", _chat_completion() | {"created": "1700000000"})


@checkers
def test_stream_chunk_with_null_finish_reason_validates(check) -> None:
    """finish_reason is `nullable: true` (OpenAPI 3.0 style) in the document: this fails without the rewrite."""
    check("CreateChatCompletionStreamResponse", _chunk(delta={"content": "x"}, finish_reason=None))
    check("CreateChatCompletionStreamResponse", _chunk(delta={}, finish_reason="stop", logprobs=None) | {"usage": None})


@checkers
def test_stream_chunk_rejects_bogus_finish_reason(check) -> None:
    with pytest.raises(AssertionError, match="finish_reason"):
        check("CreateChatCompletionStreamResponse", _chunk(delta={"content": "x"}, finish_reason="bogus"))


@checkers
def test_error_envelope_needs_all_four_keys(check) -> None:
    body = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    check("ErrorResponse", body)
    del body["error"]["code"]
    with pytest.raises(AssertionError, match="code"):
        check("ErrorResponse", body)


@checkers
def test_unknown_schema_name_fails_loudly(check) -> None:
    with pytest.raises(KeyError, match="NoSuchSchema"):
        check("NoSuchSchema", {})


def test_unknown_fields_are_reported_at_any_depth_unless_named_as_extensions() -> None:
    body = _chat_completion() | {"ark": {"session": "s"}}
    body["choices"][0]["message"]["surprise"] = 1
    with pytest.raises(AssertionError, match=r"2 unknown field\(s\)[\s\S]*at ark:[\s\S]*choices/0/message/surprise"):
        openai_types.validate("CreateChatCompletionResponse", body)
    openai_types.validate("CreateChatCompletionResponse", body, extensions={"ark", "choices.0.message.surprise"})


def test_validate_checks_the_openai_types_in_every_checkout() -> None:
    """`validate` is what the suite calls: it must fail on what only the openai types catch (an unknown field)."""
    validate("CreateChatCompletionResponse", _chat_completion())
    with pytest.raises(AssertionError, match="unknown field"):
        validate("CreateChatCompletionResponse", _chat_completion() | {"surprise": 1})


def test_every_schema_the_suite_validates_has_an_openai_type_and_is_in_the_document() -> None:
    used = {
        name
        for path in TESTS.rglob("*.py")
        for name in re.findall(r"""validate\(\s*["'](\w+)["']""", path.read_text(encoding="utf-8"))
    } - {"NoSuchSchema"}
    assert {"CreateChatCompletionResponse", "ErrorResponse"} <= used  # the scan finds the suite's calls
    assert used <= set(openai_types.RESPONSE_TYPES), used - set(openai_types.RESPONSE_TYPES)
    if spec_available():
        schemas = load_spec()["components"]["schemas"]
        assert set(openai_types.RESPONSE_TYPES) <= set(schemas), set(openai_types.RESPONSE_TYPES) - set(schemas)


@pytest.mark.parametrize("schema_name", sorted(openai_types.REQUEST_PARAMS))
def test_the_openai_package_sends_the_fields_the_document_defines(schema_name) -> None:
    """Where the document is absent the request tables are checked against the package: the two must agree."""
    fields = openai_types.request_fields(schema_name)
    assert {"model", "stream"} <= fields or schema_name == "CreateEmbeddingRequest"
    if spec_available():
        assert fields == spec_request_fields(schema_name)


# -- the JSON Schema machinery, on a document of our own -----------------------------------------------------------

SMALL_DOCUMENT = """
openapi: 3.1.0
components:
  schemas:
    Message:
      type: object
      required: [role]
      properties:
        role: {type: string, enum: [assistant]}
    Choice:
      type: object
      required: [message, finish_reason]
      properties:
        message: {$ref: '#/components/schemas/Message'}
        finish_reason: {type: string, enum: [stop, length], nullable: true}
        logprobs:
          nullable: true
          allOf: [{$ref: '#/components/schemas/Message'}]
"""


@pytest.fixture(scope="module")
def small_document(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openapi") / "openapi.yaml"
    path.write_text(SMALL_DOCUMENT)
    return path


def test_the_shared_document_is_looked_for_beside_the_checkout() -> None:
    assert SPEC_PATH.parts[-3:] == ("shared", "openai", "openapi.yaml")
    assert SPEC_PATH.parent.parent.parent == Path(__file__).resolve().parents[3]


def test_load_spec_is_cached_and_rewrites_nullable(small_document: Path) -> None:
    spec = load_spec(small_document)
    started = time.perf_counter()
    assert load_spec(small_document) is spec
    assert time.perf_counter() - started < 0.01
    assert "'nullable': True" not in repr(spec)
    finish = spec["components"]["schemas"]["Choice"]["properties"]["finish_reason"]
    assert finish["type"] == ["string", "null"] and None in finish["enum"]
    assert {"type": "null"} in spec["components"]["schemas"]["Choice"]["properties"]["logprobs"]["anyOf"]


def test_nullable_values_validate_and_refs_are_followed(small_document: Path) -> None:
    validate_against_spec("Choice", {"message": {"role": "assistant"}, "finish_reason": None}, small_document)
    validate_against_spec(
        "Choice", {"message": {"role": "assistant"}, "finish_reason": "stop", "logprobs": None}, small_document
    )
    with pytest.raises(AssertionError, match="message/role"):
        validate_against_spec("Choice", {"message": {"role": "user"}, "finish_reason": "stop"}, small_document)
    with pytest.raises(AssertionError, match="'finish_reason' is a required property"):
        validate_against_spec("Choice", {"message": {"role": "assistant"}}, small_document)
    with pytest.raises(KeyError, match="NoSuchSchema"):
        validate_against_spec("NoSuchSchema", {}, small_document)


def test_the_shared_document_keeps_the_quirk_the_rewrite_removes() -> None:
    """Where the shared document is present: it really marks nullable fields the 3.0 way, and loading removes it.
    Without it, the checkout has no such document to rewrite (the small one above exercises the same code)."""
    if not spec_available():
        assert not SPEC_PATH.exists()
        return
    assert "nullable: true" in SPEC_PATH.read_text(encoding="utf-8")
    spec = load_spec()
    assert "'nullable': True" not in repr(spec)
    finish = spec["components"]["schemas"]["CreateChatCompletionStreamResponse"]["properties"]["choices"]["items"]
    assert finish["properties"]["finish_reason"]["type"] == ["string", "null"]
