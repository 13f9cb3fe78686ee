"""Chat on CPU with llama.cpp (llama-cpp-python): a thin adapter under the generation layer.

It renders with the model's own chat template from the GGUF metadata and tokenizes; generation runs in one
llama.cpp context per worker that decodes many sequences in one batched step (continuous batching:
services/chat/engines/llama_context.py), so `max_concurrency` is its number of scratch sequences and the generation
layer's admission lets that many requests run at once. A conversation kept between turns is a resident sequence of
the same context. Sessions, tools, stop strings and `n` are the generation layer's (services/chat/generator.py).

A sequence's KV cells are reused when a new prompt shares a prefix with what it last held, but never across cache
salts (API keys): one tenant's cache never serves another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import llama_cpp
from llama_cpp import _internals as internals
from llama_cpp import _logger as llama_logger
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from services.chat.domain import GenerationRequest
from services.chat.engines.base import ChatEngine, EngineEvent, EngineRun
from services.chat.engines.llama_context import BatchContext, KvSequence, StateImportError
from services.chat.settings import LlamaCppSettings
from services.common.config import ModelConfig, resolve_model_path
from services.common.cpu import auto_sequences, auto_threads
from services.common.errors import ArkError, InvalidRequestError

log = logging.getLogger(__name__)

# KV cells for the running sequences, per sequence: room for a typical prompt and reply each; a longer one borrows
# from the others, and when the cells run out idle caches are cleared first (llama_context.BatchContext).
_SCRATCH_CELLS_PER_SEQUENCE = 1024
# A resident conversation needs this many cells on average: the budget keeps at least budget / this many.
_RESIDENT_CELLS = 2048


def llama_settings(model: ModelConfig, env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """The `Llama(...)` arguments for a model's settings (services/chat/settings.py; `auto` threads and sequences
    resolved for `env`, by default this process's environment: services/common/cpu.py), and its session KV budget
    (MB).

    Prompt evaluation uses as many threads as decoding unless `n_threads_batch` says otherwise."""
    settings = LlamaCppSettings.of(model).model_dump()
    budget_mb = settings.pop("session_kv_budget_mb")
    for name in ("n_threads", "n_threads_batch"):
        if settings[name] == "auto":
            settings[name] = auto_threads(env)
    if settings["n_threads_batch"] is None:
        settings["n_threads_batch"] = settings["n_threads"]
    if settings["n_seq"] == "auto":
        settings["n_seq"] = auto_sequences(settings["n_threads"])
    return settings, budget_mb


def _kv_bytes_per_cell(metadata: Mapping[str, str]) -> int:
    """KV-cache bytes of one cell (f16 keys and values of one position in every layer)."""
    arch = metadata.get("general.architecture", "llama")
    layers = int(metadata[f"{arch}.block_count"])
    embd = int(metadata[f"{arch}.embedding_length"])
    heads = int(metadata[f"{arch}.attention.head_count"])
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
    return 2 * layers * (embd // heads) * kv_heads * 2


class LlamaCppEngine(ChatEngine):
    """One GGUF model: one context of `n_seq` scratch sequences for running requests plus resident sequences for
    conversations between turns."""

    def __init__(self, model: ModelConfig) -> None:
        settings, budget_mb = llama_settings(model)
        n_seq = settings["n_seq"]
        self.model_id = model.id
        self._path = str(resolve_model_path(model.path))
        self.grammar_vocabulary = self._path  # output constraints compile against this GGUF's vocabulary
        # The weights are memory-mapped once; every sequence shares them and the context.
        llama_logger.set_verbose(False)  # llama.cpp's own log: errors only
        self._model = internals.LlamaModel(
            path_model=self._path, params=llama_cpp.llama_model_default_params(), verbose=False
        )
        metadata = self._model.metadata()
        self.context_window = min(settings["n_ctx"], self._model.n_ctx_train())
        self.vocab_size = self._model.n_vocab()
        cell = _kv_bytes_per_cell(metadata)
        resident_cells = int(budget_mb * 1024 * 1024 // cell)
        # Conversations are resident sequences, as many as the budget's average-sized ones and never fewer than the
        # sequences that run at once: a burst of new conversations each finds a free one (no idle state to save out
        # first, a step's wait per turn), and short ones share the budget's cells. The cells, not this count, bound
        # the resident conversations: past the budget the least recent idle one goes to the host tier.
        self.context_slots = max(n_seq, min(128, resident_cells // _RESIDENT_CELLS))
        self.max_concurrency = n_seq
        cells = max(self.context_window, resident_cells + n_seq * _SCRATCH_CELLS_PER_SEQUENCE)
        log.info(
            "loading %s from %s: %d sequences at once, %d resident conversations, %d KV cells (%.0f MB), "
            "%d threads (%d for prompts)",
            model.id,
            self._path,
            n_seq,
            self.context_slots,
            cells,
            cells * cell / 2**20,
            settings["n_threads"],
            settings["n_threads_batch"],
        )
        # Events the loop thread posted during its current step, for their event loops (_hand_over).
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any], Any]] = []
        self._batch = BatchContext(
            self._model,
            n_cells=cells,
            n_scratch=n_seq,
            n_resident=self.context_slots,
            resident_cells=resident_cells,
            n_batch=settings["n_batch"],
            n_threads=settings["n_threads"],
            n_threads_batch=settings["n_threads_batch"],
            name=model.id,
            after_step=self._hand_over,
        )
        template = metadata.get("tokenizer.chat_template")
        if not template:
            raise ArkError(f"model {model.id}: the GGUF file carries no chat template")
        eos_id, bos_id = self._model.token_eos(), self._model.token_bos()
        eos = self._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = self._model.token_get_text(bos_id) if bos_id != -1 else ""
        self.eog_token = eos_id
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])
        self._formatter_closed = Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=bos, add_generation_prompt=False, stop_token_ids=[eos_id]
        )
        vocab = self._model.vocab
        # Asked for every sampled token in the generation layer: a set lookup rather than a foreign call each time.
        self._eog = frozenset(t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t))

    # -- prompt ---------------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, Any]], *, open_turn: bool = True) -> str:
        formatter = self._formatter if open_turn else self._formatter_closed
        return formatter(messages=list(messages)).prompt

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def encode_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        rendered = self._formatter(messages=list(messages))
        return self._model.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def validate(self, request: GenerationRequest) -> None:
        if request.sampling.n > self.max_concurrency:
            raise InvalidRequestError(
                f"Invalid value for 'n': this model generates at most {self.max_concurrency} choices at once.",
                param="n",
            )

    # -- conversations: resident sequences ------------------------------------------------------------------------

    def new_context(self) -> KvSequence:
        return self._batch.resident()

    def reset_context(self, context: KvSequence) -> None:
        self._batch.clear(context)

    def context_tokens(self, context: KvSequence) -> Sequence[int]:
        return tuple(context.tokens)

    def export_state(self, context: KvSequence) -> bytearray:
        return self._batch.export_state(context)

    def import_state(self, context: KvSequence, data: bytes | bytearray, tokens: Sequence[int]) -> bool:
        try:
            self._batch.import_state(context, data, tokens)
        except StateImportError as exc:
            log.warning("a saved conversation state could not be loaded (%s); it will be recomputed", exc)
            return False
        return True

    def on_memory_full(self, spill: Callable[[], bool]) -> None:
        self._batch.on_full = spill

    # -- generation -----------------------------------------------------------------------------------------------

    def _hand_over(self) -> None:
        """After each step, on the loop thread: one wake-up of the event loop for every event of the step.

        A wake-up per event (a token of each of 16 sequences) let the event loop take the interpreter from the
        loop thread between two samples, 16 times a step, and the step's sampling waited for the generation layer;
        handed over at once, the event loop processes the step's tokens while the next llama_decode runs (it
        releases the interpreter)."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for loop, events, item in outbox:
            by_loop.setdefault(loop, []).append((events, item))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_put_all, items)

    async def run(self, job: EngineRun) -> AsyncIterator[EngineEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def post(item: Any) -> None:  # on the loop thread; delivered by _hand_over
            self._outbox.append((loop, events, item))

        self._batch.submit(job, post, job.context)
        released = False
        try:
            while True:
                item = await events.get()
                if item is None:
                    released = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.abort.set()
            # The sequences stay in use until the loop lets the job go (at its next step).
            while not released:
                item = await asyncio.shield(events.get())
                released = item is None

    async def close(self) -> None:
        await asyncio.to_thread(self._batch.close)
        self._model.close()


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for events, item in items:
        events.put_nowait(item)
