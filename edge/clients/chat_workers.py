"""The chat workers as the edge sees them: routing, failure detection, and when a request may go elsewhere.

Routing: a stateless request goes to the worker that is up and would start it soonest (round robin among equals):
by the load each worker reports to the health probes (its running requests against its sequences, and its queue:
every edge's calls), corrected by this edge's calls since that report (edge/clients/worker_load.py). Counting only
this edge's own calls was blind to the others': with two edges, a stream waited 5.2 s for its first token on one
worker while the other was idle. A session's request goes to its worker, placed by the registry: a new
conversation on one of the workers that would start it soonest (`soonest()`, sent with the placement request).
A worker that refused a request for load is not called again for `edge.overload_hold_seconds` (edge/saturation.py):
when that is every worker, the edge answers 429 itself, in well under a millisecond.

Failure detection (the figures are in docs/operations.md):

- every worker's gRPC health is probed each `edge.worker_probe_interval_seconds`, each probe waiting at most
  `edge.worker_probe_timeout_seconds` (a serving worker is then asked for its load, for routing). A worker whose
  last probe failed, that answered NOT_SERVING (it is stopping), or whose call just failed or timed out, gets no
  new request until a probe finds it SERVING again (outlier ejection);
- once its probes have failed for `edge.worker_hang_seconds` (a stopped or wedged process), every stream on it ends
  with one error event. A crashed worker's streams end at once: its connection drops;
- deadlines: `edge.first_event_timeout_seconds` for a worker to take a request up, `edge.event_timeout_seconds`
  between two messages of a generation; keepalive on every channel (services/common/server.py) underneath.

When a request may go elsewhere: the worker sends `admitted` when the request leaves its queue and it begins work.
A request whose worker failed before that only waited: it is retried once on another worker, or refused with 503
and Retry-After. One whose worker failed after it is never retried: it may be what killed the worker (a poison
pill). It gets WorkerFailedError (`x-should-retry: false`) and its fingerprint is refused for a while
(edge/quarantine.py).

Errors that reach clients never name a worker's address; the log does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from ark.chat.v1 import chat_service_pb2 as chat_pb
from ark.chat.v1 import chat_service_pb2_grpc as chat_grpc
from edge.clients.worker_load import LoadReport, WorkerLoad
from edge.metrics import (
    CHAT_RETRIES,
    CHAT_WORKER_EJECTIONS,
    CHAT_WORKER_FAILURES,
    CHAT_WORKER_REQUESTS,
    CHAT_WORKER_UP,
    ChatStreamObserver,
)
from edge.quarantine import Quarantine
from edge.saturation import Saturation
from services.common.channels import CHANNEL_OPTIONS
from services.common.config import EdgeConfig
from services.common.errors import (
    ERROR_DOMAIN,
    ArkError,
    InternalError,
    OverloadedError,
    UnavailableError,
    WorkerFailedError,
)
from services.common.grpc_errors import from_rpc_error
from services.common.internal_auth import internal_channel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerPolicy:
    """How fast the edge gives up on a worker (the `edge` section of the configuration)."""

    probe_interval: float = 1.0
    probe_timeout: float = 2.0
    hang_after: float = 5.0
    first_event_timeout: float = 60.0
    event_timeout: float = 60.0
    quarantine_seconds: float = 300.0
    overload_hold: float = 0.25

    @classmethod
    def from_config(cls, edge: EdgeConfig) -> WorkerPolicy:
        return cls(
            probe_interval=edge.worker_probe_interval_seconds,
            probe_timeout=edge.worker_probe_timeout_seconds,
            hang_after=edge.worker_hang_seconds,
            first_event_timeout=edge.first_event_timeout_seconds,
            event_timeout=edge.event_timeout_seconds,
            quarantine_seconds=edge.quarantine_seconds,
            overload_hold=edge.overload_hold_seconds,
        )


_BUSY = "The server is busy: every chat worker's queue is full. Retry shortly."


class WorkerUnavailableError(UnavailableError):
    """The one worker a session is pinned to cannot take the request (the caller re-places the session)."""


class _NotAdmitted(Exception):
    """The worker failed before taking the request up: it may go to another worker."""


def _ark_error(exc: grpc.RpcError) -> ArkError | None:
    """The ArkError a worker sent (its status carries ARK's ErrorInfo); None for a transport failure."""
    status = rpc_status.from_call(exc) if hasattr(exc, "trailing_metadata") else None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == ERROR_DOMAIN:
                    return from_rpc_error(exc)
    return None


class _Worker:
    """One worker address: its channel, what the edge believes about it, and the calls running on it."""

    def __init__(self, address: str, token: str | None = None, overload_hold: float = 0.25) -> None:
        self.address = address
        self.channel = internal_channel(address, CHANNEL_OPTIONS, token)
        self.chat = chat_grpc.ChatServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.serving = True  # the launcher and the orchestrators start the edge after the workers are healthy
        self.ejected = False
        self.failing_since: float | None = None
        self.calls: set[_Call] = set()
        self.prober: asyncio.Task[None] | None = None
        self.saturation = Saturation("chat", max_hold=overload_hold)  # its last refusal for load, while it holds
        self.load = WorkerLoad()  # its last load report and this edge's calls since (routing)
        CHAT_WORKER_UP.labels(address).set(1)

    @property
    def routable(self) -> bool:
        return self.serving and not self.ejected

    def eject(self, reason: str, detail: str) -> None:
        if not self.ejected:
            log.warning("chat worker %s: not routing to it (%s)", self.address, detail)
            CHAT_WORKER_EJECTIONS.labels(self.address, reason).inc()
        self.ejected = True
        CHAT_WORKER_UP.labels(self.address).set(0)

    def probed(self, status: int) -> None:
        serving = status == health_pb2.HealthCheckResponse.SERVING
        if (self.ejected or not self.serving) and serving:
            log.warning("chat worker %s: serving again", self.address)
        elif self.serving and not serving:
            log.warning("chat worker %s: not serving (stopping)", self.address)
        self.failing_since = None
        self.ejected = False
        self.serving = serving
        CHAT_WORKER_UP.labels(self.address).set(int(serving))


class _Call:
    """A generation call with the deadline of its next read, which failure detection can bring forward."""

    def __init__(self, worker: _Worker, call: grpc.aio.UnaryStreamCall) -> None:
        self.worker = worker
        self._call = call
        self.lost: str | None = None  # why failure detection ended it
        self.admitted = False  # the worker took it up: from then on it is never moved to another worker
        self._deadline: asyncio.Timeout | None = None
        worker.calls.add(self)

    async def read(self, seconds: float) -> chat_pb.StreamGenerateChatCompletionResponse | object:
        """The next message or grpc.aio.EOF; TimeoutError past `seconds` or when the worker is declared lost."""
        if self.lost is not None:
            raise TimeoutError
        async with asyncio.timeout(seconds) as deadline:
            self._deadline = deadline
            try:
                return await self._call.read()
            finally:
                self._deadline = None

    def admit(self) -> None:
        """The worker took the call up (its `admitted` or `started` event): a load report on its way counts it."""
        if not self.admitted:
            self.admitted = True
            self.worker.load.admitted(self)

    def lose(self, reason: str) -> None:
        """End the call now: its pending read raises TimeoutError."""
        self.lost = reason
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time())

    def close(self) -> None:
        self._call.cancel()
        self.worker.calls.discard(self)


