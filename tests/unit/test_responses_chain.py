"""A stored response keeps its own items and a link to the previous one; a continuation walks the links.

Pure edge logic over a stand-in for the registry's stored objects (the e2e suite runs the same through the stack).
"""

from __future__ import annotations

import pytest

from edge.clients.stored_objects import Stored
from edge.responses.serving import Responses
from services.common.config import LimitsConfig
from services.common.errors import InvalidRequestError, NotFoundError


def message(item_id: str, role: str = "user") -> dict:
    return {"id": item_id, "type": "message", "role": role, "status": "completed", "content": []}


class Records:
    def __init__(self, records: dict[str, dict]) -> None:
        self.records = records

    async def get(self, owner: str, kind: int, object_id: str) -> Stored:
        if object_id not in self.records:
            raise NotFoundError(object_id)
        return Stored(object_id, self.records[object_id], "sess", 0)


def linked(n: int) -> dict[str, dict]:
    """resp_0 … resp_{n-1}, each continuing the previous one, with one input and one output item each."""
    return {
        f"resp_{i}": {
            "response": {
                "previous_response_id": f"resp_{i - 1}" if i else None,
                "output": [message(f"out{i}", "assistant")],
            },
            "input": [message(f"in{i}")],
            "conversation_key": "key",
        }
        for i in range(n)
    }


def responses(records: dict[str, dict], **limits) -> Responses:
    return Responses(None, None, Records(records), LimitsConfig(**limits))  # type: ignore[arg-type]


async def test_the_chain_is_rebuilt_oldest_first_from_the_links():
    history, newest = await responses(linked(3))._chain("k", "resp_2")
    assert [i["id"] for i in history] == ["in0", "out0", "in1", "out1", "in2", "out2"]
    assert newest.id == "resp_2" and newest.record["conversation_key"] == "key"


async def test_a_missing_link_is_the_400_for_an_unknown_previous_response_naming_it():
    records = linked(3)
    del records["resp_1"]
    with pytest.raises(InvalidRequestError) as e:
        await responses(records)._chain("k", "resp_2")
    assert e.value.param == "previous_response_id" and "resp_1" in e.value.message


async def test_the_walk_is_bounded():
    history, _ = await responses(linked(4), max_messages=4)._chain("k", "resp_3")
    assert len(history) == 8
    with pytest.raises(InvalidRequestError) as e:
        await responses(linked(5), max_messages=4)._chain("k", "resp_4")
    assert e.value.param == "previous_response_id"


async def test_a_record_stored_with_its_whole_history_is_not_continued_and_does_not_crash():
    old = {"resp_0": {"response": {"output": []}, "context": [message("in0")], "conversation_key": ""}}
    with pytest.raises(InvalidRequestError) as e:
        await responses(old)._chain("k", "resp_0")
    assert e.value.code == "previous_response_not_found"
