"""How soon a chat worker would start a new request, as one edge can tell: the worker's own report, plus this edge's
calls since.

A worker reports its load (GetWorkerStatus: requests running on its sequences, how many sequences it has, requests
queued), which counts every edge's calls; the edge reads it with each health probe (every
`edge.worker_probe_interval_seconds`). Between two reports a burst from this edge would all go to the worker that
looked idle, so the edge adds the calls it started since the report was asked for and takes away those of its calls
the report counted that have ended since. The report counts the calls in progress when it was asked for, and those
the worker took up while it was on its way (their `admitted` event came before the report): counting those again
made an idle worker look busy until the next report, and a request went to the busy one. Its own calls in progress
are a floor: the report may be older than they are. Until a worker has reported (or one that cannot), only this
edge's calls count, on one sequence.

A worker with a free sequence starts a request at once, and a batched step is faster the fewer sequences it runs; a
worker whose sequences are all taken starts it after the queue ahead has moved through them. Both orders are the
one rank `(load + 1) / sequences`: the share of its sequences the request would find taken counting itself, which
past 1 is the queue ahead in units of a request's time on one sequence.

A new conversation is placed (by the session registry) before its call starts, so a burst of them would all see the
same ranks: each placement counts on its worker as a promised request until a call starts there (`promise`, `kept`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Set
from dataclasses import dataclass

# How long a worker counts a new conversation placed on it before its call starts (`promise`): the registry's answer
# takes milliseconds; a placement that went elsewhere (the registry saw that worker down) stops counting after this.
PROMISE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A worker's own account of its load (GetWorkerStatusResponse)."""

    running: int
    queued: int
    sequences: int


class WorkerLoad:
    """One worker's last report and the edge's calls it counted; `rank` orders workers by how soon they start."""

    def __init__(self) -> None:
        self._report: LoadReport | None = None
        self._counted: frozenset[object] = frozenset()  # this edge's calls the last report counted
        self._asked: set[object] | None = None  # those the report on its way counts, while one is
        self._promised: deque[float] = deque()  # when each conversation placed here and not yet started stops counting

    def asking(self, calls: Set[object]) -> None:
        """A report is asked for now, while `calls` (this edge's) are in progress."""
        self._asked = set(calls)

    def admitted(self, call: object) -> None:
        """The worker took `call` up: a report on its way now counts it."""
        if self._asked is not None:
            self._asked.add(call)

    def reported(self, report: LoadReport) -> None:
        """The report asked for last has come."""
        self._report = report
        self._counted = frozenset(self._asked or ())
        self._asked = None

    def promise(self) -> None:
        """A new conversation was placed here: count it until a call starts here (or for PROMISE_SECONDS)."""
        self._promised.append(time.monotonic() + PROMISE_SECONDS)

    def kept(self) -> None:
        """A placed request's call starts here: it counts among this edge's calls now, in place of the oldest
        promise."""
        if self._promised:
            self._promised.popleft()

    def withdraw(self) -> None:
        """The conversation promised last went elsewhere after all (it had a worker, or that one was down)."""
        if self._promised:
            self._promised.pop()

    def _promises(self) -> int:
        now = time.monotonic()
        while self._promised and self._promised[0] <= now:
            self._promised.popleft()
        return len(self._promised)

    def forget(self) -> None:
        """The worker failed: its report says nothing of it any more."""
        self._report = None
        self._counted = frozenset()
        self._asked = None

    def requests(self, calls: Set[object]) -> int:
        """Requests the worker holds now (running or queued), as this edge estimates from `calls`, its own there."""
        if self._report is None:
            return len(calls) + self._promises()
        started = sum(1 for c in calls if c not in self._counted)
        ended = sum(1 for c in self._counted if c not in calls)
        return max(len(calls), self._report.running + self._report.queued + started - ended) + self._promises()

    def rank(self, calls: Set[object]) -> float:
        """Lower starts a new request sooner (see the module docstring)."""
        sequences = self._report.sequences if self._report is not None and self._report.sequences > 0 else 1
        return (self.requests(calls) + 1) / sequences