class ChatStream:
    """A started generation: its `started` event, then the remaining messages.

    Iterating raises ArkError only: the worker's own errors as it sent them, WorkerFailedError when the worker
    died or hung (then the request is quarantined).
    """

    def __init__(
        self,
        workers: ChatWorkers,
        call: _Call,
        request: chat_pb.StreamGenerateChatCompletionRequest,
        started: chat_pb.GenerationStarted,
        observer: ChatStreamObserver | None = None,
    ) -> None:
        self._workers = workers
        self._call = call
        self._request = request
        self.started = started
        self._observer = observer

    async def __aiter__(self) -> AsyncIterator[chat_pb.StreamGenerateChatCompletionResponse]:
        timeout = self._workers.policy.event_timeout
        while True:
            try:
                message = await self._call.read(timeout)
            except TimeoutError:
                raise self._workers.failed_while_processing(
                    self._call, self._request, "hung", self._call.lost or f"sent nothing for {timeout:g} s"
                ) from None
            except grpc.RpcError as exc:
                self._call.close()
                error = _ark_error(exc)
                if error is None:
                    raise self._workers.failed_while_processing(
                        self._call, self._request, "call_failed", f"stream broke: {exc.code().name}"
                    ) from None
                raise error from None
            if message is grpc.aio.EOF:
                return
            if message.WhichOneof("event") == "working":
                continue  # alive and working on it: the silence deadline starts again, nothing goes on
            if self._observer is not None:
                self._observer.observe(message)  # time to first token, decode rate, token counts
            yield message

    def cancel(self) -> None:
        self._call.close()


