"""The poison-pill guard: requests that were being processed when their worker died are refused for a while.

A request that kills the worker running it (a pathological output constraint, a native-library bug) would kill
every worker it is sent to, and OpenAI's SDKs retry a 5xx twice by default. So such a request is never retried on
another worker, its error says `x-should-retry: false`, and its fingerprint — a hash of what the worker was asked to
do, without the request id or the session — is refused here for `seconds`, however it comes back.

One edge remembers what its own requests did; with several edges, each learns on its own (a poison pill costs at
most one worker per edge).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

from ark.chat.v1 import chat_service_pb2 as pb
from edge.metrics import CHAT_QUARANTINED
from services.common.errors import QuarantinedRequestError

# Bounded, so that a flood of distinct failing requests cannot grow the edge without limit.
_MAX_ENTRIES = 10_000


def fingerprint(request: pb.StreamGenerateChatCompletionRequest) -> str:
    """What makes two requests the same work for a worker: everything but the request id and the session."""
    work = pb.StreamGenerateChatCompletionRequest()
    work.CopyFrom(request)
    work.ClearField("request_id")
    work.ClearField("session")
    return hashlib.sha256(work.SerializeToString(deterministic=True)).hexdigest()


class Quarantine:
    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, request: pb.StreamGenerateChatCompletionRequest) -> None:
        if self._seconds <= 0:
            return
        key = fingerprint(request)
        self._until[key] = time.monotonic() + self._seconds
        self._until.move_to_end(key)
        while len(self._until) > _MAX_ENTRIES:
            self._until.popitem(last=False)

    def check(self, request: pb.StreamGenerateChatCompletionRequest) -> None:
        """Raise QuarantinedRequestError if `request` is quarantined."""
        if not self._until:
            return  # the usual case: no hashing at all
        now = time.monotonic()
        while self._until and next(iter(self._until.values())) <= now:
            self._until.popitem(last=False)
        until = self._until.get(fingerprint(request))
        if until is not None and until > now:
            CHAT_QUARANTINED.inc()
            raise QuarantinedRequestError(
                "This request was being processed when a chat worker failed, so it is refused for a while: it may "
                f"be what made the worker fail. Change the request, or retry it in {until - now:.0f} s."
            )
