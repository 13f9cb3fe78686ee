"""docs/api.md tells the truth about the parameter table in code."""

from pathlib import Path

import pytest

from edge.compat import (
    CHAT_COMPLETIONS,
    CHAT_EXTENSIONS,
    EMBEDDINGS,
    RESPONSES,
    RESPONSES_EXTENSIONS,
    TRANSCRIPTIONS,
    extensions_table,
    markdown_table,
)

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@pytest.mark.parametrize(
    "table", [CHAT_COMPLETIONS, EMBEDDINGS, TRANSCRIPTIONS, RESPONSES], ids=["chat", "embeddings", "audio", "responses"]
)
def test_api_reference_contains_every_parameter_table(table):
    assert markdown_table(table) in API_MD.read_text()


def test_api_reference_contains_the_chat_extensions_table():
    assert extensions_table(CHAT_EXTENSIONS) in API_MD.read_text()


def test_api_reference_contains_the_responses_extensions_table():
    assert extensions_table(RESPONSES_EXTENSIONS) in API_MD.read_text()
