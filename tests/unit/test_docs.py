"""docs/api.md tells the truth about the parameter table in code."""

from pathlib import Path

from edge.compat import CHAT_COMPLETIONS, CHAT_EXTENSIONS, extensions_table, markdown_table

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_api_reference_contains_the_chat_parameter_table():
    assert markdown_table(CHAT_COMPLETIONS) in API_MD.read_text()


def test_api_reference_contains_the_chat_extensions_table():
    assert extensions_table(CHAT_EXTENSIONS) in API_MD.read_text()
