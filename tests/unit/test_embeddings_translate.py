"""The edge's side of /v1/embeddings: OpenAI's four input shapes, their errors, the two encodings, the table."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from ark.embeddings.v1 import embeddings_service_pb2 as pb
from edge.compat import EMBEDDINGS, apply_policy, markdown_table
from edge.embeddings.schemas import EmbeddingRequest
from edge.embeddings.translate import parse_input, request_to_proto, response_to_json
from services.common.config import LimitsConfig
from services.common.errors import InvalidRequestError
from tests.support.openapi import request_fields, validate

LIMITS = LimitsConfig(max_embedding_inputs=3)
EMBEDDINGS_MD = Path(__file__).resolve().parents[2] / "docs" / "embeddings.md"


def kinds(inputs: list[pb.EmbeddingInput]) -> list:
    return [i.text if i.WhichOneof("kind") == "text" else list(i.token_ids.ids) for i in inputs]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([5, 6, 7], [[5, 6, 7]]),
        ([[5, 6], [7]], [[5, 6], [7]]),
        ([1] * 10, [[1] * 10]),  # one input of ten tokens: the input-count limit does not apply
    ],
)
def test_the_four_input_shapes(value, expected):
    assert kinds(parse_input(value, LIMITS)) == expected


@pytest.mark.parametrize(
    ("value", "param", "code"),
    [
        ("", "input", "empty_string"),
        ([], "input", "empty_array"),
        (["a", ""], "input[1]", "empty_string"),
        ([[1], []], "input[1]", "empty_array"),
        (None, "input", "invalid_type"),
        (42, "input", "invalid_type"),
        ({"text": "a"}, "input", "invalid_type"),
        (["a", 1], "input[1]", "invalid_type"),
        ([1, "a"], "input[1]", "invalid_type"),
        ([True, False], "input[0]", "invalid_type"),
        ([1.5], "input[0]", "invalid_type"),
        ([[1], ["a"]], "input[1][0]", "invalid_type"),
        ([[1], 2], "input[1]", "invalid_type"),
        ([{"a": 1}], "input[0]", "invalid_type"),
        ([-1], "input[0]", "invalid_value"),
        ([2**31], "input[0]", "invalid_value"),
        (["a", "b", "c", "d"], "input", "array_above_max_length"),
    ],
)
def test_bad_inputs_name_the_offending_item(value, param, code):
    with pytest.raises(InvalidRequestError) as info:
        parse_input(value, LIMITS)
    assert (info.value.param, info.value.code, info.value.http_status) == (param, code, 400)


def test_request_carries_resolved_model_and_dimensions_only_when_set():
    body = EmbeddingRequest(input="hi", model="text-embedding-3-small")
    request = request_to_proto(body, model_id="all-minilm-l6-v2", request_id="req_1", limits=LIMITS)
    assert request.model == "all-minilm-l6-v2" and request.request_id == "req_1"
    assert not request.HasField("dimensions")
    body = EmbeddingRequest(input="hi", model="m", dimensions=128)
    assert request_to_proto(body, model_id="m", request_id="r", limits=LIMITS).dimensions == 128


def response(vectors: np.ndarray) -> pb.EmbedResponse:
    embeddings = [pb.Embedding(index=i, float32_le=v.astype("<f4").tobytes()) for i, v in enumerate(vectors)]
    return pb.EmbedResponse(embeddings=embeddings, prompt_tokens=7)


def test_float_and_base64_carry_the_same_float32_values():
    vectors = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32)
    as_float = response_to_json(response(vectors), model="m", encoding_format="float")
    as_b64 = response_to_json(response(vectors), model="m", encoding_format="base64")
    for i in range(2):
        floats = np.array(as_float["data"][i]["embedding"], dtype=np.float32)
        decoded = np.frombuffer(base64.b64decode(as_b64["data"][i]["embedding"]), dtype="<f4")
        assert np.array_equal(floats, vectors[i]) and np.array_equal(decoded, vectors[i])
    assert as_float["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert as_float["object"] == "list" and as_float["model"] == "m"


def test_float_response_is_a_valid_create_embedding_response():
    vectors = np.ones((1, 4), dtype=np.float32) / 2
    validate("CreateEmbeddingResponse", response_to_json(response(vectors), model="m", encoding_format="float"))


def test_user_is_accepted_and_reported_as_ignored():
    body = EmbeddingRequest(input="hi", model="m", user="u-1", encoding_format="base64")
    assert apply_policy(EMBEDDINGS, body) == ["user"]


def test_request_model_fields_are_the_tabled_ones_in_openai_order():
    assert list(EmbeddingRequest.model_fields) == ["input", "model", "encoding_format", "dimensions", "user"]
    assert set(EmbeddingRequest.model_fields) == set(EMBEDDINGS)


def test_table_covers_every_field_of_openai_create_embedding_request():
    assert set(EMBEDDINGS) == request_fields("CreateEmbeddingRequest")


def test_docs_show_the_parameter_table_from_the_code():
    assert markdown_table(EMBEDDINGS) in EMBEDDINGS_MD.read_text()
