"""A llama.cpp context with the sampling chain and the state export ARK needs.

llama-cpp-python builds its sampler chain inside `generate()`; this subclass rebuilds that chain with two stages
the library's own chain lacks: the output constraint's token mask first (services.chat.grammar.matcher), then a
logit-bias stage (OpenAI's `logit_bias`).

It also saves and restores a conversation's state (its KV cells) as bytes, for the host and disk tiers
(`services.chat.state_tiers`). The library's own `save_state()` adds its `scores` array (up to n_batch x n_vocab
floats: 100 MB at 512 x 49152) to the whole context's state, and pickling its `LlamaState` copies that again;
llama.cpp's per-sequence state API writes only the KV cells in use (about 23 KB per token for SmolLM2-135M) and no
logits: `generate()` re-evaluates at least the last prompt token after a restore, which computes the logits it
samples from. Everything else is the library's.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from services.common.errors import ArkError

_SEQ = 0  # llama-cpp-python keeps a context's tokens in sequence 0
# llama.cpp's llama_token_data as numpy sees it: the mask stage reads the logits in place.
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


class StateImportError(ArkError):
    """A saved state does not fit this context (another model or context size, a damaged blob); the context is
    left empty, so the caller recomputes."""


class ArkLlama(llama_cpp.Llama):
    """`Llama` plus a per-request token mask and logit bias (set `token_mask` and `logit_bias` before `generate`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logit_bias: dict[int, float] = {}
        # Called with the logits (indexed by token id) before any other stage; sets forbidden tokens to -inf.
        self.token_mask: Callable[[np.ndarray], None] | None = None

    # -- saved state ----------------------------------------------------------------------------------------------

    def state_tokens(self) -> tuple[int, ...]:
        """The token ids whose KV cells the context holds, in order: what `export_state()` covers."""
        return tuple(self._input_ids.tolist())

    def export_state(self) -> bytearray:
        """The KV cells of `state_tokens()`, in llama.cpp's sequence-state format (opaque; see `import_state`).

        A bytearray that llama.cpp writes into directly: one pass over the memory, where a ctypes buffer turned into
        bytes would take three (zeroing, writing, copying)."""
        ctx = self._ctx.ctx
        self._ctx.kv_cache_seq_rm(_SEQ, self.n_tokens, -1)  # cells past n_tokens are stale (an aborted turn)
        size = llama_cpp.llama_state_seq_get_size(ctx, _SEQ)
        data = bytearray(size)
        target = (ctypes.c_uint8 * size).from_buffer(data)
        written = llama_cpp.llama_state_seq_get_data(ctx, target, size, _SEQ)
        del target  # releases the export of `data`'s buffer, so it can be resized
        if written == 0 and size:
            raise ArkError("llama.cpp could not serialise the context's state")
        del data[written:]
        return data

    def import_state(self, data: bytes | bytearray, tokens: Sequence[int]) -> None:
        """Replace the context's state with one from `export_state()` of a context of the same model and
        settings, covering `tokens`; the next `generate()` reuses it as it would its own prefix.

        Raises StateImportError (with the context left empty) when the state does not fit."""
        tokens = list(tokens)
        memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        llama_cpp.llama_memory_clear(memory, False)
        self.n_tokens = 0
        self._requires_eval = True
        if len(tokens) > self._n_ctx:
            raise StateImportError(f"a saved state of {len(tokens)} tokens exceeds the context ({self._n_ctx})")
        read = llama_cpp.llama_state_seq_set_data(self._ctx.ctx, _pointer(data), len(data), _SEQ)
        held = llama_cpp.llama_memory_seq_pos_max(memory, _SEQ) + 1
        if read == 0 or held != len(tokens):
            llama_cpp.llama_memory_clear(memory, False)
            raise StateImportError(f"a saved state was not loaded (read {read} bytes, {held} of {len(tokens)} cells)")
        self.input_ids[: len(tokens)] = tokens
        self.n_tokens = len(tokens)

    def _init_sampler(  # the library's signature
        self,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_eta: float = 0.1,
        mirostat_tau: float = 5.0,
        penalize_nl: bool = True,
        logits_processor: Any = None,
        grammar: Any = None,
    ) -> internals.LlamaSampler:
        sampler = internals.LlamaSampler()
        if self.token_mask is not None:
            sampler.add_custom(_mask_stage(self.token_mask))
        if self.logit_bias:
            sampler.add_logit_bias(self._n_vocab, self.logit_bias)
        sampler.add_penalties(
            n_vocab=self._n_vocab,
            penalty_last_n=self.last_n_tokens_size,
            penalty_repeat=repeat_penalty,
            penalty_freq=frequency_penalty,
            penalty_present=presence_penalty,
        )
        if grammar is not None:
            sampler.add_grammar(self._model, grammar)
        if temp == 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(top_k)
            sampler.add_typical(typical_p, 1)
            sampler.add_top_p(top_p, 1)
            sampler.add_min_p(min_p, 1)
            sampler.add_temp(temp)
            sampler.add_dist(self._seed)
        return sampler


def _mask_stage(mask: Callable[[np.ndarray], None]) -> Callable[[Any], None]:
    """A sampler stage applying `mask` to the candidates' logits, still in token-id order as the first stage."""

    def apply(candidates: Any) -> None:
        array = candidates.contents
        raw = (ctypes.c_char * (array.size * _TOKEN_DATA.itemsize)).from_address(ctypes.addressof(array.data.contents))
        mask(np.frombuffer(raw, dtype=_TOKEN_DATA)["logit"])

    return apply


def _pointer(data: bytes | bytearray) -> Any:
    """A uint8 pointer to the data's own buffer (no copy); it keeps `data` alive."""
    if isinstance(data, bytearray):
        return (ctypes.c_uint8 * len(data)).from_buffer(data)
    return ctypes.cast(ctypes.c_char_p(bytes(data)), ctypes.POINTER(ctypes.c_uint8))
