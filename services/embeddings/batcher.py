"""Dynamic batching: token sequences from concurrent requests are encoded together.

One encoder forward pass over 32 sentences costs far less than 32 passes over one (MiniLM on 2 CPU cores: about
6 ms for one sentence, 50 ms for 32), so concurrent requests should share passes. One dispatcher task cuts
batches from the waiting requests and hands them to the encoder:

- a batch opens when a sequence is queued and stays open while requests keep arriving: it closes once none has
  arrived for `idle` seconds, or `window` seconds after it opened, or at once when enough is waiting for a full
  batch (`max_batch_size` sequences, or `max_batch_tokens` padded tokens: count x longest). A lone request pays
  only the idle gap (about a millisecond); a burst of concurrent requests becomes one batch instead of being cut
  at an arbitrary instant, so the encoder then has the cores to itself rather than competing with the handling
  of the burst's tail, and the engine can sort the whole burst by length;
- the encoder runs in `encoders` dedicated worker threads (one batch each), so while they work the event loop
  keeps accepting requests; a batch is cut only once an encoder is free, so under load batches grow by themselves
  and the window adds no delay. Several encoders pay off on CPU: two single-threaded forward passes side by side
  beat one pass using two threads, which stall at every synchronisation point when another process takes a core;
- batches are cut round-robin across waiting requests (one sequence from each in turn, oldest request first), so
  a small request never waits behind all of a 2048-input one, only behind about one batch;
- a request's sequences are queued shortest first, so batches cut from a large request hold sequences of similar
  length (less padding); results go back in the request's own order;
- a cancelled request (client gone) is dropped from the queue before its remaining sequences are encoded;
- admission by time, not just length: a request is refused at once (OverloadedError, HTTP 429 with Retry-After)
  when the wait it can expect exceeds `max_wait_seconds` (the tokens queued ahead of it times the recent encoding
  cost per padded token, shared by the encoders; an admitted request still being tokenized counts at the recent
  tokens per input), or when `max_queued` sequences are already waiting or admitted;
  the embedder asks (`admit`, which holds the request's place) before it tokenizes, so a refusal costs no
  tokenizing. A request none of whose sequences has reached an encoder after `max_wait_seconds` is refused then
  too, so nobody waits past the bound. Waits and refusals are the
  `ark_queue_wait_seconds` and `ark_admission_rejected_total` metrics, as for chat and transcription.

Pure asyncio and generic over the encoder, so it is unit-tested with a fake one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.common.admission import refusal, timed_out, wait_too_long
from services.common.errors import InternalError, UnavailableError
from services.common.metrics import QUEUE_WAIT

log = logging.getLogger(__name__)

# Weight of the newest batch in the running mean of the encoding cost per padded token.
_EWMA_WEIGHT = 0.2

# Encodes a batch of token sequences, blocking; returns one result per sequence, in order.
Encoder = Callable[[list[Sequence[int]]], Sequence[Any]]


@dataclass(eq=False, slots=True)
class _Request:
    """One submitted request: what is still queued of it, and the results gathered so far."""

    future: asyncio.Future[list[Any]]
    waiting: deque[tuple[int, Sequence[int]]]  # (position in the request, tokens), shortest first
    results: list[Any]
    remaining: int  # results still missing
    queued_at: float


@dataclass(frozen=True, slots=True)
class _Item:
    request: _Request
    position: int
    tokens: Sequence[int]


class Batcher:
    def __init__(
        self,
        encode: Encoder,
        *,
        window_seconds: float,
        idle_seconds: float | None = None,
        max_batch_size: int,
        max_batch_tokens: int,
        max_queued: int,
        encoders: int = 1,
        max_wait_seconds: float | None = None,
        name: str = "encoder",
        model: str = "",
    ) -> None:
        idle_seconds = window_seconds if idle_seconds is None else idle_seconds
        if min(max_batch_size, max_batch_tokens, max_queued, encoders) < 1 or min(window_seconds, idle_seconds) < 0:
            raise ValueError("batch bounds and encoders must be positive, the window and idle gap non-negative")
        self._encode = encode
        self._window = window_seconds
        self._idle = idle_seconds
        self._last_arrival = 0.0
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._max_queued = max_queued
        self._max_wait = max_wait_seconds
        self._model = model or name  # the metrics' label
        self._encoders = encoders
        self._queued_tokens = 0  # tokens of the waiting sequences
        self._reserved = 0  # sequences of admitted requests still being tokenized
        self._cost_per_token: float | None = None  # seconds per padded token, recently (None: nothing seen yet)
        self._tokens_per_input = 0.0  # tokens of one input, recently: what an admitted, untokenized input will be
        self._requests: deque[_Request] = deque()  # requests with sequences still waiting, oldest first
        self._queued = 0  # sequences waiting, across those requests
        self._arrived = asyncio.Event()
        self._free_encoders = asyncio.Semaphore(encoders)
        self._executor = ThreadPoolExecutor(max_workers=encoders, thread_name_prefix=name)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches in the encoders
        self._closed = False

    @property
    def queued(self) -> int:
        """Sequences waiting for the encoder."""
        return self._queued

    def expected_wait(self) -> float:
        """Seconds a request arriving now can expect to wait for an encoder."""
        ahead = self._queued_tokens + self._reserved * self._tokens_per_input
        if self._cost_per_token is None or not ahead:
            return 0.0
        return ahead * self._cost_per_token / self._encoders

    def admit(self, inputs: int) -> Reservation:
        """Refuse now (OverloadedError) if a request of `inputs` sequences arriving now would wait longer than the
        bound or overfill the queue; else hold its place in the queue until `submit` (or `release`).

        The caller asks before tokenizing: under a flood of large requests, tokenizing each before refusing it took
        most of a second per refusal."""
        if self._closed:
            raise UnavailableError("The embeddings service is shutting down.")
        expected = self.expected_wait()
        if self._max_wait is not None and expected > self._max_wait:
            raise wait_too_long(self._model, expected, self._max_wait)
        if inputs and self._queued + self._reserved + inputs > self._max_queued:
            raise refusal(
                self._model,
                "queue_full",
                f"The server is busy: {self._queued + self._reserved} inputs are already queued for this model. "
                "Retry shortly.",
                self.expected_wait() - (self._max_wait or 0.0),
            )
        self._reserved += inputs
        return Reservation(self, inputs)

    async def submit(self, sequences: Sequence[Sequence[int]], reservation: Reservation | None = None) -> list[Any]:
        """Encode `sequences` (one request's) in shared batches; results in the same order. Without the
        `reservation` of an earlier `admit`, it is admitted now."""
        if reservation is None:
            reservation = self.admit(len(sequences))
        reservation.release()
        if not sequences:
            return []
        loop = asyncio.get_running_loop()
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        request = _Request(
            future=loop.create_future(),
            waiting=deque((i, sequences[i]) for i in order),
            results=[None] * len(sequences),
            remaining=len(sequences),
            queued_at=loop.time(),
        )
        self._requests.append(request)
        self._queued += len(sequences)
        tokens = sum(map(len, sequences))
        self._queued_tokens += tokens
        mean = tokens / len(sequences)
        previous = self._tokens_per_input
        self._tokens_per_input = mean if not previous else previous + _EWMA_WEIGHT * (mean - previous)
        self._last_arrival = request.queued_at
        self._arrived.set()
        if self._task is None:
            self._task = asyncio.create_task(self._dispatch(), name="embeddings-batcher")
        if self._max_wait is None:
            # Cancelling the caller cancels this future; the dispatcher then drops what is left of the request.
            return await request.future
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), self._max_wait)
        except TimeoutError:
            if request.future.done() or len(request.waiting) < len(request.results):
                return await request.future  # done, or started: it is being encoded, so let it finish
            request.future.cancel()
            self._drop_abandoned()
            raise timed_out(self._model, self._max_wait, self.expected_wait()) from None
        except asyncio.CancelledError:
            request.future.cancel()  # the client is gone: the dispatcher drops what is left of the request
            raise

    async def close(self) -> None:
        """Stop dispatching, let the batches in the encoders finish and answer, fail what is still waiting."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._running:
            await asyncio.wait(self._running)
        for request in self._requests:
            _fail(request, UnavailableError("The embeddings service is shutting down."))
        self._requests.clear()
        self._queued = self._queued_tokens = 0
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned()
            if not self._requests:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            opened = self._requests[0].queued_at
            while not self._holds_full_batch() and (delay := self._closes_at(opened) - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), delay)
                except TimeoutError:
                    break
            # Cut only once an encoder is free: while all are busy, the batch keeps growing.
            await self._free_encoders.acquire()
            self._drop_abandoned()
            batch = self._take_batch()
            if not batch:
                self._free_encoders.release()
                continue
            task = asyncio.create_task(self._run(loop, batch))
            self._running.add(task)
            task.add_done_callback(self._encoder_freed)

    def _closes_at(self, opened: float) -> float:
        """When the batch that opened at `opened` closes: after the idle gap, at the latest after the window."""
        return min(opened + self._window, self._last_arrival + self._idle)

    def _encoder_freed(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._free_encoders.release()

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        started = time.perf_counter()
        running = loop.run_in_executor(self._executor, self._encode, [item.tokens for item in batch])
        await asyncio.wait([running])  # never raises: the outcome, result or failure, is handed out below
        if running.exception() is None:
            padded = len(batch) * max(len(item.tokens) for item in batch)
            cost = (time.perf_counter() - started) / max(1, padded)
            mean = self._cost_per_token
            self._cost_per_token = cost if mean is None else mean + _EWMA_WEIGHT * (cost - mean)
        _settle(batch, running)

    def _drop_abandoned(self) -> None:
        for request in [r for r in self._requests if r.future.done()]:
            self._requests.remove(request)
            self._queued -= len(request.waiting)
            self._queued_tokens -= sum(len(tokens) for _, tokens in request.waiting)

    def _holds_full_batch(self) -> bool:
        """Whether waiting sequences already fill a batch (a lower bound on its padded size suffices)."""
        if self._queued >= self._max_batch_size:
            return True
        longest_head = max((len(r.waiting[0][1]) for r in self._requests), default=0)
        return self._queued * longest_head >= self._max_batch_tokens

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        longest = 0
        while self._requests and len(batch) < self._max_batch_size:
            for request in list(self._requests):
                position, tokens = request.waiting[0]
                grown = max(longest, len(tokens))
                # Always take one sequence, even one longer than the token bound allows: it must run alone.
                if batch and grown * (len(batch) + 1) > self._max_batch_tokens:
                    return batch
                if len(request.waiting) == len(request.results):  # its first sequence reaches an encoder
                    QUEUE_WAIT.labels(self._model).observe(asyncio.get_running_loop().time() - request.queued_at)
                request.waiting.popleft()
                self._queued -= 1
                self._queued_tokens -= len(tokens)
                if not request.waiting:
                    self._requests.remove(request)
                batch.append(_Item(request, position, tokens))
                longest = grown
                if len(batch) == self._max_batch_size:
                    break
        return batch


class Reservation:
    """An admitted request's place in the queue, from `admit` until its sequences are queued (or it fails)."""

    def __init__(self, batcher: Batcher, inputs: int) -> None:
        self._batcher = batcher
        self._inputs = inputs

    def release(self) -> None:
        """Give the place up (idempotent): the sequences are queued now, or will never be."""
        self._batcher._reserved -= self._inputs
        self._inputs = 0


def _settle(batch: list[_Item], running: asyncio.Future[Sequence[Any]]) -> None:
    """Hand each request its results from a finished batch, or the batch's failure."""
    exc = running.exception()
    if exc is None and len(running.result()) != len(batch):
        exc = InternalError(f"the encoder returned {len(running.result())} results for {len(batch)} inputs")
    if exc is not None:
        log.error("encoding a batch of %d failed", len(batch), exc_info=exc)
        for item in batch:
            _fail(item.request, exc)
        return
    for item, result in zip(batch, running.result(), strict=True):
        request = item.request
        if request.future.done():
            continue
        request.results[item.position] = result
        request.remaining -= 1
        if request.remaining == 0:
            request.future.set_result(request.results)


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