class ChatWorkers:
    """The chat workers: routing, failure detection and retries (see the module docstring)."""

    def __init__(self, addresses: list[str], policy: WorkerPolicy | None = None, *, token: str | None = None) -> None:
        self._token = token  # ARK's internal token, sent on every call (services/common/internal_auth.py)
        self.policy = policy or WorkerPolicy()
        self._workers: dict[str, _Worker] = {}
        self._started = False  # before the workers are made: _worker() reads it
        self._configured = [self._worker(a) for a in addresses]
        self._next = itertools.cycle(range(len(self._configured)))
        self._next_placement = itertools.cycle(range(len(self._configured)))  # soonest()'s own turn, apart
        self.quarantine = Quarantine(self.policy.quarantine_seconds)

    def start(self) -> None:
        """Begin probing the workers (from within the app's event loop)."""
        self._started = True
        for worker in self._workers.values():
            self._probe_in_background(worker)

    def _worker(self, address: str) -> _Worker:
        worker = self._workers.get(address)
        if worker is None:
            # A session may live on a worker outside the configured list (a pod that registered its own address).
            worker = self._workers[address] = _Worker(address, self._token, self.policy.overload_hold)
            if self._started:
                self._probe_in_background(worker)
        return worker

    def _probe_in_background(self, worker: _Worker) -> None:
        if worker.prober is None:
            worker.prober = asyncio.create_task(self._probe_forever(worker), name=f"probe {worker.address}")

    async def _probe_forever(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            sent = loop.time()
            try:
                reply = await worker.health.Check(request, timeout=self.policy.probe_timeout)
            except grpc.RpcError as exc:
                self._probe_failed(worker, sent, exc.code())
            except Exception:  # never let the prober die: log and go on probing
                log.exception("probing chat worker %s", worker.address)
            else:
                worker.probed(reply.status)
                if worker.serving:
                    await self._ask_load(worker)
            await asyncio.sleep(max(0.0, self.policy.probe_interval - (loop.time() - sent)))

    async def _ask_load(self, worker: _Worker) -> None:
        """Refresh the worker's load report (a worker that cannot tell is routed by this edge's calls alone)."""
        worker.load.asking(worker.calls)
        # At most one probe interval: a slow answer must not hold the next health probe back.
        timeout = min(self.policy.probe_timeout, self.policy.probe_interval)
        try:
            status = await worker.chat.GetWorkerStatus(chat_pb.GetWorkerStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            log.debug("chat worker %s: no load report: %s", worker.address, exc.code().name)
            worker.load.forget()
            return
        report = LoadReport(status.running_requests, status.queued_requests, status.max_running_requests)
        worker.load.reported(report)
        CHAT_WORKER_REQUESTS.labels(worker.address).set(worker.load.requests(worker.calls))

    def _probe_failed(self, worker: _Worker, sent: float, code: grpc.StatusCode) -> None:
        worker.load.forget()
        if worker.failing_since is None:
            worker.failing_since = sent
        worker.eject("probe_failed", f"health probe failed: {code.name}")
        for call in list(worker.calls):
            if not call.admitted:  # only waiting there: another worker can take it now, at no risk
                call.lose(f"its worker failed a health probe ({code.name})")
        failing_for = asyncio.get_running_loop().time() - worker.failing_since
        if failing_for >= self.policy.hang_after and worker.calls:
            reason = f"health probes failing for {failing_for:.1f} s"
            log.error("chat worker %s: ending its %d call(s): %s", worker.address, len(worker.calls), reason)
            CHAT_WORKER_EJECTIONS.labels(worker.address, "hung").inc()
            for call in list(worker.calls):
                call.lose(reason)

    # -- starting a generation -----------------------------------------------------------------------------------

    async def open_stream(
        self,
        request: chat_pb.StreamGenerateChatCompletionRequest,
        *,
        address: str | None = None,
        retry: bool = True,
    ) -> ChatStream:
        """Start a generation and wait for its `started` event, so errors surface before the HTTP response.

        With `address`, only that worker is tried, and WorkerUnavailableError says it cannot take the request (the
        caller places the session elsewhere: that is the request's one retry). Otherwise a worker that fails
        before admitting the request is replaced by another once (if `retry`), and one that refuses it for load by
        the next.
        """
        self.quarantine.check(request)
        if address is not None:
            worker = self._worker(address)
            if not worker.routable:
                raise WorkerUnavailableError("The chat worker holding this session is unavailable.")
            if refusal := worker.saturation.refusal(_BUSY):
                raise refusal
            worker.load.kept()  # the placement's promise: the call counts from now on (a stateless one had none)
            try:
                return await self._start(worker, request)
            except _NotAdmitted:
                raise WorkerUnavailableError("The chat worker holding this session is unavailable.") from None
        ordered = self._in_turn(self._next)
        # By load: the worker that would start it soonest (edge/clients/worker_load.py); round robin breaks ties.
        ordered.sort(key=lambda w: w.load.rank(w.calls))
        candidates = [w for w in ordered if w.routable]
        if not candidates:
            # Every worker is out. Rather than refuse everything on probes that may only be slow (a saturated
            # machine), try those not known to be stopping: a dead one fails at once and the request moves on.
            candidates = [w for w in ordered if w.serving]
        elif all(w.saturation.remaining > 0 for w in candidates):
            # Every worker said its queue is too long, and for how long: refuse now, without another round trip.
            soonest = min(candidates, key=lambda w: w.saturation.remaining)
            if refusal := soonest.saturation.refusal(_BUSY):
                raise refusal
        overloaded: OverloadedError | None = None
        retries = 1 if retry else 0
        for worker in candidates:
            try:
                return await self._start(worker, request)
            except OverloadedError as exc:  # that worker's queue is full: the next may have room
                if overloaded is None or (exc.retry_after or 1) < (overloaded.retry_after or 1):
                    overloaded = exc
            except _NotAdmitted:
                if retries == 0:
                    break
                retries -= 1
                CHAT_RETRIES.inc()
        if overloaded is not None:
            raise overloaded
        raise UnavailableError("No chat worker is available right now. Retry shortly.", retry_after=1)

    def _in_turn(self, turns: Iterator[int]) -> list[_Worker]:
        """The configured workers starting from the next one in `turns` (round robin among equals)."""
        first = next(turns) if self._configured else 0
        return self._configured[first:] + self._configured[:first]

    def soonest(self) -> list[str]:
        """The address of the worker that would start a new conversation soonest (round robin among equals), where
        the registry places it (edge/sessions/placement.py); [] when none is ready.

        The worker counts the conversation as promised until its call starts: the placements of a burst all come
        before its calls, and with every tie sent along, 32 new conversations at once went 17 to one worker of 16
        sequences and 15 to the other, where the 17th waited a whole generation for its first token."""
        ready = [w for w in self._in_turn(self._next_placement) if w.routable and w.saturation.remaining == 0]
        if not ready:
            return []
        best = min(ready, key=lambda w: w.load.rank(w.calls))
        best.load.promise()
        return [best.address]

    def placed(self, soonest: list[str], address: str | None) -> None:
        """The registry answered a placement sent with `soonest`: the promise stands if the request goes there
        (its call starts next); if it goes elsewhere (the worker holding its conversation) it moves there, and it is
        withdrawn if the request goes statelessly (a registry that could not be reached).

        A burst mixes both: new users and users whose conversation already has a worker. Counting only the new ones,
        8 streams at once, 4 of which continued conversations held on one worker, went 5 to that worker and 3 to
        the other (the level took as long as its busier worker: a fifth of its tokens/s lost)."""
        for promised in soonest:
            if promised != address and (worker := self._workers.get(promised)) is not None:
                worker.load.withdraw()
        if address is not None and address not in soonest and (target := self._workers.get(address)) is not None:
            target.load.promise()

    async def _start(self, worker: _Worker, request: chat_pb.StreamGenerateChatCompletionRequest) -> ChatStream:
        observer = ChatStreamObserver(request.model)
        call = _Call(worker, worker.chat.StreamGenerateChatCompletion(request))
        try:
            while True:
                message = await call.read(self.policy.first_event_timeout)
                if message is grpc.aio.EOF:
                    raise InternalError("The chat worker closed the stream before starting.")
                kind = message.WhichOneof("event")
                if kind == "working" and call.admitted:
                    continue  # the worker is restoring the turn's state or waiting to prefill its prompt
                if kind not in ("admitted", "started"):
                    raise InternalError("The chat worker sent output before starting.")
                call.admit()
                if kind == "started":
                    return ChatStream(self, call, request, message.started, observer)
        except TimeoutError:
            reason = call.lost or f"did not take the request up within {self.policy.first_event_timeout:g} s"
            if call.admitted:
                raise self.failed_while_processing(call, request, "hung", reason) from None
            call.close()
            worker.eject("call_failed", reason)
            raise _NotAdmitted from None
        except grpc.RpcError as exc:
            call.close()
            error = _ark_error(exc)
            if error is None:  # the connection failed or dropped: the worker is gone
                if call.admitted:
                    raise self.failed_while_processing(
                        call, request, "call_failed", f"stream broke: {exc.code().name}"
                    ) from None
                worker.eject("call_failed", f"call failed: {exc.code().name} {exc.details()}")
                raise _NotAdmitted from None
            if isinstance(error, UnavailableError) and not call.admitted:
                worker.serving = False  # it is stopping (it refused its queue); probes will tell when it is back
                raise _NotAdmitted from None
            worker.saturation.note(error)
            raise error from None
        except BaseException:
            call.close()
            raise

    def failed_while_processing(
        self, call: _Call, request: chat_pb.StreamGenerateChatCompletionRequest, reason: str, detail: str
    ) -> WorkerFailedError:
        """The worker died or hung with this request in progress: no retry anywhere, and quarantine it."""
        call.close()
        call.worker.eject(reason, detail)
        self.quarantine.add(request)
        CHAT_WORKER_FAILURES.inc()
        log.error(
            "request %s: chat worker %s failed while processing it: %s", request.request_id, call.worker.address, detail
        )
        return WorkerFailedError(
            "The chat worker failed while processing this request. It was not retried, because the request itself "
            "may have caused the failure."
        )

    async def close(self) -> None:
        for worker in self._workers.values():
            if worker.prober is not None:
                worker.prober.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.prober
            await worker.channel.close()
