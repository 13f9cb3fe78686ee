"""The hostile-input catalogue: requests built to break ARK, each with the answer it must get.

Pass criteria, for every case: no 5xx for bad input, OpenAI's envelope with `x-request-id` and `x-should-retry:
false`, a rejection well under a second or two (measured loosely: the machine is shared), the process that judged it
still alive, and innocent requests around it unaffected.

Two fronts. `front`: the edge in this process (so that a fault can be injected and its memory watched) behind a real
Envoy, no models: everything the edge and Envoy refuse on their own. `stack`: the whole stack on the real models (the
suite's shared one), for what needs a service: audio bombs, integers that reach a worker, silence.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import threading
import time
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from edge.app import create_app
from edge.http_limits import bounded_protocol
from services.common.config import ArkConfig, load_config
from services.launcher import envoy_config
from services.launcher.processes import grpc_serving, http_ok
from tests.support.audio import SPEECH, silence_flac, word_error_rate
from tests.support.stack import RunningStack, free_port, pid_serving

KEY = "sk-hostile-12345678"
AUTH = {"authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Say hello."}]
# Loose bound on any refusal (the machine is shared with model processes): far from "read it all, then refuse".
QUICK_SECONDS = 3.0


# -- the front: an in-process edge behind a real Envoy ------------------------------------------------------------


@dataclass
class Front:
    edge_url: str
    envoy_url: str
    config: ArkConfig


def _edge_config(edge_port: int, envoy_port: int, admin_port: int) -> ArkConfig:
    return load_config(
        env={
            "ARK_API_KEY": KEY,
            "ARK__EDGE__PORT": str(edge_port),
            "ARK_PORT": str(envoy_port),
            "ARK__ENVOY__ADMIN_PORT": str(admin_port),
            "ARK__ENVOY__HEALTH_CHECK_INTERVAL_SECONDS": "0.5",
            "ARK__SESSIONS__ENABLED": "false",
            # Nothing listens here: requests that pass validation get 503, which no test below expects.
            "ARK__SERVICES__CHAT__WORKERS": f"[127.0.0.1:{free_port()}]",
            "ARK__SERVICES__CHAT__METRICS_PORTS": "[]",
        }
    )


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    edge_port, envoy_port, admin_port = free_port(), free_port(), free_port()
    config = _edge_config(edge_port, envoy_port, admin_port)
    app = create_app(config)

    # A fault only a bug could cause, to check what every unexpected exception gets.
    @app.get("/v1/hostile/bug")
    async def bug() -> None:
        raise RuntimeError("an internal detail that must not leak")

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=edge_port,
            http=bounded_protocol(config.limits),
            loop="asyncio",
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(lambda: http_ok(f"http://127.0.0.1:{edge_port}/health"), 30, "the edge")
    envoy_yaml = tmp_path_factory.mktemp("envoy") / "envoy.yaml"
    envoy_yaml.write_text(envoy_config.render(config))
    envoy = subprocess.Popen(
        [str(envoy_config.envoy_binary()), "-c", str(envoy_yaml), "--disable-hot-restart", "--concurrency", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    envoy_url = f"http://127.0.0.1:{envoy_port}"
    try:
        _wait(lambda: http_ok(f"{envoy_url}/health"), 30, "Envoy routing to the edge")
        yield Front(f"http://127.0.0.1:{edge_port}", envoy_url, config)
    finally:
        envoy.terminate()
        envoy.wait(10)
        server.should_exit = True
        thread.join(10)


def assert_refused(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    """The refusal every hostile request must get: its status, OpenAI's envelope, an id, no retry."""
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert response.headers["x-request-id"]
    assert response.headers["x-should-retry"] == "false"
    return error


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


# -- integers, tool calls, free strings ---------------------------------------------------------------------------

OUT_OF_RANGE = [
    ("seed", {"seed": 2**63}),
    ("seed", {"seed": -(2**63) - 1}),
    ("top_k", {"top_k": 2**31}),
    ("logit_bias", {"logit_bias": {str(2**31): 1}}),
    ("logit_bias", {"logit_bias": {"9" * 5000: 1}}),
    ("max_tokens", {"max_tokens": 2**40}),
    ("max_completion_tokens", {"max_completion_tokens": 2**64}),
    ("n", {"n": 2**40}),
    ("top_logprobs", {"top_logprobs": 2**40, "logprobs": True}),
]


