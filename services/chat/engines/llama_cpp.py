"""Chat on CPU with llama.cpp (llama-cpp-python): a thin adapter under the generation layer.

It renders with the model's own chat template from the GGUF metadata, tokenizes, and samples tokens for a prompt of
token ids on a dedicated thread (the library is not thread-safe); tokens travel to the event loop as they are
sampled, and an abort flag checked before every token stops within one token. Sessions, tools, stop strings and
`n` are the generation layer's (services/chat/generator.py).

A context's KV cache is reused when the new prompt shares a prefix with what the context last held (llama-cpp-python
compares token ids), but never across cache salts (API keys): one tenant's cache never serves another.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from services.chat.engines.base import (
    ChatEngine,
    EngineEvent,
    EngineRun,
    PromptReuse,
    SequenceEnd,
    TokenSample,
    TopLogprob,
)
from services.chat.engines.llama_context import ArkLlama, StateImportError
from services.chat.settings import LlamaCppSettings
from services.common.config import ModelConfig, resolve_model_path
from services.common.cpu import auto_threads
from services.common.errors import ArkError
from services.common.threaded import stream_from_thread

log = logging.getLogger(__name__)


def llama_settings(model: ModelConfig, env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """The `Llama(...)` arguments for a model's settings (services/chat/settings.py; `auto` threads resolved for
    `env`, by default this process's environment: services/common/cpu.py), and its session KV budget (MB).

    Prompt evaluation uses as many threads as decoding unless `n_threads_batch` says otherwise."""
    settings = LlamaCppSettings.of(model).model_dump()
    budget_mb = settings.pop("session_kv_budget_mb")
    for name in ("n_threads", "n_threads_batch"):
        if settings[name] == "auto":
            settings[name] = auto_threads(env)
    if settings["n_threads_batch"] is None:
        settings["n_threads_batch"] = settings["n_threads"]
    return settings, budget_mb


def _kv_bytes(llama: llama_cpp.Llama) -> int:
    """KV-cache bytes of one context (f16 keys and values for every layer and position)."""
    meta = llama.metadata
    arch = meta.get("general.architecture", "llama")
    layers = int(meta[f"{arch}.block_count"])
    embd = int(meta[f"{arch}.embedding_length"])
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    return 2 * layers * llama.n_ctx() * (embd // heads) * kv_heads * 2


def _prefix_length(a: Any, b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaCppEngine(ChatEngine):
    """One GGUF model: a scratch context for stateless requests plus resident contexts for sessions."""

    def __init__(self, model: ModelConfig) -> None:
        settings, budget_mb = llama_settings(model)
        self.model_id = model.id
        self._path = str(resolve_model_path(model.path))
        self.grammar_vocabulary = self._path  # output constraints compile against this GGUF's vocabulary
        self._settings = settings
        log.info(
            "loading %s from %s (%d threads, %d for prompts)",
            model.id,
            self._path,
            settings["n_threads"],
            settings["n_threads_batch"],
        )
        # The weights are memory-mapped once and shared; each further context costs its KV cache and buffers.
        self._llama = ArkLlama(model_path=self._path, verbose=False, **settings)
        self.context_window = self._llama.n_ctx()
        self.vocab_size = self._llama.n_vocab()
        self.context_slots = max(1, int(budget_mb * 1024 * 1024 // _kv_bytes(self._llama)))
        log.info("%s: %d resident session contexts (%.0f MB KV budget)", model.id, self.context_slots, budget_mb)
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ArkError(f"model {model.id}: the GGUF file carries no chat template")
        vocab_model = self._llama._model
        eos_id, bos_id = self._llama.token_eos(), self._llama.token_bos()
        eos = vocab_model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = vocab_model.token_get_text(bos_id) if bos_id != -1 else ""
        self.eog_token = eos_id
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])
        self._formatter_closed = Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=bos, add_generation_prompt=False, stop_token_ids=[eos_id]
        )
        self._vocab = vocab_model.vocab
        # Asked for every sampled token, on the engine thread and in the generation layer: a set lookup rather than
        # a foreign call each time.
        self._eog = frozenset(t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self._vocab, t))
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{model.id}")
        self._cache_owner = ""  # cache salt whose tokens the scratch context currently holds

    # -- prompt ---------------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, Any]], *, open_turn: bool = True) -> str:
        formatter = self._formatter if open_turn else self._formatter_closed
        return formatter(messages=list(messages)).prompt

    def tokenize(self, text: str) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def encode_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        rendered = self._formatter(messages=list(messages))
        return self._llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    # -- contexts -------------------------------------------------------------------------------------------------

    def new_context(self) -> ArkLlama:
        return ArkLlama(model_path=self._path, verbose=False, **self._settings)

    def reset_context(self, context: ArkLlama) -> None:
        context.reset()

    def context_tokens(self, context: ArkLlama) -> Sequence[int]:
        return context.state_tokens()

    def export_state(self, context: ArkLlama) -> bytearray:
        return context.export_state()

    def import_state(self, context: ArkLlama, data: bytes | bytearray, tokens: Sequence[int]) -> bool:
        try:
            context.import_state(data, tokens)
        except StateImportError as exc:
            log.warning("a saved conversation state could not be loaded (%s); it will be recomputed", exc)
            return False
        return True

    # -- generation -----------------------------------------------------------------------------------------------

    def run(self, job: EngineRun) -> AsyncIterator[EngineEvent]:
        llama = job.context
        if llama is None:
            llama = self._llama
            if self._cache_owner != job.cache_salt:
                llama.reset()  # no KV reuse across API keys
                self._cache_owner = job.cache_salt
        cached = min(_prefix_length(llama._input_ids, job.prompt), len(job.prompt) - 1)
        return stream_from_thread(
            self._thread,
            lambda post, abort: self._run(llama, job, cached, abort, post),
            is_last=lambda item: item is None,
        )

    def _run(
        self,
        llama: ArkLlama,
        job: EngineRun,
        cached: int,
        abort: threading.Event,
        post: Callable[[EngineEvent | BaseException | None], None],
    ) -> None:
        """The `n` sequences one after another, on the engine thread; `None` posted last."""
        post(PromptReuse(cached))
        tokens = list(job.prompt)
        for index in range(job.n):
            sampling = job.sampling
            if index and sampling.seed is not None:
                sampling = replace(sampling, seed=sampling.seed + index)  # n choices, not n copies
            reason = self._sequence(llama, tokens, index, sampling, job, abort, post)
            if reason is None:
                return  # aborted: the consumer is gone
            post(SequenceEnd(index, reason))
        post(None)

    def _sequence(self, llama, tokens, index, sampling, job, abort, post) -> str | None:
        llama.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
        llama.logit_bias = dict(sampling.logit_bias)
        # The output constraint: a fresh matcher per sequence masks every step and consumes every sampled token.
        matcher = job.constraint.matcher() if job.constraint is not None else None
        llama.token_mask = matcher.mask_logits if matcher is not None else None
        top = sampling.top_logprobs if sampling.logprobs else -1
        stream = llama.generate(
            tokens,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or 0,
            min_p=sampling.min_p or 0.0,
            repeat_penalty=sampling.repetition_penalty or 1.0,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
        )
        for generated, token in enumerate(stream, start=1):
            if abort.is_set() or job.abort.is_set():
                return None
            if index in job.stopped:
                return "stopped"
            piece = llama.detokenize([token])
            if top >= 0:
                logprob, best = self._logprobs(llama, token, top)
                post(TokenSample(index, token, piece, logprob, best))
            else:
                post(TokenSample(index, token, piece))
            if self.is_eog(token):
                return "eog"
            if matcher is not None and (not matcher.accept(token) or matcher.terminated):
                return "grammar"  # the output is complete: nothing but end-of-generation could follow
            if generated >= job.max_new_tokens:
                return "length"
        return "length"

    def _logprobs(self, llama: ArkLlama, token: int, top: int) -> tuple[float, tuple[TopLogprob, ...]]:
        """Log probabilities of the model's distribution at the position just sampled (before sampling knobs)."""
        logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(self.vocab_size,))
        shifted = logits - logits.max()
        logz = float(np.log(np.exp(shifted).sum()))
        best = np.argpartition(-shifted, top)[:top] if top else []
        ranked = sorted(best, key=lambda t: -shifted[t])
        return float(shifted[token]) - logz, tuple(
            TopLogprob(int(t), llama.detokenize([int(t)]), float(shifted[t]) - logz) for t in ranked
        )

    async def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._llama.close()
