"""A backend's last refusal for load, held at the edge for as long as the backend said it would last.

A service that refuses a request for load (RESOURCE_EXHAUSTED) says for how long its queue stays too long: the
Retry-After it computed from its expected wait (services/common/admission.py). For that long, or at most
`max_hold` seconds, the edge refuses new requests for that backend itself, before uploading or calling anything:
on a saturated machine a round trip to a busy worker costs hundreds of milliseconds, and every one of them takes
CPU from the work in progress. A refusal at the edge costs well under a millisecond, and the client hears the same
answer (429 with Retry-After). Retry-After is whole seconds, so a short `max_hold` lets a request through every so
often to learn as soon as the backend has room again.
"""

from __future__ import annotations

import time

from services.common.admission import refusal
from services.common.errors import ArkError, OverloadedError


class Saturation:
    def __init__(self, name: str, *, max_hold: float | None = None) -> None:
        self._name = name  # the metric's label: which backend the edge refused for
        self._max_hold = max_hold  # None: the whole Retry-After
        self._until = 0.0

    def note(self, error: ArkError) -> None:
        """Remember a refusal for load from the backend (any other error is ignored)."""
        if isinstance(error, OverloadedError):
            hold = float(error.retry_after or 1)
            if self._max_hold is not None:
                hold = min(hold, self._max_hold)
            self._until = max(self._until, time.monotonic() + hold)

    @property
    def remaining(self) -> float:
        """Seconds the backend's last refusal for load still holds (0 when it no longer does)."""
        return max(0.0, self._until - time.monotonic())

    def refusal(self, message: str) -> OverloadedError | None:
        """The error to refuse with while the refusal holds, counted in `ark_admission_rejected`; else None."""
        wait = self.remaining
        return refusal(self._name, "saturated_at_edge", message, wait) if wait > 0 else None
