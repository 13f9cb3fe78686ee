"""The embeddings service runs below the rest of the stack: it lowers its own CPU scheduling priority at start.

Encoding is throughput work, seconds to minutes of it under load; what shares the machine with it (the edge
refusing and answering requests, Envoy, chat workers streaming tokens) must answer in milliseconds. At the same
priority the kernel shares the cores between them as equals: in a flood of 24 requests of 2,048 inputs on 2 cores,
the edge needed 44 ms of CPU to refuse 20 of them and spent another 45 ms ready to run but waiting for a core,
while torch encoded the requests taken (bench/embeddings_overload.py, docs/embeddings.md). At a lower priority the
service still gets every cycle nobody else wants, so alone it loses nothing; it only stops competing as an equal
with work that answers people.

Linux ranks threads by their nice value only within one scheduling group, so the service lowers two of them:
- every thread's own (threads started later, torch's and the encoders' included, inherit their starter's): this
  ranks it against the processes of the same group (no session autogrouping, e.g. one container's cgroup);
- its session's, when it leads its own session (as `ark up` starts every service) and the kernel groups threads by
  session (autogroup, on by default in desktop kernels and on this machine): each session then counts as one
  against the others, whatever its threads' nice values, so this is what ranks it against the edge there.
  A service started from a shell leaves the shell's session alone.
A nice value is only ever raised here (an operator's `nice -n 15` stays); raising one needs no privilege.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_THREADS = Path("/proc/self/task")
_AUTOGROUP = Path("/proc/self/autogroup")


def lower_priority(nice: int) -> None:
    """Raise this process's nice value to at least `nice`: its threads' and, if it leads its session, the session's."""
    if nice <= 0:
        return
    try:
        _lower_threads(nice)
        _lower_session(nice)
    except OSError as exc:  # a read-only /proc or a kernel without these knobs: serve at the priority we have
        log.warning("could not lower the service's CPU priority to nice %d: %s", nice, exc)


def _lower_threads(nice: int) -> None:
    # On Linux a nice value belongs to one thread; elsewhere PRIO_PROCESS 0 is the whole process.
    threads = [int(task.name) for task in _THREADS.iterdir()] if _THREADS.is_dir() else [0]
    for thread in threads:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            if os.getpriority(os.PRIO_PROCESS, thread) < nice:
                os.setpriority(os.PRIO_PROCESS, thread, nice)


def _lower_session(nice: int) -> None:
    if os.getsid(0) != os.getpid() or not _AUTOGROUP.exists():
        return
    fields = _AUTOGROUP.read_text().split()  # "/autogroup-1816 nice 0", or nothing outside any autogroup
    if fields and int(fields[-1]) < nice:
        _AUTOGROUP.write_text(str(nice))
