"""The edge's memory of a backend's refusal for load (edge/saturation.py)."""

from __future__ import annotations

import time

from edge.saturation import Saturation
from services.common.errors import InvalidRequestError, OverloadedError


def test_nothing_is_refused_before_a_refusal_for_load_and_other_errors_are_ignored():
    saturation = Saturation("test")
    assert saturation.refusal("busy") is None
    saturation.note(InvalidRequestError("bad"))
    assert saturation.remaining == 0 and saturation.refusal("busy") is None


def test_a_refusal_holds_for_its_retry_after_and_says_how_long_is_left():
    saturation = Saturation("test")
    saturation.note(OverloadedError("full", retry_after=3))
    assert 2 < saturation.remaining <= 3
    refusal = saturation.refusal("busy")
    assert isinstance(refusal, OverloadedError) and refusal.retry_after == 3 and refusal.message == "busy"


def test_max_hold_caps_the_hold_and_it_ends():
    saturation = Saturation("test", max_hold=0.05)
    saturation.note(OverloadedError("full", retry_after=30))
    assert 0 < saturation.remaining <= 0.05
    refusal = saturation.refusal("busy")
    assert refusal is not None and refusal.retry_after == 1  # whole seconds, at least one
    deadline = time.monotonic() + 5
    while saturation.refusal("busy") is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
