"""Integer ranges read from the protos, and the retry hint every error carries."""

from __future__ import annotations

import pytest

from ark.chat.v1 import chat_service_pb2 as chat_pb
from ark.transcription.v1 import transcription_service_pb2 as transcription_pb
from edge.errors import error_headers
from edge.proto_ranges import check_integer, field_range
from services.common.errors import (
    ArkError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UnavailableError,
)

SAMPLING = chat_pb.SamplingParams.DESCRIPTOR


def test_ranges_come_from_the_field_types():
    assert field_range(SAMPLING, "seed") == (-(2**63), 2**63 - 1)  # int64
    assert field_range(SAMPLING, "top_k") == (-(2**31), 2**31 - 1)  # int32
    assert field_range(SAMPLING, "logit_bias.key") == (-(2**31), 2**31 - 1)  # a map's keys
    options = transcription_pb.TranscriptionOptions.DESCRIPTOR
    assert field_range(options, "voice_activity_detection.prefix_padding_ms") == (-(2**31), 2**31 - 1)
    with pytest.raises(KeyError):
        field_range(SAMPLING, "temperature")  # a float


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**5000], ids=["2^63", "-2^63-1", "10^5000"])
def test_a_value_outside_is_a_400_naming_the_param_and_quoted_briefly(value):
    with pytest.raises(InvalidRequestError) as info:
        check_integer(value, param="seed", message=SAMPLING, field="seed")
    assert info.value.param == "seed" and info.value.http_status == 400 and info.value.code == "invalid_value"
    assert len(info.value.message) < 200


def test_a_tighter_bound_applies_inside_the_field_range():
    assert check_integer(5, param="top_k", message=SAMPLING, field="top_k", minimum=0, maximum=10) == 5
    with pytest.raises(InvalidRequestError, match=r"0\.\.10"):
        check_integer(11, param="top_k", message=SAMPLING, field="top_k", minimum=0, maximum=10)


def test_quoted_client_strings_are_clipped():
    err = ModelNotFoundError("m" * 1_000_000)
    assert len(err.message) < 400 and "1000000 characters" in err.message
    assert len(InvalidRequestError("x", param="p" * 10_000).param) < 300


@pytest.mark.parametrize(
    ("err", "retry", "retry_after"),
    [
        (InvalidRequestError("bad"), "false", None),
        (ModelNotFoundError("m"), "false", None),
        (InternalError("bug"), "false", None),
        (OverloadedError("busy", retry_after=3), "true", "3"),
        (UnavailableError("down"), "true", "1"),
    ],
)
def test_every_error_says_whether_a_retry_can_help(err: ArkError, retry, retry_after):
    headers = error_headers(err)
    assert headers["x-should-retry"] == retry
    assert headers.get("retry-after") == retry_after


def test_an_error_may_overrule_its_status():
    class Poison(InternalError):
        should_retry = False

    class Transient(InternalError):
        should_retry = True

    assert error_headers(Poison("x"))["x-should-retry"] == "false"
    assert error_headers(Transient("x"))["x-should-retry"] == "true"


def test_no_error_message_grows_past_its_bound_whatever_it_quotes():
    err = InvalidRequestError(f"Invalid language '{'x' * 100_000}'.", param="language")
    assert len(err.message) < 2100 and len(str(err)) < 2100
