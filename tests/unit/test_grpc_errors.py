import grpc
import pytest

from services.common.errors import InternalError, InvalidRequestError, ModelNotFoundError, OverloadedError
from services.common.grpc_errors import from_rpc_error, to_rpc_status


class FakeRpcError(grpc.RpcError):
    """A terminated call as grpc.aio exposes it, built from a real encoded status."""

    def __init__(self, status: grpc.Status | None, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        self._status = status
        self._code = status.code if status else code

    def code(self):
        return self._code

    def details(self):
        return self._status.details if self._status else "boom"

    def trailing_metadata(self):
        return self._status.trailing_metadata if self._status else ()


@pytest.mark.parametrize(
    "err",
    [
        InvalidRequestError("bad", param="messages[0].content", code="invalid_value"),
        ModelNotFoundError("nope"),
        OverloadedError("busy", retry_after=3),
    ],
)
def test_errors_cross_grpc_with_class_param_and_code(err):
    back = from_rpc_error(FakeRpcError(to_rpc_status(err)))
    assert type(back) is type(err)
    assert back.to_dict() == err.to_dict()
    assert back.http_status == err.http_status
    assert back.retry_after == err.retry_after


def test_bare_transport_failures_become_safe_errors():
    unavailable = from_rpc_error(FakeRpcError(None, grpc.StatusCode.UNAVAILABLE))
    assert unavailable.http_status == 503 and unavailable.retry_after
    internal = from_rpc_error(FakeRpcError(None, grpc.StatusCode.UNKNOWN))
    assert isinstance(internal, InternalError) and "boom" not in internal.message
