"""The embeddings service lowers its own CPU priority (services/embeddings/priority.py): every thread's nice value,
the threads it starts later through them, and its session's when it leads one. Each case runs in a child process,
so that the test process keeps its own priority."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services.embeddings.settings import SentenceTransformersSettings

ROOT = Path(__file__).resolve().parents[2]
LOWERED = max(7, os.nice(0))  # what 7 gives: a nice value is only ever raised

CHILD = """
import faulthandler, json, os, threading
from pathlib import Path
from services.embeddings.priority import lower_priority

faulthandler.dump_traceback_later(60, exit=True)  # a stuck child shows where, and ends

def nice_of(thread):
    return os.getpriority(os.PRIO_PROCESS, thread)

autogroup = Path("/proc/self/autogroup")
def session_nice():
    # Empty when the session is in no autogroup of its own (e.g. under a container's or a CI runner's cgroup).
    fields = autogroup.read_text().split() if autogroup.exists() else []
    return fields[-1] if fields else None

started = threading.Event()
release = threading.Event()
early = {}
def before():
    early["id"] = threading.get_native_id()
    started.set()
    release.wait()
threading.Thread(target=before, daemon=True).start()
started.wait()
try:
    session_before = session_nice()
    lower_priority(7)
    later = {}
    thread = threading.Thread(target=lambda: later.update(nice=nice_of(0)))
    thread.start()
    thread.join()
    earlier = nice_of(early["id"])
finally:
    release.set()
print(json.dumps({
    "main": nice_of(0),
    "earlier_thread": earlier,
    "later_thread": later["nice"],
    "session_before": session_before,
    "session_after": session_nice(),
}))
"""


def _run(*, own_session: bool) -> dict[str, int | str | None]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        start_new_session=own_session,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_thread_runs_at_the_lower_priority_those_started_before_and_after():
    seen = _run(own_session=True)
    assert seen["main"] == seen["earlier_thread"] == seen["later_thread"] == LOWERED


def test_a_service_leading_its_session_lowers_the_session_and_otherwise_leaves_it_alone():
    leader, inside = _run(own_session=True), _run(own_session=False)
    if leader["session_before"] is not None:  # the kernel gave the new session an autogroup of its own
        assert leader["session_after"] == "7"
    else:
        assert leader["session_after"] is None
    assert inside["session_after"] == inside["session_before"]  # the shell's (here pytest's) session, or none
    assert inside["main"] == LOWERED


def test_the_default_is_below_the_rest_of_the_stack_and_zero_keeps_the_priority():
    assert SentenceTransformersSettings().nice == 10
    assert _run_with(0) == os.nice(0)


def _run_with(nice: int) -> int:
    code = f"import os; from services.embeddings import priority; priority.lower_priority({nice}); print(os.nice(0))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_session_in_no_autogroup_of_its_own_is_left_alone(tmp_path, monkeypatch):
    # The kernel shows an empty /proc/self/autogroup for a session in the root group (as under a CI runner's cgroup).
    from services.embeddings import priority

    empty = tmp_path / "autogroup"
    empty.write_text("")
    monkeypatch.setattr(priority, "_AUTOGROUP", empty)
    monkeypatch.setattr(priority.os, "getsid", lambda _pid: os.getpid())
    priority._lower_session(7)
    assert empty.read_text() == ""
