"""Header bounds on the edge's own HTTP server: uvicorn's httptools protocol with a size and a count limit.

httptools (llhttp) puts no bound on a request's head: it gathers a header value of any length in memory before the
server sees it, so a 64 MB header grew the edge by 100 MB, and 10,000 headers were accepted. A check in ASGI
middleware would run only after all of that was read. Here the bytes of a request's head are counted as they arrive,
before the parser buffers them, and the headers as they are parsed; past either limit the client gets 431 in
OpenAI's envelope and the connection is closed (what is left of the head is never read).

Envoy enforces the same configured limits in front (services/launcher/envoy_config.py); the edge allows a little
more, for the headers Envoy adds on the way (x-forwarded-*, x-request-id, x-envoy-*), so that a request Envoy
accepted is never refused here.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edge.errors import error_headers
from services.common.config import LimitsConfig
from services.common.errors import HeadersTooLargeError

# How long a refused connection's remaining input is read and dropped before the socket is closed.
LINGER_SECONDS = 1.0
# Room for the headers a proxy in front adds to a request it accepted.
PROXY_HEADER_BYTES = 8 * 1024
PROXY_HEADERS = 16


class _HeadLimitExceeded(Exception):
    """Raised inside a parser callback; httptools reports it as a parser error."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that refuses a request head over `max_head_bytes` or with more than `max_headers`.

    Two counts: the bytes received while a head is incomplete bound what the parser may buffer (one read of the
    socket past the limit at most), and the parsed request line and headers give the exact size once complete.
    """

    max_head_bytes = 64 * 1024 + PROXY_HEADER_BYTES
    max_headers = 100 + PROXY_HEADERS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a connection starts with a request head
        self._received_in_head = 0
        self._head_bytes = 0
        self._header_count = 0
        self._refusal: str | None = None
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # refused: what is left of the request is read and dropped until the connection closes
        if self._in_head:
            self._received_in_head += len(data)
        super().data_received(data)
        # Still no end of the head after more than the limit: refuse before the parser buffers any more of it.
        if self._in_head and self._received_in_head > self.max_head_bytes and not self._refused:
            self._refuse(f"the request line and headers exceed {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            self._refusal = f"more than {self.max_headers} headers"
            raise _HeadLimitExceeded
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._received_in_head = True, 0  # the next bytes are the next request's head

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            self._refusal = f"the request line and headers exceed {self.max_head_bytes} bytes"
            raise _HeadLimitExceeded

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error here; one raised by our own callbacks is a 431.
        if self._refusal is not None:
            self._refuse(self._refusal)
        else:
            super().send_400_response(msg)

    def _refuse(self, reason: str) -> None:
        """Answer 431 and close without a reset: the client is likely still sending, and closing a socket with
        unread data makes the kernel send RST, which can destroy the answer before the client reads it. So the
        write side is shut first and what still arrives is dropped for a moment (a "lingering close")."""
        self._refused = True
        err = HeadersTooLargeError(f"Request headers too large: {reason}.")
        body = json.dumps(err.to_dict()).encode()
        head = [
            b"HTTP/1.1 431 Request Header Fields Too Large",
            *(b"%s: %s" % pair for pair in self.server_state.default_headers),
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            b"x-request-id: req_%s" % uuid.uuid4().hex.encode(),
            *(f"{k}: {v}".encode() for k, v in error_headers(err).items()),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


def bounded_protocol(limits: LimitsConfig) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=` with the configured limits (plus a proxy's allowance)."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "max_head_bytes": limits.max_header_bytes + PROXY_HEADER_BYTES,
            "max_headers": limits.max_headers + PROXY_HEADERS,
        },
    )
