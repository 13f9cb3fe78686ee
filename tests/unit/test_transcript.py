"""Continuing from raw tokens, with a ChatML-like template and a character-level fake tokenizer."""

from services.chat.domain import Message, Role
from services.chat.transcript import Transcript, continue_tokens

EOG = -1


def render(messages, open_turn=True):
    text = "".join(f"<{m.role}>{m.content}<end>\n" for m in messages)
    return text + ("<assistant>" if open_turn else "")


def tokenize(text):
    out, i = [], 0
    while i < len(text):
        if text.startswith("<end>", i):
            out.append(EOG)
            i += 5
        else:
            out.append(ord(text[i]))
            i += 1
    return out


def kwargs():
    return dict(
        render_open=render, render_closed=lambda m: render(m, open_turn=False), tokenize=tokenize, eog_token=EOG
    )


USER1 = Message(Role.USER, "hi")
first_prompt = render([USER1])
# The model "thought" before answering: raw tokens hold text the client never saw.
RAW = (*tokenize("<think>x</think>"), *tokenize("hello"), EOG)
T = Transcript((USER1,), first_prompt, tuple(tokenize(first_prompt)), RAW, "hello", True)


def test_continuation_keeps_the_raw_tokens_the_client_never_saw():
    messages = [USER1, Message(Role.ASSISTANT, "hello"), Message(Role.USER, "again")]
    tokens = continue_tokens(T, messages, **kwargs())
    assert tokens is not None
    assert tokens[: len(T.prompt_tokens) + len(RAW)] == [*T.prompt_tokens, *RAW]
    assert tokens[len(T.prompt_tokens) + len(RAW) :] == tokenize("\n<user>again<end>\n<assistant>")


def test_edited_history_or_reply_does_not_continue():
    edited = [Message(Role.USER, "HI"), Message(Role.ASSISTANT, "hello"), Message(Role.USER, "again")]
    other_reply = [USER1, Message(Role.ASSISTANT, "hullo"), Message(Role.USER, "again")]
    assert continue_tokens(T, edited, **kwargs()) is None
    assert continue_tokens(T, other_reply, **kwargs()) is None
    assert continue_tokens(T, [USER1], **kwargs()) is None
