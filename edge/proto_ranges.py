"""The range of every integer the edge puts into a protobuf message, read from the message's own descriptor.

JSON integers are unbounded and OpenAI's schemas often say no more than "integer", so a request can carry a `seed`
of 2^64 or a `logit_bias` key of 2^40 that passes the schema and then fails inside protobuf, far from the request.
Each endpoint lists which OpenAI parameter lands in which proto field (one table per endpoint, next to its
translation); this module checks the value against that field's type, and against any tighter bound the caller
knows (a configured limit, the model's), and refuses it with a 400 naming the parameter.
"""

from __future__ import annotations

from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.errors import InvalidRequestError, clip

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT32 = (0, 2**32 - 1)
_UINT64 = (0, 2**64 - 1)
INTEGER_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
}


@cache
def field_range(message: Descriptor, path: str) -> tuple[int, int]:
    """The values integer field `path` of `message` can hold; `path` may descend (`voice_activity_detection.x`)
    and name a map's keys or values (`logit_bias.key`)."""
    descriptor: Descriptor | None = message
    field: FieldDescriptor | None = None
    for part in path.split("."):
        if descriptor is None:
            raise KeyError(f"{message.full_name}: {path} descends into a scalar")
        field = descriptor.fields_by_name[part]
        descriptor = field.message_type
    assert field is not None
    if field.type not in INTEGER_RANGES:
        raise KeyError(f"{message.full_name}.{path} is not an integer field")
    return INTEGER_RANGES[field.type]


def show_integer(value: int) -> str:
    try:
        return clip(str(value), 40)
    except ValueError:  # Python refuses to print integers of more than 4300 digits
        return f"a {value.bit_length()}-bit number"


def check_integer(
    value: int,
    *,
    param: str,
    message: Descriptor,
    field: str,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """`value` if the proto field can hold it and it is within [minimum, maximum]; else InvalidRequestError."""
    low, high = field_range(message, field)
    if minimum is not None:
        low = max(low, minimum)
    if maximum is not None:
        high = min(high, maximum)
    if not low <= value <= high:
        raise InvalidRequestError(
            f"Invalid value for '{param}': {show_integer(value)} is outside the supported range {low}..{high}.",
            param=param,
            code="invalid_value",
        )
    return value
