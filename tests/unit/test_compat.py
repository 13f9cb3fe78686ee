"""The parameter table covers exactly OpenAI's request schema, and the request model accepts every field."""

from edge.chat.schemas import ChatCompletionRequest
from edge.compat import CHAT_COMPLETIONS, CHAT_EXTENSIONS
from tests.support.openapi import load_spec, require_spec


def schema_properties(name: str) -> set[str]:
    schemas = load_spec()["components"]["schemas"]
    found: set[str] = set()

    def walk(node: dict) -> None:
        if "$ref" in node:
            walk(schemas[node["$ref"].rsplit("/", 1)[1]])
            return
        found.update(node.get("properties", {}))
        for sub in node.get("allOf", []):
            walk(sub)

    walk(schemas[name])
    return found


@require_spec
def test_chat_table_covers_every_openai_field():
    assert set(CHAT_COMPLETIONS) == schema_properties("CreateChatCompletionRequest")


def test_request_model_accepts_every_tabled_field_and_the_extensions():
    assert set(ChatCompletionRequest.model_fields) == set(CHAT_COMPLETIONS) | set(CHAT_EXTENSIONS)