@pytest.mark.parametrize(("param", "fields"), OUT_OF_RANGE, ids=[f"{p}-{i}" for i, (p, _) in enumerate(OUT_OF_RANGE)])
def test_out_of_range_integers_are_400_naming_the_param(front, param, fields):
    body = {"model": "gpt-4o", "messages": HELLO, **fields}
    for url in (front.envoy_url, front.edge_url):
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
        assert time.monotonic() - started < QUICK_SECONDS
        error = assert_refused(response, 400, param=param)
        assert len(error["message"]) < 400, "the value is quoted briefly, never in full"


def test_other_integer_fields_are_checked_too(front):
    response = httpx.post(
        f"{front.edge_url}/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": "hi", "dimensions": 2**31},
        headers=AUTH,
    )
    assert_refused(response, 400, param="dimensions")
    for digits, param in ((30, "input[0][1]"), (5000, None)):  # 5000 digits: past what Python prints
        body = b'{"model": "text-embedding-3-small", "input": [[1, ' + b"9" * digits + b"]]}"
        response = httpx.post(f"{front.edge_url}/v1/embeddings", content=body, headers=AUTH)
        assert_refused(response, 400, param=param)
    form = {"model": "whisper-1", "chunking_strategy": json.dumps({"type": "server_vad", "prefix_padding_ms": 2**31})}
    response = httpx.post(
        f"{front.edge_url}/v1/audio/transcriptions", data=form, files={"file": ("a.flac", b"fLaC")}, headers=AUTH
    )
    assert_refused(response, 400, param="chunking_strategy.prefix_padding_ms")


@pytest.mark.parametrize("arguments", ["{not json", '{"a": ' * 100_000, ""])
def test_tool_call_arguments_that_are_not_json_are_400(front, arguments):
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "w", "arguments": arguments}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    response = httpx.post(
        f"{front.envoy_url}/v1/chat/completions", json={"model": "gpt-4o", "messages": messages}, headers=AUTH
    )
    assert_refused(response, 400, param="messages[1].tool_calls[0].function.arguments")


def test_a_megabyte_model_name_is_not_echoed_back(front):
    name = "m" * 1_000_000
    response = httpx.post(
        f"{front.envoy_url}/v1/chat/completions", json={"model": name, "messages": HELLO}, headers=AUTH
    )
    error = assert_refused(response, 404, param="model", code="model_not_found")
    assert len(response.content) < 2000 and len(error["message"]) < 600


@pytest.mark.parametrize("door", ["edge", "envoy"])
def test_a_long_unknown_path_is_not_echoed_back(front, door):
    url = front.edge_url if door == "edge" else front.envoy_url
    response = httpx.get(f"{url}/{'p' * 30_000}", headers=AUTH)  # outside /v1: Envoy's own 404
    assert_refused(response, 404, code="unknown_url")
    assert len(response.content) < 1000


def test_an_unknown_megabyte_field_name_is_not_echoed_back(front):
    response = httpx.post(
        f"{front.edge_url}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": HELLO, "x" * 500_000: 1},
        headers=AUTH,
    )
    assert_refused(response, 400)
    assert len(response.content) < 2000


def test_the_official_client_does_not_retry_what_a_retry_cannot_fix(front):
    """The SDK retries 5xx and 429 twice by default; `x-should-retry: false` stops it for a deterministic failure."""
    sent = []
    http_client = httpx.Client(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(base_url=f"{front.envoy_url}/v1", api_key=KEY, http_client=http_client)  # max_retries=2
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO, seed=2**64)
    assert len(sent) == 1
    sent.clear()
    with pytest.raises(openai.InternalServerError) as info:
        client.get("/hostile/bug", cast_to=object)
    assert info.value.status_code == 500 and len(sent) == 1


# -- the last resort: an unexpected exception ---------------------------------------------------------------------


