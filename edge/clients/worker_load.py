"""How soon a chat worker would start a new request, as one edge can tell: the worker's own report, plus this edge's
calls since.

A worker reports its load (GetWorkerStatus: requests running on its sequences, how many sequences it has, requests
queued), which counts every edge's calls; the edge reads it with each health probe (every
`edge.worker_probe_interval_seconds`). Between two reports a burst from this edge would all go to the worker that
looked idle, so the edge adds the calls it started since the report was asked for and takes away those of its calls
the report counted that have ended since. Its own calls in progress are a floor: the report may be older than they
are. Until a worker has reported (or one that cannot), only this edge's calls count, on one sequence.

A worker with a free sequence starts a request at once, and a batched step is faster the fewer sequences it runs; a
worker whose sequences are all taken starts it after the queue ahead has moved through them. Both orders are the
one rank `(load + 1) / sequences`: the share of its sequences the request would find taken counting itself, which
past 1 is the queue ahead in units of a request's time on one sequence.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass


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
        self._counted: frozenset[object] = frozenset()  # this edge's calls in progress when the report was asked for

    def reported(self, report: LoadReport, counted: frozenset[object]) -> None:
        """A new report, asked for while `counted` (this edge's calls) were in progress."""
        self._report = report
        self._counted = counted

    def forget(self) -> None:
        """The worker failed: its report says nothing of it any more."""
        self._report = None
        self._counted = frozenset()

    def requests(self, calls: Set[object]) -> int:
        """Requests the worker holds now (running or queued), as this edge estimates from `calls`, its own there."""
        if self._report is None:
            return len(calls)
        started = sum(1 for c in calls if c not in self._counted)
        ended = sum(1 for c in self._counted if c not in calls)
        return max(len(calls), self._report.running + self._report.queued + started - ended)

    def rank(self, calls: Set[object]) -> float:
        """Lower starts a new request sooner (see the module docstring)."""
        sequences = self._report.sequences if self._report is not None and self._report.sequences > 0 else 1
        return (self.requests(calls) + 1) / sequences
