"""The multipart form exactly as the official openai client encodes it (arrays as `name[]`, objects as
`name[key]`), plus what curl users send, parsed into the request model; bad forms are OpenAI-style errors."""

from __future__ import annotations

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI, Request

from edge.errors import install_error_handlers
from edge.transcriptions.multipart import read_transcription_request
from edge.transcriptions.schemas import VadConfig

MAX_BYTES = 10_000


def echo_app() -> tuple[FastAPI, list]:
    """An app whose endpoint parses the form and returns what it understood."""
    app = FastAPI()
    install_error_handlers(app)
    seen: list = []

    @app.post("/v1/audio/transcriptions")
    async def parse(request: Request) -> dict:
        body = await read_transcription_request(request, max_file_bytes=MAX_BYTES)
        seen.append(body)
        return {"text": "ok"}

    return app, seen


async def test_the_official_client_encoding_is_understood():
    app, seen = echo_app()
    async with openai.AsyncOpenAI(
        base_url="http://ark/v1", api_key="k", http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    ) as client:
        await client.audio.transcriptions.create(
            file=("../../etc/passwd", b"fLaC audio bytes"),
            model="whisper-1",
            language="en",
            prompt="{not json, just a prompt}",
            temperature=0.2,
            timestamp_granularities=["word", "segment"],
            chunking_strategy={"type": "server_vad", "threshold": 0.3},
            include=["logprobs"],
            keywords=["Americans", "country"],
            stream=False,
        )
    body = seen[0]
    assert body.file == b"fLaC audio bytes" and body.model == "whisper-1" and body.language == "en"
    assert body.prompt == "{not json, just a prompt}" and body.temperature == pytest.approx(0.2)
    assert body.timestamp_granularities == ["word", "segment"] and body.include == ["logprobs"]
    assert body.keywords == ["Americans", "country"] and body.stream is False
    assert body.chunking_strategy == VadConfig(type="server_vad", threshold=0.3)


async def post(files=None, data=None, **kw) -> httpx.Response:
    app, _ = echo_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ark") as http:
        return await http.post("/v1/audio/transcriptions", files=files, data=data, **kw)


async def test_curl_style_fields_are_understood():
    app, seen = echo_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ark") as http:
        r = await http.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", b"RIFF")},
            data={
                "model": "whisper-1",
                "timestamp_granularities": "word",
                "chunking_strategy": '{"type": "server_vad"}',
            },
        )
        assert r.status_code == 200, r.text
        r = await http.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", b"RIFF")},
            data={"model": "whisper-1", "chunking_strategy": "auto"},
        )
        assert r.status_code == 200, r.text
    assert seen[0].timestamp_granularities == ["word"] and seen[0].chunking_strategy.type == "server_vad"
    assert seen[1].chunking_strategy == "auto"


@pytest.mark.parametrize(
    ("files", "data", "param", "fragment"),
    [
        ({"file": ("a.wav", b"x")}, {"model": "m", "colour": "blue"}, "colour", "Unrecognized request argument"),
        ({"file": ("a.wav", b"x")}, {}, "model", "Missing required parameter"),
        ({"file": (None, "not a file")}, {"model": "m"}, "file", "must be an uploaded file"),
        ({"file": ("a.wav", b"x")}, {"model": "m", "response_format": "xml"}, "response_format", "Invalid value"),
        ({"file": ("a.wav", b"x")}, {"model": "m", "temperature": "1.5"}, "temperature", "Invalid value"),
        ({"file": ("a.wav", b"x")}, {"model": "m", "timestamp_granularities[]": "char"}, None, "Invalid value"),
        ({"file": ("a.wav", b"x")}, {"model": ["a", "b"]}, "model", "more than once"),
        ({"file": ("a.wav", b"x"), "prompt": ("p.txt", b"x")}, {"model": "m"}, None, "Too many files"),
    ],
)
async def test_bad_forms_are_400_in_openai_envelope(files, data, param, fragment):
    r = await post(files=files, data=data)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


async def test_json_body_is_refused_with_a_hint():
    r = await post(json={"model": "whisper-1", "file": "abc"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


async def test_upload_over_the_limit_is_413():
    r = await post(files={"file": ("big.wav", b"x" * (MAX_BYTES + 1))}, data={"model": "m"})
    assert r.status_code == 413
    assert r.json()["error"]["param"] == "file" and r.json()["error"]["code"] == "request_too_large"
