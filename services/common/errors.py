"""ARK's one error hierarchy.

Every failure a client can see is an `ArkError`. Services raise them; a guard around every servicer method turns
them into gRPC status with `google.rpc.ErrorInfo` (AIP-193); the edge turns gRPC status back into the same class
and renders OpenAI's envelope. Keeping one hierarchy means a bad request is a 400 at every layer, never an
accidental 500.
"""

from __future__ import annotations

import grpc

ERROR_DOMAIN = "ark.dev"
# Longest client-supplied string an error message quotes (a model name, a parameter name or value): a request may
# carry megabytes in one field, and an error must never echo them back.
MAX_QUOTED_CHARS = 256
# Longest message an error carries: the last bound, for a message that quotes a client's string without clip().
MAX_MESSAGE_CHARS = 2048


def clip(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` for quoting in an error message: at most `limit` characters, marked when cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class ArkError(Exception):
    """Base of every client-visible error; defaults describe an internal failure."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    type = "server_error"
    default_code: str | None = None
    # Whether repeating the request may succeed (HTTP `x-should-retry`, read by OpenAI's SDKs); None: decided by the
    # status (see edge/errors.py). Set True or False on an error whose status alone does not tell.
    should_retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.param = None if param is None else clip(param)
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after

    def to_dict(self) -> dict:
        """OpenAI's error envelope."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(ArkError):
    """The request is malformed or asks for something ARK cannot honour."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    type = "invalid_request_error"


class UnsupportedParameterError(InvalidRequestError):
    """An OpenAI parameter that would change the result but that ARK cannot honour."""

    default_code = "unsupported_parameter"


class AuthenticationError(ArkError):
    """Missing or wrong API key."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFoundError(ArkError):
    """A named resource does not exist (or is not visible to the caller)."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    """The requested model is neither a configured model nor an alias."""

    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{clip(model)}` does not exist or you do not have access to it.", param="model")


class ConflictError(ArkError):
    """A conditional update found the object changed since it was read (another writer came first)."""

    http_status = 409
    grpc_code = grpc.StatusCode.ABORTED
    type = "invalid_request_error"
    default_code = "conflict"


class RequestTooLargeError(ArkError):
    """The body (or an upload) exceeds a configured limit."""

    http_status = 413
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    type = "invalid_request_error"
    default_code = "request_too_large"


class HeadersTooLargeError(RequestTooLargeError):
    """The request line and headers exceed the configured size or count (refused by the HTTP server itself)."""

    http_status = 431


class OverloadedError(ArkError):
    """Queues are full; the client should retry later."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    type = "rate_limit_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1, **kw) -> None:
        super().__init__(message, retry_after=retry_after, **kw)


class QuotaExceededError(ArkError):
    """The API key holds as many stored objects as it may; deleting some (or waiting for expiry) makes room."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    type = "insufficient_quota"
    default_code = "insufficient_quota"
    should_retry = False


class UnavailableError(ArkError):
    """A backend is down or draining."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    type = "server_error"
    default_code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, **kw) -> None:
        super().__init__(message, retry_after=retry_after, **kw)


class InternalError(ArkError):
    """A bug or an engine failure; details go to the log, not the client."""


class WorkerFailedError(InternalError):
    """The worker died or stopped responding while processing this request.

    Never retried on another worker, and marked not to be retried by the client: the request itself may be what
    killed the worker (a poison pill), and a retry would kill the next one.
    """

    default_code = "worker_failed"
    should_retry = False


class QuarantinedRequestError(InternalError):
    """The same request was being processed when a worker died a short while ago; it is refused for a while."""

    default_code = "request_quarantined"
    should_retry = False


class InternalTokenError(InternalError):
    """A call between ARK's processes without the right shared token (a deployment mistake, or a stranger)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    default_code = "invalid_internal_token"


def _all_subclasses(cls: type[ArkError]) -> list[type[ArkError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _all_subclasses(direct))]


# Class by name, to rebuild the exact class from an ErrorInfo reason on the other side of a gRPC call.
ERROR_CLASSES: dict[str, type[ArkError]] = {cls.__name__: cls for cls in _all_subclasses(ArkError)}
