"""Every error leaves the edge in OpenAI's envelope, with OpenAI's status codes and a retry hint.

OpenAI's SDKs retry 408, 409, 429 and every 5xx twice by default, unless the response says `x-should-retry`. A
deterministic failure retried is three failures and three times the work, so every error says whether a retry can
help: `true` for overload and unavailability (with `Retry-After`), `false` for everything a retry cannot fix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from services.common.errors import ArkError, InternalError, InvalidRequestError, NotFoundError, clip

log = logging.getLogger(__name__)

# Statuses a retry may cure: a timeout, a conflict that clears, overload, and a backend that is (re)starting.
# Everything else, 500 included, is the same answer the next time: a 500 is a bug or a request the engine cannot
# serve, and retrying it only multiplies the load it causes.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 502, 503, 504})


def should_retry(err: ArkError) -> bool:
    """Whether the client may usefully repeat the request (the error's own verdict first, else its status)."""
    return err.should_retry if err.should_retry is not None else err.http_status in RETRYABLE_STATUSES


def error_headers(err: ArkError) -> dict[str, str]:
    """`x-should-retry` always; `retry-after` when the error names a wait."""
    headers = {"x-should-retry": "true" if should_retry(err) else "false"}
    if err.retry_after is not None:
        headers["retry-after"] = str(err.retry_after)
    return headers


def error_response(err: ArkError, *, status_code: int | None = None) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=status_code or err.http_status, headers=error_headers(err))


def _param(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not str(p).startswith(("function-", "tagged-union", "union[", "list[", "str", "int", "float")):
            out += ("." if out else "") + str(p)
    # An unknown key is the client's own string, of any length.
    return clip(out) if out else None


def validation_error(errors: Sequence[Any]) -> InvalidRequestError:
    """The first problem of a request body, phrased as OpenAI does."""
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    kind, param = first["type"], _param(tuple(first["loc"]))
    if kind == "json_invalid":
        return InvalidRequestError(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
            "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
        )
    if param is None and kind in ("missing", "model_type", "model_attributes_type"):
        return InvalidRequestError("The request body must be a JSON object.")
    if kind == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    message = clip(first["msg"].removeprefix("Value error, "), 1024)
    return InvalidRequestError(f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ArkError)
    async def _ark(request: Request, exc: ArkError) -> JSONResponse:
        if isinstance(exc, InternalError):
            log.error("internal error in request %s: %s", request_id_of(request.scope), exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: ArkError = NotFoundError(
                f"Invalid URL ({clip(request.method)} {clip(request.url.path)})", code="unknown_url"
            )
        elif exc.status_code == 405:
            err = InvalidRequestError(f"Method {clip(request.method)} is not allowed for {clip(request.url.path)}")
            return error_response(err, status_code=405)
        else:
            err = ArkError(clip(str(exc.detail)))
            err.http_status = exc.status_code
        return error_response(err)

    # Unexpected exceptions are not handled here: Starlette re-raises after calling a handler for `Exception`, and
    # the server then closes the connection. `LastResortMiddleware` (edge/middleware.py) answers them instead.


def request_id_of(scope: Scope) -> str:
    """The request id RequestIdMiddleware gave the request ("-" before it ran)."""
    return scope.get("state", {}).get("request_id", "-")


def internal_error() -> InternalError:
    """What a client sees of an unexpected failure; the details stay in the log."""
    return InternalError("The server had an error while processing your request.")
