"""Every error leaves the edge in OpenAI's envelope, with OpenAI's status codes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import ArkError, InternalError, InvalidRequestError, NotFoundError

log = logging.getLogger(__name__)


def error_response(err: ArkError) -> JSONResponse:
    headers = {"retry-after": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(err.to_dict(), status_code=err.http_status, headers=headers)


def _param(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not str(p).startswith(("function-", "tagged-union", "union[", "list[", "str", "int", "float")):
            out += ("." if out else "") + str(p)
    return out or None


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
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequestError(f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ArkError)
    async def _ark(_: Request, exc: ArkError) -> JSONResponse:
        if isinstance(exc, InternalError):
            log.error("internal error: %s", exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: ArkError = NotFoundError(f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")
        elif exc.status_code == 405:
            err = InvalidRequestError(f"Method {request.method} is not allowed for {request.url.path}")
            return JSONResponse(err.to_dict(), status_code=405)
        else:
            err = ArkError(str(exc.detail))
            err.http_status = exc.status_code
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(InternalError("The server had an error while processing your request."))
