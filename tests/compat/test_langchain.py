"""LangChain (`langchain-openai`) against ARK with its defaults: chat, streaming, embeddings, error classes.

Tools and structured output are in test_langchain_tools.py.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import tiktoken
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from tests.compat.conftest import (
    ANCHOR,
    ARK_EMBEDDING_MODEL,
    CHAT_MODEL,
    CLIENT_TIMEOUT,
    EMBEDDING_MODEL,
    PARAPHRASE,
    UNRELATED,
    cosine,
)
from tests.support.stack import RunningStack

pytestmark = pytest.mark.e2e

QUESTION = [SystemMessage("You are a helpful assistant."), HumanMessage("Please name the capital of France.")]


def chat(stack: RunningStack, **kwargs) -> ChatOpenAI:
    options = {"model": CHAT_MODEL, "api_key": stack.api_key, "temperature": 0, "max_tokens": 40, "max_retries": 0}
    return ChatOpenAI(base_url=stack.base_url, timeout=CLIENT_TIMEOUT, **(options | kwargs))


def test_invoke_answers_and_reports_usage(stack):
    reply = chat(stack).invoke(QUESTION)
    assert "Paris" in reply.content
    assert reply.response_metadata["finish_reason"] == "stop"
    assert reply.usage_metadata["input_tokens"] > 0 and reply.usage_metadata["output_tokens"] > 0


def test_stream_assembles_the_same_answer(stack):
    whole = chat(stack).invoke(QUESTION).content
    chunks = list(chat(stack, stream_usage=True).stream(QUESTION))
    assert len(chunks) > 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.content == whole
    assert merged.usage_metadata["output_tokens"] > 0  # the usage chunk LangChain asks for by default


async def test_async_invoke_answers(stack):
    reply = await chat(stack).ainvoke(QUESTION)
    assert "Paris" in reply.content


def test_embeddings_with_defaults_send_cl100k_ids_and_get_the_texts_own_vectors(stack, ark_vector):
    """LangChain tokenizes with tiktoken and sends token-id arrays; ARK reads them as OpenAI's ids."""
    sent: list[dict] = []

    def capture(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    embeddings = OpenAIEmbeddings(
        model=EMBEDDING_MODEL,
        base_url=stack.base_url,
        api_key=stack.api_key,
        max_retries=0,
        http_client=httpx.Client(event_hooks={"request": [capture]}),
    )
    texts = [ANCHOR, PARAPHRASE, UNRELATED]
    vectors = embeddings.embed_documents(texts)
    query = embeddings.embed_query(ANCHOR)
    assert all(isinstance(token, int) for request in sent for ids in request["input"] for token in ids)
    for text, vector in zip(texts, vectors, strict=True):
        assert len(vector) == 384
        assert cosine(vector, ark_vector(text)) > 0.99
    assert cosine(query, ark_vector(ANCHOR)) > 0.99
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3


def test_the_same_ids_under_arks_own_model_id_mean_minilm_ids(stack, ark_vector):
    """The other side of the rule: ARK's own model id keeps meaning its own token ids (so cl100k ids are wrong)."""
    client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    ids = tiktoken.encoding_for_model(EMBEDDING_MODEL).encode(ANCHOR)  # what LangChain sends
    assert max(ids) < 30522, "pick a text whose cl100k ids all fall inside MiniLM's vocabulary"
    as_minilm = client.embeddings.create(model=ARK_EMBEDDING_MODEL, input=[ids], encoding_format="float")
    as_openai = client.embeddings.create(model=EMBEDDING_MODEL, input=[ids], encoding_format="float")
    assert cosine(as_minilm.data[0].embedding, ark_vector(ANCHOR)) < 0.5
    assert cosine(as_openai.data[0].embedding, ark_vector(ANCHOR)) > 0.99
    client.close()


async def test_async_embeddings_with_defaults(stack, ark_vector):
    embeddings = OpenAIEmbeddings(model=EMBEDDING_MODEL, base_url=stack.base_url, api_key=stack.api_key)
    vector = await embeddings.aembed_query(PARAPHRASE)
    assert cosine(vector, ark_vector(PARAPHRASE)) > 0.99


def test_wrong_key_raises_authentication_error(stack):
    with pytest.raises(openai.AuthenticationError) as info:
        chat(stack, api_key="sk-wrong-key-000000").invoke(QUESTION)
    assert info.value.status_code == 401 and info.value.request_id


def test_unknown_model_raises_not_found_error(stack):
    with pytest.raises(openai.NotFoundError) as info:
        chat(stack, model="gpt-9").invoke(QUESTION)
    assert info.value.body["code"] == "model_not_found"


def test_bad_parameter_raises_bad_request_error(stack):
    with pytest.raises(openai.BadRequestError) as info:
        chat(stack, temperature=5).invoke(QUESTION)
    assert info.value.body["param"] == "temperature"