def _raw_exchange(sock: socket.socket, path: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on an open keep-alive connection; the status, headers and body of its answer."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: ark\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_an_unexpected_exception_is_a_500_envelope_and_the_connection_lives_on(front):
    port = int(front.edge_url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        status, headers, body = _raw_exchange(sock, "/v1/hostile/bug")
        assert status == 500 and headers["x-request-id"].startswith("req_")
        assert headers["x-should-retry"] == "false" and headers.get("connection") != "close"
        error = json.loads(body)["error"]
        assert error["type"] == "server_error" and "internal detail" not in error["message"]
        # The same connection serves the next request.
        status, _, body = _raw_exchange(sock, "/v1/models")
        assert status == 200 and json.loads(body)["object"] == "list"


def test_through_envoy_a_bug_hurts_no_other_clients_request(front):
    """Before: the edge closed the keep-alive connection after a 500, and Envoy answered 503 to the requests of other
    clients that shared it. 100 requests on 8 connections, a fifth of them hitting the bug."""

    def one(i: int) -> tuple[str, int]:
        path = "/v1/hostile/bug" if i % 5 == 0 else "/v1/models"
        return path, httpx.get(f"{front.envoy_url}{path}", headers=AUTH, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(100)))
    assert {status for path, status in results if path == "/v1/models"} == {200}
    assert {status for path, status in results if path != "/v1/models"} == {500}


def test_a_client_that_leaves_mid_body_is_not_an_error(front, caplog):
    port = int(front.edge_url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: ark\r\nAuthorization: Bearer {KEY}\r\n"
        sock.sendall(head.encode() + b"Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n{")
    _wait(lambda: httpx.get(f"{front.edge_url}/v1/models", headers=AUTH).status_code == 200, 10, "the edge")
    time.sleep(0.2)  # let the abandoned request finish
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


# -- headers --------------------------------------------------------------------------------------------------------


def _raw_head(url: str, head: bytes) -> bytes:
    host, _, port = url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with contextlib.suppress(OSError):  # refused mid-send: the answer is already there to read
            sock.sendall(head)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    return data


def _parse(data: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


HEADS = {
    "one 1 MB header": b"X-Big: " + b"x" * 1_000_000 + b"\r\n",
    "10,000 headers": b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)),
    "200 headers": b"".join(b"X-H%d: v\r\n" % i for i in range(200)),
}


@pytest.mark.parametrize("case", sorted(HEADS))
@pytest.mark.parametrize("door", ["edge", "envoy"])
def test_oversized_heads_get_431_in_openais_envelope(front, case, door):
    url = front.edge_url if door == "edge" else front.envoy_url
    started = time.monotonic()
    data = _raw_head(url, b"GET /v1/models HTTP/1.1\r\nHost: ark\r\n" + HEADS[case] + b"\r\n")
    assert time.monotonic() - started < QUICK_SECONDS
    status, headers, body = _parse(data)
    assert status == 431 and headers["x-request-id"] and headers["x-should-retry"] == "false"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "request_too_large"
    assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200, "the door still serves"


def test_a_64_mb_header_does_not_grow_the_edge(front):
    """Before: the edge buffered a 64 MB header whole (+100 MB). Now it stops reading one socket read past the limit."""
    port = int(front.edge_url.rpartition(":")[2])
    before = _rss_bytes()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: ark\r\nX-Big: ")
        chunk = b"x" * (1024 * 1024)
        try:
            for _ in range(64):
                sock.sendall(chunk)
        except OSError:
            pass  # the edge answered and stopped reading
        data = b""
        try:
            while part := sock.recv(65536):
                data += part
        except OSError:
            pass
    assert data.startswith(b"HTTP/1.1 431")
    assert _rss_bytes() - before < 16 * 1024 * 1024


# -- uploads --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("door", ["edge", "envoy"])
@pytest.mark.parametrize("megabytes", [26, 60])
def test_an_oversized_upload_is_refused_from_its_content_length(front, door, megabytes):
    url = front.edge_url if door == "edge" else front.envoy_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("a.flac", b"fLaC" + bytes(megabytes << 20)))
    assert time.monotonic() - started < QUICK_SECONDS
    assert_refused(info.value.response, 413, code="request_too_large")


@pytest.mark.parametrize("door", ["edge", "envoy"])
def test_a_chunked_upload_is_cut_as_soon_as_it_passes_the_limit(front, door):
    """The edge refuses as soon as the count passes the limit and buffers nothing more. Envoy then closes the
    client's connection; straight at the edge, uvicorn reads and drops the rest instead (closing would reset the
    connection under a client still sending, and it would never see the 413): bandwidth, not memory."""
    url = front.edge_url if door == "edge" else front.envoy_url
    sent = 0
    before = _rss_bytes()

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.flac"\r\n\r\n'
        for _ in range(200):  # 200 MB, if nobody stops it
            sent += 1 << 20
            yield bytes(1 << 20)

    response = httpx.post(
        f"{url}/v1/audio/transcriptions",
        content=body(),
        headers={**AUTH, "content-type": "multipart/form-data; boundary=b"},
        timeout=60,
    )
    assert_refused(response, 413, code="request_too_large")
    assert _rss_bytes() - before < 48 * 1024 * 1024, "the edge kept at most the limit, not 200 MB"
    if door == "envoy":
        assert sent < 100 << 20, "the upload was stopped long before its end"


