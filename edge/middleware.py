"""Pure ASGI middleware for every request: request id, last-resort error handler, body-size limit, API-key auth.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and unbuffered.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import Iterable

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.errors import error_response, internal_error, request_id_of
from services.common.config import api_key_hash
from services.common.errors import ArkError, AuthenticationError, RequestTooLargeError

log = logging.getLogger(__name__)

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# What a transcription upload may carry besides the audio file: the multipart framing and the text fields (model,
# prompt, language, ...). The body limit of an upload is the audio limit plus this, so that an oversized file is
# refused from its Content-Length before a byte of it is read.
UPLOAD_FORM_OVERHEAD_BYTES = 64 * 1024
# Probes and the Prometheus scrape carry no API key.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})


class RequestIdMiddleware:
    """Adds `x-request-id` to every response: the client's own if it sent a sane one, else a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = incoming if _CLIENT_REQUEST_ID.match(incoming) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class LastResortMiddleware:
    """Answers any exception that escapes the app with a 500 in OpenAI's envelope, and does not re-raise it.

    Starlette's own handler for `Exception` re-raises after answering, and uvicorn then closes the keep-alive
    connection; behind Envoy, other clients' requests queued on that connection got 503s. Here the exception ends
    with this request: the response is complete, the connection stays open, the log has the request id. An
    exception after the response started (a stream) cannot be answered any more; the connection is then closed by
    the server, which is the only way left to tell the client the response is incomplete.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # the client left while its body was being read: nobody to answer
        except Exception as exc:  # the point of this middleware
            if started:
                log.exception("error after the response started, request %s", request_id_of(scope), exc_info=exc)
                raise
            if isinstance(exc, ArkError):
                err = exc  # raised outside the routes (a middleware's receive): already a client-facing error
            else:
                log.exception("unhandled error in request %s", request_id_of(scope), exc_info=exc)
                err = internal_error()
            await error_response(err)(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over the limit with 413, by Content-Length up front or by counting a chunked body."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, upload_max_bytes: int, upload_prefix: str = "/v1/audio/"
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes
        self.upload_prefix = upload_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_max_bytes if scope["path"].startswith(self.upload_prefix) else self.max_bytes
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            await error_response(_too_large(limit))(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"Request body too large: the limit is {limit} bytes.")


class AuthMiddleware:
    """Bearer API-key check on every route but health; stores the key's hash for session binding."""

    def __init__(self, app: ASGIApp, *, api_keys: Iterable[str]) -> None:
        self.app = app
        self._keys = [k.encode() for k in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = auth.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            err = AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header using "
                "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
            await error_response(err)(scope, receive, send)
            return
        # Compare against every key, always, so timing reveals neither the key nor which one matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        if not matched:
            shown = token.decode("latin-1")
            shown = f"{shown[:3]}***{shown[-4:]}" if len(shown) > 8 else "***"
            await error_response(AuthenticationError(f"Incorrect API key provided: {shown}."))(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key_hash"] = api_key_hash(token.decode("latin-1"))
        await self.app(scope, receive, send)
