"""The transcription parameter table covers exactly OpenAI's request schema, the request model accepts every field,
and docs/transcriptions.md shows the table as the code has it."""

from pathlib import Path

from edge.compat import TRANSCRIPTIONS, markdown_table
from edge.transcriptions.schemas import TranscriptionRequest
from tests.support.openapi import load_spec, require_spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "transcriptions.md"


@require_spec
def test_table_covers_every_openai_field():
    schema = load_spec()["components"]["schemas"]["CreateTranscriptionRequest"]
    assert set(TRANSCRIPTIONS) == set(schema["properties"])


def test_request_model_accepts_exactly_the_tabled_fields():
    assert set(TranscriptionRequest.model_fields) == set(TRANSCRIPTIONS)


def test_docs_contain_the_table():
    assert markdown_table(TRANSCRIPTIONS) in DOC.read_text()