# -- through the whole stack: audio bombs, silence, integers the workers see ---------------------------------------


def _transcribe(stack: RunningStack, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/audio/transcriptions",
        files={"file": ("audio", data)},
        data={"model": "whisper-1"},
        headers={"authorization": f"Bearer {stack.api_key}"},
        timeout=300,
    )


def _lie_about_length(flac: bytes, seconds: float) -> bytes:
    """The FLAC with its STREAMINFO claiming `seconds` (0: unknown)."""
    data = bytearray(flac)
    rate = int.from_bytes(data[18:21], "big") >> 4
    field = int.from_bytes(data[18:26], "big")
    data[18:26] = ((field & ~((1 << 36) - 1)) | int(seconds * rate)).to_bytes(8, "big")
    return bytes(data)


def _wav_without_length(seconds: float) -> bytes:
    """A WAV streamed without knowing its length (data size 0xFFFFFFFF), of silence."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(4000)  # 40 minutes in 19 MB, under the upload limit
        out.writeframes(bytes(int(seconds * 4000) * 2))
    data = bytearray(buffer.getvalue())
    offset = data.index(b"data")
    data[offset + 4 : offset + 8] = (0xFFFFFFFF).to_bytes(4, "little")
    data[4:8] = (0xFFFFFFFF).to_bytes(4, "little")
    return bytes(data)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    # Past the 30-minute limit is enough to show the mechanism; 8 hours would only take longer to build.
    long = silence_flac(40 * 60)
    return {
        "40 min of silence, header says 10 s": _lie_about_length(long, 10),
        "40 min of silence, header says nothing": _lie_about_length(long, 0),
        "40 min streamed WAV without a length": _wav_without_length(40 * 60),
    }


@pytest.mark.e2e
@pytest.mark.slow
def test_audio_bombs_are_refused_fast_and_the_service_lives(stack, client, bombs):
    pid = pid_serving(stack.addresses["transcription"])
    innocent: list[int] = []

    def embed_meanwhile() -> None:
        for _ in range(len(bombs)):
            innocent.append(len(client.embeddings.create(model="text-embedding-3-small", input="hello").data))

    neighbour = threading.Thread(target=embed_meanwhile)
    neighbour.start()
    for name, data in bombs.items():
        started = time.monotonic()
        response = _transcribe(stack, data)
        elapsed = time.monotonic() - started
        assert_refused(response, 400, param="file", code="audio_too_long")
        assert elapsed < QUICK_SECONDS, f"{name}: refused after {elapsed:.1f} s"
    neighbour.join(120)
    assert innocent == [1] * len(bombs), "the concurrent requests were served"
    assert pid_serving(stack.addresses["transcription"]) == pid, "the transcription service was not restarted"
    assert grpc_serving(stack.addresses["transcription"])
    # And it still transcribes.
    spoken = client.audio.transcriptions.create(model="whisper-1", file=(SPEECH.name, SPEECH.data()))
    assert word_error_rate(SPEECH.reference, spoken.text) < 0.1


@pytest.mark.e2e
@pytest.mark.slow
def test_29_minutes_of_silence_are_an_empty_transcript_not_invented_words(stack):
    started = time.monotonic()
    response = _transcribe(stack, silence_flac(29 * 60, rate=16000))
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text[:300]
    assert response.json()["text"].strip() == ""
    assert elapsed < 60, f"took {elapsed:.0f} s (83 s before voice activity detection)"


@pytest.mark.e2e
@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1])
def test_every_int64_seed_is_served(stack, client, seed):
    """OpenAI's seed is any int64: the extremes reach the engine and come back as an answer, not a 500."""
    completion = client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4, seed=seed)
    assert completion.choices[0].message.content is not None
    for worker in ("chat-1", "chat-2"):
        assert grpc_serving(stack.addresses[worker])
