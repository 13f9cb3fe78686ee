"""Multipart form → TranscriptionRequest, the way OpenAI's clients encode it.

The official clients send arrays as repeated `name[]` fields (`timestamp_granularities[]=word`) and objects as
`name[key]` fields (`chunking_strategy[type]=server_vad`); curl users tend to send `name=value` and JSON objects.
All of these are accepted; unknown fields are refused by the schema, as OpenAI does.

The upload is read into memory (the body limit bounds it) and the form is closed before returning, which also
closes the temporary file Starlette spools large parts to. The uploaded file's name is never looked at.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from edge.errors import validation_error
from edge.transcriptions.schemas import TranscriptionRequest
from services.common.errors import InvalidRequestError, RequestTooLargeError

ARRAY_FIELDS = frozenset(
    {"languages", "keywords", "include", "timestamp_granularities", "known_speaker_names", "known_speaker_references"}
)
OBJECT_FIELDS = frozenset({"chunking_strategy"})


async def read_transcription_request(request: Request, *, max_file_bytes: int) -> TranscriptionRequest:
    """Parse and validate the form; raises InvalidRequestError (400) or RequestTooLargeError (413)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidRequestError(
            "Transcription requests must be multipart/form-data, with the audio in a `file` part.", param="file"
        )
    try:
        async with request.form(max_files=1, max_fields=64) as form:
            fields = await _fields(form, max_file_bytes)
    except HTTPException as exc:  # Starlette's verdict on a malformed multipart body
        raise InvalidRequestError(f"Could not parse multipart form: {exc.detail}") from None
    try:
        return TranscriptionRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


async def _fields(form: FormData, max_file_bytes: int) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        name, bracket, rest = key.partition("[")
        sub = rest.removesuffix("]") if bracket else None  # "" for name[], "k" for name[k]
        if isinstance(value, UploadFile):
            if key != "file":
                raise InvalidRequestError(
                    f"Unexpected file upload in field '{key}'; send the audio as `file`.", param=key
                )
            fields["file"] = await _read_upload(value, max_file_bytes)
        elif name == "file":
            raise InvalidRequestError("`file` must be an uploaded file, not a text field.", param="file")
        elif sub:
            target = fields.setdefault(name, {})
            if not isinstance(target, dict):
                raise InvalidRequestError(f"The field '{name}' mixes object and plain values.", param=name)
            target[sub] = value
        elif sub == "" or name in ARRAY_FIELDS:
            target = fields.setdefault(name, [])
            if not isinstance(target, list):
                raise InvalidRequestError(f"The field '{name}' mixes array and plain values.", param=name)
            target.append(value)
        elif name in fields:
            raise InvalidRequestError(f"The field '{name}' was sent more than once.", param=name)
        else:
            fields[name] = _json_object(name, value) if name in OBJECT_FIELDS else value
    return fields


async def _read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise _too_large(max_bytes, upload.size)
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(max_bytes, len(data))
    return data


def _too_large(limit: int, size: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"Maximum content size limit ({limit}) exceeded ({size} bytes read).", param="file")


def _json_object(name: str, value: str) -> Any:
    """An object field may come as JSON in one field (what curl users write) or as a plain string (`auto`)."""
    if not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise InvalidRequestError(f"The field '{name}' is not valid JSON.", param=name) from None
