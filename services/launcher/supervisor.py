"""Supervision under `ark up`: a service that dies is started again, with backoff and within a restart budget.

A child that exits while the stack runs (a crash, SIGKILL, the OOM killer) is restarted after a backoff that doubles
from `initial_backoff` to `max_backoff`, and reset once the child has stayed up for `stable_after` seconds. A child
that died `max_restarts` times within `window` seconds is left down (a crash loop would only burn the CPU the other
services need), which the status says. Every exit and restart is a log line on `ark up`'s output; the counts are in
`<log dir>/status.json` (what `ark status` prints), rewritten on every change.

Containers get the same from their orchestrator: compose's `restart:` policy, Kubernetes' liveness probes.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.launcher.processes import Child

STATUS_FILE = "status.json"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial_backoff: float = 1.0
    max_backoff: float = 30.0
    max_restarts: int = 5
    window: float = 300.0
    stable_after: float = 60.0
    # A child that runs but fails its health check for this long (hung: stopped, deadlocked) is killed, then
    # restarted like any other death. Checked every `probe_interval` seconds.
    liveness_timeout: float = 30.0
    probe_interval: float = 5.0


@dataclass(slots=True)
class _Record:
    """What the supervisor knows of one child."""

    state: str = "running"  # running | waiting (to restart) | starting | given_up | stopped
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_at: float | None = None
    restart_at: float = 0.0
    backoff: float = 0.0
    up_since: float = field(default_factory=time.monotonic)
    unhealthy_since: float | None = None
    probed_at: float = 0.0
    exits: deque[float] = field(default_factory=deque)


class Supervisor:
    """Watches the children of a started stack; call `tick()` regularly (the launcher does, twice a second)."""

    def __init__(
        self,
        children: list[Child],
        env: dict[str, str],
        log_dir: Path,
        policy: RestartPolicy | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.children = children
        self.env = env
        self.policy = policy or RestartPolicy()
        self.status_path = log_dir / STATUS_FILE
        self._say = say
        self._records = {c.name: _Record(backoff=self.policy.initial_backoff) for c in children}
        self._write()

    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self._records.values())

    def tick(self) -> None:
        now = time.monotonic()
        changed = False
        for child in self.children:
            record = self._records[child.name]
            if record.state == "running":
                code = child.exited()
                if code is None:
                    if now - record.up_since >= self.policy.stable_after:
                        record.backoff = self.policy.initial_backoff
                    self._check_liveness(child, record, now)
                    continue
                changed = True
                self._exited(child, record, code, now)
            elif record.state == "waiting" and now >= record.restart_at:
                changed = True
                child.start(self.env)
                record.state = "starting"
                record.restarts += 1
                record.up_since = now
                record.unhealthy_since = None
                self._say(f"ark: restarting {child.name} (pid {child.process.pid}; restart {record.restarts})")
            elif record.state == "starting":
                code = child.exited()
                if code is not None:
                    changed = True
                    self._exited(child, record, code, now)
                elif child.healthy():
                    changed = True
                    record.state = "running"
                    self._say(f"ark: {child.name} is back after {now - record.last_exit_at:.1f} s")
        if changed:
            self._write()

    def _check_liveness(self, child: Child, record: _Record, now: float) -> None:
        if now - record.probed_at < self.policy.probe_interval:
            return
        record.probed_at = now
        if child.healthy():
            record.unhealthy_since = None
            return
        if record.unhealthy_since is None:
            record.unhealthy_since = now
        elif now - record.unhealthy_since >= self.policy.liveness_timeout:
            self._say(
                f"ark: {child.name} has failed its health check for {now - record.unhealthy_since:.0f} s; killing it"
            )
            record.unhealthy_since = None
            child.process.kill()  # the next tick sees it exit and restarts it

    def _exited(self, child: Child, record: _Record, code: int, now: float) -> None:
        record.last_exit_code = code
        record.last_exit_at = now
        record.exits.append(now)
        while record.exits and now - record.exits[0] > self.policy.window:
            record.exits.popleft()
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        if len(record.exits) > self.policy.max_restarts:
            record.state = "given_up"
            self._say(
                f"ark: {child.name} {how}; not restarting it: it died {len(record.exits)} times in "
                f"{self.policy.window:.0f} s (see {child.log_path})"
            )
            return
        record.state = "waiting"
        record.restart_at = now + record.backoff
        self._say(f"ark: {child.name} {how}; restarting in {record.backoff:.1f} s (see {child.log_path})")
        record.backoff = min(self.policy.max_backoff, record.backoff * 2)

    def stopping(self) -> None:
        """The stack is being stopped: nothing is restarted from now on."""
        for record in self._records.values():
            record.state = "stopped" if record.state != "given_up" else record.state
        self._write()

    def _write(self) -> None:
        """Rewrite the status file atomically (a reader never sees half of it)."""
        now = time.monotonic()
        wall = time.time()
        services = {}
        for child in self.children:
            record = self._records[child.name]
            running = child.exited() is None and child.process is not None
            services[child.name] = {
                "state": record.state,
                "pid": child.process.pid if running else None,
                "address": child.address,
                "restarts": record.restarts,
                "last_exit_code": record.last_exit_code,
                "last_exit_time": None if record.last_exit_at is None else wall - (now - record.last_exit_at),
                "log": str(child.log_path),
            }
        body = {"updated": wall, "restarts_total": self.restarts, "services": services}
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, self.status_path)


def format_status(path: Path) -> str:
    """`ark status`: the status file as a table."""
    body = json.loads(path.read_text())
    rows = [("service", "state", "pid", "restarts", "last exit")]
    for name, s in body["services"].items():
        last = "" if s["last_exit_code"] is None else str(s["last_exit_code"])
        rows.append((name, s["state"], str(s["pid"] or "-"), str(s["restarts"]), last))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"restarts in total: {body['restarts_total']}")
    return "\n".join(lines)
