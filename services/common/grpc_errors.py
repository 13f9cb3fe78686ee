"""ArkError ⇄ gRPC status with `google.rpc.ErrorInfo`, so errors cross the wire with their class and `param`."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import (
    ERROR_CLASSES,
    ERROR_DOMAIN,
    ArkError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)


def to_rpc_status(err: ArkError) -> grpc.Status:
    """Encode an ArkError as a rich status (AIP-193)."""
    metadata = {"type": err.type}
    if err.param is not None:
        metadata["param"] = err.param
    if err.code is not None:
        metadata["code"] = err.code
    if err.retry_after is not None:
        metadata["retry_after"] = str(err.retry_after)
    info = error_details_pb2.ErrorInfo(reason=type(err).__name__, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=err.grpc_code.value[0], message=err.message, details=[detail])
    return rpc_status.to_status(status)


# What a bare status (no ErrorInfo: a transport failure or a foreign server) means to a client.
_BARE_CODES: dict[grpc.StatusCode, type[ArkError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


def from_rpc_error(exc: grpc.RpcError) -> ArkError:
    """Decode the ArkError a service raised; transport failures become 503/500 with a safe message."""
    status = rpc_status.from_call(exc) if hasattr(exc, "trailing_metadata") else None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == ERROR_DOMAIN and info.reason in ERROR_CLASSES:
                    return _rebuild(ERROR_CLASSES[info.reason], status.message, dict(info.metadata))
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    cls = _BARE_CODES.get(code)
    if cls is UnavailableError:
        return UnavailableError("A backend service is unavailable; retry shortly.")
    if cls is not None:
        return cls(exc.details() or code.name)
    return InternalError("The server had an error while processing your request.")


def _rebuild(cls: type[ArkError], message: str, meta: dict[str, str]) -> ArkError:
    err = ArkError.__new__(cls)
    ArkError.__init__(
        err,
        message,
        param=meta.get("param"),
        code=meta.get("code"),
        retry_after=int(meta["retry_after"]) if "retry_after" in meta else None,
    )
    return err
