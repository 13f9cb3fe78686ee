"""The transcription parameter table covers exactly OpenAI's request schema, the request model accepts every field,
and docs/transcriptions.md shows the table as the code has it."""

from pathlib import Path

from edge.compat import TRANSCRIPTIONS, markdown_table
from edge.transcriptions.schemas import TranscriptionRequest
from tests.support.openapi import request_fields

DOC = Path(__file__).resolve().parents[2] / "docs" / "transcriptions.md"


def test_table_covers_every_openai_field():
    assert set(TRANSCRIPTIONS) == request_fields("CreateTranscriptionRequest")


def test_request_model_accepts_exactly_the_tabled_fields():
    assert set(TranscriptionRequest.model_fields) == set(TRANSCRIPTIONS)


def test_docs_contain_the_table():
    assert markdown_table(TRANSCRIPTIONS) in DOC.read_text()
