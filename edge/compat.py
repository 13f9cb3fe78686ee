"""How ARK treats every field of OpenAI's request schemas: the one table, in code.

Each field is exactly one of:
- SUPPORTED: honoured;
- IGNORED: accepted and has no effect (a hint such as `user`); named in the `x-ark-ignored-params` response header;
- REJECTED: would change the result but cannot be honoured; 400 `unsupported_parameter` unless the value is one
  that means "off" (e.g. `n: 1`, `logprobs: false`), which is accepted because it asks for nothing ARK lacks.
Fields that are neither OpenAI's nor ARK's are refused by the request schemas (`extra="forbid"`), as OpenAI does.
`docs/api.md` is checked against this table by the test suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from services.common.errors import UnsupportedParameterError


class Policy(StrEnum):
    SUPPORTED = "supported"
    IGNORED = "ignored"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Param:
    policy: Policy
    note: str
    # Values of a REJECTED field that ask for nothing and are therefore accepted.
    harmless: tuple[Any, ...] = (None,)


S, IGN, R = Policy.SUPPORTED, Policy.IGNORED, Policy.REJECTED

CHAT_COMPLETIONS: dict[str, Param] = {
    "messages": Param(S, "text content; `image_url`, `input_audio` and `file` parts are rejected"),
    "model": Param(S, "a configured model id or alias"),
    "modalities": Param(R, "only text output", (None, ["text"])),
    "verbosity": Param(IGN, "open models have no verbosity control"),
    "reasoning_effort": Param(IGN, "the default models do not reason"),
    "max_completion_tokens": Param(S, "same as max_tokens"),
    "frequency_penalty": Param(S, "-2..2"),
    "presence_penalty": Param(S, "-2..2"),
    "web_search_options": Param(R, "no web search"),
    "top_logprobs": Param(S, "0..20, with logprobs; streamed too"),
    "response_format": Param(
        S,
        "`text`, `json_object`, `json_schema` (strict or not), enforced token by token by llguidance; "
        "see structured-output.md",
    ),
    "audio": Param(R, "no audio output"),
    "store": Param(IGN, "ARK stores no completions", (None, False, True)),
    "stream": Param(S, "server-sent events"),
    "stop": Param(S, "up to the configured number of sequences"),
    "logit_bias": Param(S, "token ids of the model's own vocabulary, -100..100"),
    "logprobs": Param(S, "log probabilities of the model's distribution; streamed too"),
    "max_tokens": Param(S, "1..limits.max_tokens, and within the context window"),
    "n": Param(S, "1..limits.max_n; the prompt is computed once"),
    "prediction": Param(IGN, "a latency hint; output is unchanged"),
    "seed": Param(S, "same seed, same output on the same worker while it runs nothing else"),
    "stream_options": Param(S, "`include_usage`; `include_obfuscation` is ignored"),
    "tools": Param(S, "`function` tools (`strict` too); names unique; arguments constrained to the function's schema"),
    "tool_choice": Param(
        S,
        "`auto`, `none`, `required`, a named function, or `allowed_tools`; the prompt lists every tool whatever the "
        "choice (the output constraint enforces it, so a conversation's turns share their prompt)",
    ),
    "parallel_tool_calls": Param(
        S, "supported: up to `limits.structured_output.max_parallel_tool_calls` calls per turn; `false` allows one"
    ),
    "function_call": Param(R, "deprecated by OpenAI; use tools", (None, "none", "auto")),
    "functions": Param(R, "deprecated by OpenAI; use tools", (None, [])),
    "metadata": Param(IGN, "ARK stores no completions"),
    "temperature": Param(S, "0..2"),
    "top_p": Param(S, "0..1"),
    "user": Param(IGN, "end-user id hint"),
    "safety_identifier": Param(IGN, "end-user id hint"),
    "prompt_cache_key": Param(IGN, "ARK caches by session and prefix"),
    "prompt_cache_retention": Param(IGN, "ARK caches by session and prefix"),
    "prompt_cache_options": Param(IGN, "ARK caches by session and prefix"),
    "service_tier": Param(IGN, "one tier"),
    "moderation": Param(IGN, "no moderation layer"),
}

EMBEDDINGS: dict[str, Param] = {
    "input": Param(
        S,
        "a string, strings, token ids or token-id arrays (under an OpenAI model name, OpenAI's `cl100k_base` ids; "
        "else the model's own); limits.max_embedding_inputs inputs, limits.max_embedding_tokens tokens, and the "
        "model's maximum sequence length per input (no truncation)",
    ),
    "model": Param(S, "a configured embeddings model id or alias"),
    "encoding_format": Param(S, "`float` or `base64` (little-endian float32, as OpenAI)"),
    "dimensions": Param(
        S,
        "models configured with `supports_dimensions` only, else 400 `unsupported_parameter` (the model's own size "
        "is accepted)",
    ),
    "user": Param(IGN, "end-user id hint"),
}

TRANSCRIPTIONS: dict[str, Param] = {
    "file": Param(
        S,
        "flac, m4a, mp3, mp4, mpeg, mpga, oga, ogg, wav, webm (recognised by content, not by name); up to "
        "limits.max_audio_bytes (413 beyond) and limits.max_audio_seconds",
    ),
    "model": Param(S, "a configured transcription model id or alias (`whisper-1`, `gpt-4o-transcribe`, …)"),
    "language": Param(S, "ISO-639-1; a language the model cannot transcribe is refused (tiny.en: English only)"),
    "languages": Param(S, "each must be a language the model transcribes; a single one acts as `language`"),
    "keywords": Param(S, "biases decoding towards these words (Whisper hotwords)"),
    "prompt": Param(S, "conditions the decoder on this text (style, vocabulary)"),
    "response_format": Param(
        S, "`json`, `text`, `srt`, `vtt`, `verbose_json`; `diarized_json` is refused (no diarization)"
    ),
    "temperature": Param(S, "0..1; 0 or unset: Whisper's temperature fallback schedule"),
    "include": Param(R, "token log probabilities are not available", (None, [])),
    "timestamp_granularities": Param(S, "`segment` and `word` (`word` needs `verbose_json`)"),
    "stream": Param(S, "`transcript.text.delta` events (one per segment), then `transcript.text.done` with usage"),
    "chunking_strategy": Param(S, "`auto` or `server_vad`: silence is cut out first by voice activity detection"),
    "known_speaker_names": Param(R, "no speaker diarization", (None, [])),
    "known_speaker_references": Param(R, "no speaker diarization", (None, [])),
}

RESPONSES: dict[str, Param] = {
    "model": Param(S, "a configured chat model id or alias"),
    "input": Param(
        S,
        "a string or items: messages of any role with text parts, `function_call`, `function_call_output`, "
        "`reasoning` (accepted, adds nothing), `item_reference`; image, file and audio parts are rejected",
    ),
    "instructions": Param(
        S, "a system (developer) message ahead of the input; not carried over by previous_response_id"
    ),
    "previous_response_id": Param(S, "continues the stored chain on the worker holding its state"),
    "conversation": Param(S, "a conversation id: its items are the history, and the turn is appended to it"),
    "store": Param(S, "default true: kept for sessions.stored_retention_seconds (30 days)", (None, False, True)),
    "stream": Param(S, "server-sent events in the spec's order, with sequence_number"),
    "stream_options": Param(S, "`include_obfuscation` is accepted and ignored (no obfuscation field is sent)"),
    "background": Param(
        S,
        "returns `queued` at once; any edge polls, cancels and resumes the stream (`starting_after`); needs `store`",
    ),
    "tools": Param(
        S,
        "`function` tools (`strict` too); built-in tools (web search, file search, code interpreter, computer, MCP, "
        "image generation) are refused with a 400 naming the tool",
    ),
    "tool_choice": Param(S, "as for chat: `auto`, `none`, `required`, a named function, or `allowed_tools`"),
    "parallel_tool_calls": Param(S, "as for chat"),
    "max_tool_calls": Param(IGN, "ARK runs no built-in tools; one turn makes the calls the model writes"),
    "text": Param(
        S,
        "`format`: `text`, `json_object`, `json_schema` (on chat's constraint engine; with tools on `auto`, a call "
        "or an answer in the format); `verbosity` is ignored",
    ),
    "max_output_tokens": Param(
        S, "a cut answer has status `incomplete`, `incomplete_details.reason: max_output_tokens`"
    ),
    "temperature": Param(S, "0..2"),
    "top_p": Param(S, "0..1"),
    "top_logprobs": Param(S, "0..20, with include `message.output_text.logprobs`"),
    "include": Param(
        S,
        "`message.output_text.logprobs`; `reasoning.encrypted_content` is accepted and returns nothing (no "
        "reasoning model); others are refused",
    ),
    "metadata": Param(S, "stored and returned"),
    "prompt_cache_key": Param(S, "names the conversation for placement, as for chat"),
    "prompt_cache_retention": Param(IGN, "ARK caches by session and prefix"),
    "prompt_cache_options": Param(IGN, "ARK caches by session and prefix"),
    "truncation": Param(
        S, "`disabled` (a prompt beyond the context is a 400); `auto` is accepted and behaves the same"
    ),
    "user": Param(IGN, "end-user id hint (echoed)"),
    "safety_identifier": Param(IGN, "end-user id hint (echoed)"),
    "reasoning": Param(IGN, "the served models do not reason: accepted, no reasoning items are returned"),
    "service_tier": Param(IGN, "one tier"),
    "moderation": Param(IGN, "no moderation layer"),
    "context_management": Param(IGN, "no server-side compaction"),
    "prompt": Param(R, "no stored prompt templates"),
}


# ARK-only request fields for chat completions (top level; the openai SDK sends them through `extra_body`).
CHAT_EXTENSIONS: dict[str, str] = {
    "top_k": "sample among the k most likely tokens (0 = off)",
    "min_p": "drop tokens below this probability relative to the most likely one (0..1)",
    "repetition_penalty": "multiplicative penalty on recently repeated tokens (1.0 = off)",
    "session": "`auto` (default: use the `ark_session_id` cookie), `none` (stateless, no cookie) or `new` "
    "(start a new session even if a cookie is presented)",
    "stream_keepalive_seconds": "while the prompt is processed, send an SSE comment (`: keep-alive`) this often "
    "(default 10; 0 = off)",
    "stream_usage_every_chunk": "every chunk carries `usage` so far, not only the last one",
    "ark_metadata": (
        "the response (or the last chunk) carries `ark`: cached tokens, the tier the reused state came from "
        "(`state_tier`: `resident`, `host`, `disk` or null), session state and timings"
    ),
}

# ARK-only request fields of /v1/responses.
RESPONSES_EXTENSIONS: dict[str, str] = {
    "top_k": CHAT_EXTENSIONS["top_k"],
    "min_p": CHAT_EXTENSIONS["min_p"],
    "repetition_penalty": CHAT_EXTENSIONS["repetition_penalty"],
    "seed": "same seed, same output on the same worker",
    "stream_keepalive_seconds": CHAT_EXTENSIONS["stream_keepalive_seconds"],
}


def extensions_table(extensions: dict[str, str]) -> str:
    """ARK's extension parameters as docs/api.md shows them."""
    rows = ["| parameter | meaning |", "| --- | --- |"]
    rows += [f"| `{name}` | {note} |" for name, note in extensions.items()]
    return "\n".join(rows)


def apply_policy(table: dict[str, Param], body: BaseModel) -> list[str]:
    """Raise for a rejected field set to a value that matters; return the ignored fields the client sent."""
    ignored = []
    for name in body.model_fields_set:
        param = table.get(name)
        if param is None:
            continue
        value = getattr(body, name)
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_none=True)
        if param.policy is Policy.REJECTED and value not in param.harmless:
            raise UnsupportedParameterError(
                f"ARK does not support '{name}' ({param.note}); remove it from the request.", param=name
            )
        if param.policy is Policy.IGNORED and value is not None:
            ignored.append(name)
    return sorted(ignored)


def markdown_table(table: dict[str, Param]) -> str:
    """The table as docs/api.md shows it (a test keeps the document and the code identical)."""
    rows = ["| parameter | ARK | notes |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | {param.policy} | {param.note} |" for name, param in sorted(table.items())]
    return "\n".join(rows)


if __name__ == "__main__":
    for name, table in [
        ("chat completions", CHAT_COMPLETIONS),
        ("embeddings", EMBEDDINGS),
        ("transcriptions", TRANSCRIPTIONS),
        ("responses", RESPONSES),
    ]:
        print(f"### {name}\n\n{markdown_table(table)}\n")
