"""Token ids under an OpenAI model name are OpenAI's (cl100k_base): the edge decodes them to text; ARK's own model
ids keep meaning the model's own token ids."""

from __future__ import annotations

import pytest

from ark.embeddings.v1 import embeddings_service_pb2 as pb
from edge.catalog import Catalog
from edge.embeddings import openai_tokens
from edge.embeddings.schemas import EmbeddingRequest
from edge.embeddings.serving import Embeddings
from edge.embeddings.translate import parse_input
from services.common.config import LimitsConfig, load_config
from services.common.errors import InvalidRequestError

LIMITS = LimitsConfig(max_embedding_inputs=8)
TEXTS = ["hello world", "Héllo wörld — 東京 🚀", "  leading spaces and a tab\there.\n"]


@pytest.fixture(scope="module")
def cl100k() -> openai_tokens.OpenAIEncoding:
    return openai_tokens.load("cl100k_base")


def kinds(inputs: list[pb.EmbeddingInput]) -> list:
    return [i.text if i.WhichOneof("kind") == "text" else list(i.token_ids.ids) for i in inputs]


def test_openai_embedding_models_name_cl100k_and_arks_own_ids_name_nothing():
    for name in ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"):
        assert openai_tokens.encoding_for(name).name == "cl100k_base"
    assert openai_tokens.encoding_for("all-minilm-l6-v2") is None
    assert openai_tokens.encoding_for("gpt-4o") is None


def test_the_packaged_file_is_openais_cl100k_base(cl100k):
    # Ids published in tiktoken's own documentation, and the size of the encoding (100256 ranks + 5 special tokens).
    assert cl100k.encoding.encode("hello world") == [15339, 1917]
    assert len(cl100k.ids) == 100261 and cl100k.encoding.n_vocab == 100277


def test_token_arrays_travel_as_the_text_they_encode(cl100k):
    arrays = [cl100k.encoding.encode(text) for text in TEXTS]
    assert kinds(parse_input(arrays, LIMITS, cl100k)) == TEXTS
    assert kinds(parse_input(arrays[1], LIMITS, cl100k)) == [TEXTS[1]]


def test_without_an_openai_encoding_token_ids_stay_the_models_own():
    assert kinds(parse_input([[15339, 1917]], LIMITS)) == [[15339, 1917]]


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ([15339, 100256], "input[1]"),  # the gap between the ordinary and the special tokens
        ([100277], "input[0]"),  # beyond the encoding
        ([[15339], [1917, 2**31 - 1]], "input[1][1]"),
    ],
)
def test_ids_outside_cl100k_are_a_400_naming_the_item(cl100k, value, param):
    with pytest.raises(InvalidRequestError) as info:
        parse_input(value, LIMITS, cl100k)
    assert (info.value.param, info.value.code, info.value.http_status) == (param, "invalid_value", 400)
    assert "cl100k_base" in info.value.message


def test_shape_errors_come_first_and_are_the_same_as_without_an_encoding(cl100k):
    for value in ([[1], ["a"]], [-1], [[]]):
        with pytest.raises(InvalidRequestError) as with_encoding:
            parse_input(value, LIMITS, cl100k)
        with pytest.raises(InvalidRequestError) as without:
            parse_input(value, LIMITS)
        assert (with_encoding.value.param, with_encoding.value.code) == (without.value.param, without.value.code)


def test_an_input_cut_inside_a_character_decodes_as_tiktoken_does(cl100k):
    ids = cl100k.encoding.encode("rocket 🚀")
    cut = ids[:-1]
    assert kinds(parse_input(cut, LIMITS, cl100k)) == [cl100k.encoding.decode(cut)]
    assert kinds(parse_input(cut, LIMITS, cl100k))[0].endswith("\ufffd")


def test_serving_decodes_under_the_alias_and_not_under_the_model_id(cl100k):
    embeddings = Embeddings(Catalog(load_config()), backend=None, limits=LIMITS)
    ids = cl100k.encoding.encode("hello world")
    alias = embeddings.prepare(EmbeddingRequest(input=[ids], model="text-embedding-3-small"), request_id="r1")
    assert alias.model == "all-minilm-l6-v2" and kinds(alias.request.inputs) == ["hello world"]
    own = embeddings.prepare(EmbeddingRequest(input=[ids], model="all-minilm-l6-v2"), request_id="r2")
    assert kinds(own.request.inputs) == [ids]
