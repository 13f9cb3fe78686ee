"""The conversation key the edge places by: stable over a conversation's turns, distinct between conversations."""

from __future__ import annotations

import hashlib

from edge.chat.schemas import ChatMessageIn
from edge.sessions.conversation import conversation_key, opening_messages

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def messages(*items: dict) -> list[ChatMessageIn]:
    return [ChatMessageIn.model_validate(m) for m in items]


def test_every_turn_of_a_conversation_has_the_key_of_its_opening():
    first = messages(SYSTEM, {"role": "user", "content": "Summarise this document: ..."})
    later = messages(
        SYSTEM,
        {"role": "user", "content": "Summarise this document: ..."},
        {"role": "assistant", "content": "It says ...", "refusal": None, "annotations": []},
        {"role": "user", "content": "And the second part?"},
    )
    assert conversation_key(first) == conversation_key(later)
    assert conversation_key(first).startswith("m:")


def test_users_sharing_a_system_prompt_are_different_conversations():
    alice = messages(SYSTEM, {"role": "user", "content": "I am Alice."})
    bob = messages(SYSTEM, {"role": "user", "content": "I am Bob."})
    assert conversation_key(alice) != conversation_key(bob)


def test_every_leading_system_and_developer_message_counts():
    a = messages(SYSTEM, {"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"})
    b = messages(SYSTEM, {"role": "developer", "content": "Answer in German."}, {"role": "user", "content": "Hi"})
    assert conversation_key(a) != conversation_key(b)
    assert [m.role for m in opening_messages(a)] == ["system", "developer", "user"]


def test_text_parts_and_a_plain_string_are_different_content_but_each_is_stable():
    parts = messages({"role": "user", "content": [{"type": "text", "text": "Hi"}]})
    assert conversation_key(parts) == conversation_key(
        messages({"role": "user", "content": [{"type": "text", "text": "Hi"}]})
    )


def test_prompt_cache_key_names_the_conversation_whatever_the_messages():
    one = messages(SYSTEM, {"role": "user", "content": "first"})
    other = messages({"role": "user", "content": "unrelated"})
    assert conversation_key(one, "user-42") == conversation_key(other, "user-42")
    assert conversation_key(one, "user-42") == "k:" + hashlib.sha256(b"user-42").hexdigest()
    assert conversation_key(one, "user-42") != conversation_key(one, "user-43") != conversation_key(one)
