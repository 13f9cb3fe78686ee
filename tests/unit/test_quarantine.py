"""The poison-pill guard: what counts as the same request, how long it is refused, and what the client is told."""

from __future__ import annotations

import time

import pytest

from ark.chat.v1 import chat_service_pb2 as pb
from edge.quarantine import Quarantine, fingerprint
from services.common.errors import QuarantinedRequestError


def _request(text: str, request_id: str = "req_1", session: str = "") -> pb.StreamGenerateChatCompletionRequest:
    request = pb.StreamGenerateChatCompletionRequest(
        request_id=request_id, model="m", messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)]
    )
    request.session.session_id = session
    return request


def test_the_same_work_has_the_same_fingerprint_whatever_its_id_or_session():
    assert fingerprint(_request("a", "req_1", "s1")) == fingerprint(_request("a", "req_2", ""))
    assert fingerprint(_request("a")) != fingerprint(_request("b"))


def test_a_quarantined_request_is_refused_without_retry_then_released(monkeypatch: pytest.MonkeyPatch):
    quarantine = Quarantine(seconds=60)
    quarantine.check(_request("poison"))  # nothing quarantined: no error
    quarantine.add(_request("poison", "req_1"))
    with pytest.raises(QuarantinedRequestError) as info:
        quarantine.check(_request("poison", "req_2"))
    error = info.value
    assert error.http_status == 500 and error.code == "request_quarantined" and error.should_retry is False
    quarantine.check(_request("innocent"))  # other requests pass
    later = time.monotonic() + 61
    monkeypatch.setattr(time, "monotonic", lambda: later)
    quarantine.check(_request("poison"))  # released


def test_zero_seconds_switches_the_quarantine_off():
    quarantine = Quarantine(seconds=0)
    quarantine.add(_request("poison"))
    quarantine.check(_request("poison"))
