"""The parameter table covers exactly OpenAI's request schema, and the request model accepts every field."""

from edge.chat.schemas import ChatCompletionRequest
from edge.compat import CHAT_COMPLETIONS, CHAT_EXTENSIONS
from tests.support.openapi import request_fields


def test_chat_table_covers_every_openai_field():
    assert set(CHAT_COMPLETIONS) == request_fields("CreateChatCompletionRequest")


def test_request_model_accepts_every_tabled_field_and_the_extensions():
    assert set(ChatCompletionRequest.model_fields) == set(CHAT_COMPLETIONS) | set(CHAT_EXTENSIONS)
