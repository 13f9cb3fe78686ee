"""LiteLLM against ARK as its `openai/` provider, with its defaults: chat, streaming, embeddings, transcription and
LiteLLM's own error classes. Tools and structured output are in test_litellm_tools.py."""

from __future__ import annotations

import litellm
import pytest

from tests.compat.conftest import (
    ANCHOR,
    CHAT_MODEL,
    CLIENT_TIMEOUT,
    EMBEDDING_MODEL,
    PARAPHRASE,
    TRANSCRIPTION_MODEL,
    UNRELATED,
    cosine,
)
from tests.support.audio import SPEECH, word_error_rate
from tests.support.stack import RunningStack

pytestmark = [
    pytest.mark.e2e,
    # LiteLLM's own TypedDicts, as pydantic builds their schemas when LiteLLM is first used; nothing ARK can change.
    pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_.* attribute on the instance is deprecated"),
]

QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Please name the capital of France."},
]


def connection(stack: RunningStack, **overrides) -> dict:
    options = {"api_base": stack.base_url, "api_key": stack.api_key, "max_retries": 0, "timeout": CLIENT_TIMEOUT}
    return options | overrides


def complete(stack: RunningStack, **kwargs):
    options = {"model": f"openai/{CHAT_MODEL}", "messages": QUESTION, "temperature": 0, "max_tokens": 40}
    return litellm.completion(**(connection(stack) | options | kwargs))


def test_completion_answers_and_reports_usage(stack):
    reply = complete(stack)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_stream_assembles_the_same_answer(stack):
    whole = complete(stack).choices[0].message.content
    chunks = list(complete(stack, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 2
    rebuilt = litellm.stream_chunk_builder(chunks, messages=QUESTION)
    assert rebuilt.choices[0].message.content == whole
    assert rebuilt.choices[0].finish_reason == "stop"
    assert rebuilt.usage.completion_tokens > 0


async def test_async_completion_answers(stack):
    reply = await litellm.acompletion(
        **connection(stack), model=f"openai/{CHAT_MODEL}", messages=QUESTION, temperature=0, max_tokens=40
    )
    assert "Paris" in reply.choices[0].message.content


def test_embeddings_with_defaults_are_the_texts_own_vectors(stack, ark_vector):
    texts = [ANCHOR, PARAPHRASE, UNRELATED]
    result = litellm.embedding(**connection(stack), model=f"openai/{EMBEDDING_MODEL}", input=texts)
    vectors = [item["embedding"] for item in result.data]
    assert [item["index"] for item in result.data] == [0, 1, 2]
    for text, vector in zip(texts, vectors, strict=True):
        assert len(vector) == 384 and cosine(vector, ark_vector(text)) > 0.99
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert result.usage.prompt_tokens > 0


def test_transcription_with_defaults(stack):
    with SPEECH.path.open("rb") as audio:
        result = litellm.transcription(**connection(stack), model=f"openai/{TRANSCRIPTION_MODEL}", file=audio)
    assert word_error_rate(SPEECH.reference, result.text) < 0.1


def test_wrong_key_raises_authentication_error(stack):
    with pytest.raises(litellm.AuthenticationError) as info:
        complete(stack, api_key="sk-wrong-key-000000")
    assert info.value.status_code == 401


def test_unknown_model_raises_not_found_error(stack):
    with pytest.raises(litellm.NotFoundError) as info:
        complete(stack, model="openai/gpt-9")
    assert info.value.status_code == 404 and "gpt-9" in info.value.message


def test_bad_parameter_raises_bad_request_error(stack):
    # LiteLLM passes provider-specific parameters through; ARK refuses the out-of-range one with a 400.
    with pytest.raises(litellm.BadRequestError) as info:
        complete(stack, top_p=7)
    assert info.value.status_code == 400 and "top_p" in info.value.message
